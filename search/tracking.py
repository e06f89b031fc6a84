"""The MLflow side of a study.

One experiment per study, one parent run per study (reused by every launch), one nested child run per
trial. Tags on a child: ``trial_number``, ``study``, ``state`` (RUNNING while it
trains, then COMPLETE / PRUNED / FAIL). The Optuna trial stores the child's run
id as the user attribute ``mlflow_run_id``.
"""

from __future__ import annotations

RUN_ID_ATTR = "mlflow_run_id"  # Optuna trial attribute: the trial's MLflow run
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # Optuna study attribute: the study's parent MLflow run
PARENT_ROLE = "study-parent"  # value of the parent run's ``role`` tag


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store, bound to loopback only."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
