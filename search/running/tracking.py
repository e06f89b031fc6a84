"""The MLflow side of a study: the parent run, one nested run per trial, closing a lost trial's run.

One experiment per study, one parent run per study (reused by every launch),
one nested child run per trial. Tags on a child: ``trial_number``, ``study``,
``state`` (RUNNING while it trains, then COMPLETE / PRUNED / FAIL, and
``error`` for a failed one), and under SLURM the job and task ids
(``SLURM_TAGS``). The Optuna trial stores the child's run id as the
user attribute ``mlflow_run_id``; the study stores the parent's as
``mlflow_parent_run_id``. Every write goes through a :class:`Recorder` bound to
its run, so one process can hold several runs, in several stores, at once.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from mbu.base.files import write_json
from mbu.base.run_files import RUN_FILE
from mbu.base.urls import storage_identity
from mbu.search.judging.race import SEED_RUNS_ATTR
from mbu.search.studyfile.study_file import StudyConfig, trial_name
from mbu.train.config import TrainConfig
from mbu.train.stop import interrupts_held
from mbu.train.tracking import Recorder, train_params

RUN_ID_ATTR = "mlflow_run_id"  # Optuna trial attribute: the trial's MLflow run
OPEN_SEED_RUN_ATTR = "seed_run_open"  # Optuna trial attribute: {seed: run_id} of the seed runs in flight
PENDING_SEEDS_ATTR = "seed_runs_pending"  # Optuna trial attribute: {seed: run} trained, not yet granted by the race
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # Optuna study attribute: the study's parent MLflow run
PARENT_ROLE = "study-parent"  # value of the parent run's ``role`` tag
# Optuna trial attributes a queued trial may carry: its MLflow run's name (else trial-<n>) and extra tags.
RUN_NAME_ATTR = "mlflow_run_name"
RUN_TAGS_ATTR = "mlflow_run_tags"
# MLflow run status for each way a trial ends.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
# Trial-run tags naming the SLURM job a trial ran in (``mbu search --slurm``): environment variable -> tag.
SLURM_TAGS = {
    "SLURM_ARRAY_JOB_ID": "slurm_array_job_id",  # the array, as squeue and scancel name it
    "SLURM_ARRAY_TASK_ID": "slurm_array_task_id",
    "SLURM_JOB_ID": "slurm_job_id",  # this task's own job id
    "SLURM_RESTART_COUNT": "slurm_restart_count",  # times the task was requeued before this run
}


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store, bound to loopback only."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def open_parent_run(study: optuna.Study, config: StudyConfig) -> Recorder:
    """The study's parent run, found again on every launch (or new), tagged with this launch."""
    settings = config.study
    existing = study.user_attrs.get(PARENT_RUN_ATTR)
    client = mlflow.MlflowClient(settings.tracking_uri)
    if existing is not None:
        try:
            if client.get_run(existing).info.lifecycle_stage != "active":
                existing = None  # deleted in the UI: start a new parent
        except mlflow.exceptions.MlflowException:
            existing = None  # e.g. the study moved to another tracking store: start a new parent
    tags = {
        "study": settings.name,
        "role": PARENT_ROLE,
        "study_file": str(config.path),
        "n_trials": settings.n_trials,
        "last_launch": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    # Ctrl-C held: a new parent run is always recorded in the study, so the next launch finds and closes it.
    with interrupts_held():
        parent = Recorder.start(
            settings.tracking_uri, settings.name, f"study-{settings.name}", run_id=existing, tags=tags
        )
        study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
    return parent


def slurm_tags() -> dict[str, str]:
    """The SLURM job (and array task) this worker runs in, from its environment; empty outside SLURM."""
    return {tag: os.environ[var] for var, tag in SLURM_TAGS.items() if os.environ.get(var)}


def open_trial_run(
    trial: optuna.Trial,
    config: StudyConfig,
    cfg: TrainConfig,
    parent: Recorder,
    name: str | None = None,
    reopen: str | None = None,
    tags: dict[str, Any] | None = None,
    remember: Callable[[str], None] | None = None,
) -> Recorder:
    """The trial's run, nested under ``parent``; its id goes to the trial and to the run folder (``cfg.out``).

    ``reopen``: a run of an earlier try to continue (its params are already logged); ``remember``
    records the id instead of the trial's ``mlflow_run_id`` (a seed run of a raced configuration).
    """
    settings = config.study
    tags = {"trial_number": trial.number, "study": settings.name, "state": "RUNNING", **slurm_tags(), **(tags or {})}
    tags |= trial.user_attrs.get(RUN_TAGS_ATTR, {})
    name = name or trial.user_attrs.get(RUN_NAME_ATTR) or trial_name(trial.number)
    run = Recorder.start(settings.tracking_uri, config.experiment_name, name, run_id=reopen, parent_id=parent.run_id)
    try:
        (remember or (lambda run_id: trial.set_user_attr(RUN_ID_ATTR, run_id)))(run.run_id)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        record = {"run_id": run.run_id, "tracking_uri": storage_identity(settings.tracking_uri)}
        write_json(Path(cfg.out) / RUN_FILE, {**record, "study": settings.name, "trial": trial.number})
        run.set_tags(tags)
        if reopen is None:
            run.log_params(train_params(cfg))
    except BaseException as err:  # the run exists but the caller never gets it: never leave it RUNNING
        run.set_tags({"state": "FAIL", "error": f"{type(err).__name__}: {err}"[:5000]})
        run.end("FAILED")
        raise
    return run


def open_seed_runs(trial: optuna.Trial | optuna.trial.FrozenTrial) -> dict[int, str]:
    """The MLflow runs of the trial's seed runs in flight, by seed (the form that held one seed is read too)."""
    carried = trial.user_attrs.get(OPEN_SEED_RUN_ATTR) or {}
    if "seed" in carried:
        return {int(carried["seed"]): carried["run_id"]} if carried.get("run_id") else {}
    return {int(seed): run_id for seed, run_id in carried.items()}


def pending_results(trial: optuna.Trial | optuna.trial.FrozenTrial) -> dict[int, dict]:
    """A raced configuration's seed runs trained ahead (side_by_side) and waiting for the race to grant them."""
    return {int(seed): run for seed, run in (trial.user_attrs.get(PENDING_SEEDS_ATTR) or {}).items()}


def set_seed_entry(trial: optuna.Trial, attr: str, seed: int, value: Any | None) -> None:
    """Put ``value`` for ``seed`` into the trial's ``{seed: ...}`` attribute ``attr`` (one of the two above),
    or with None take the seed out."""
    read = open_seed_runs if attr == OPEN_SEED_RUN_ATTR else pending_results
    entries = {str(s): v for s, v in read(trial).items() if s != seed}
    if value is not None:
        entries[str(seed)] = value
    trial.set_user_attr(attr, entries)


def close_trial_run(run: Recorder, trial: optuna.Trial, state: str, error: str = "") -> None:
    """Tag the outcome, end the run; what the tracking server never took is counted on the Optuna trial."""
    run.set_tags({"state": state, **({"error": error[:5000]} if error else {})})
    unlogged = run.end(RUN_STATUS[state])
    if unlogged:
        trial.set_user_attr("mlflow_unlogged", len(unlogged))


# Optuna trial attribute: how many times this trial's chain of tries was stopped from outside (SIGTERM, a
# time limit); carried to each retry. Stops are not deaths: they do not spend ``max_retry``.
STOPS_ATTR = "stops"


# Optuna trial attributes that describe one try, not its chain: a retry starts without them.
TRY_ATTRS = ("error", "mlflow_unlogged")


def queue_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A WAITING copy of ``trial`` (same parameters), which resumes from the checkpoints of its chain of tries.

    The copy keeps the chain's user attributes (e.g. ``stops``) but not those of the try that ended
    (``TRY_ATTRS``): a retry that completes carries no earlier try's ``error``.
    """
    retried = copy.copy(trial)
    retried.user_attrs = {key: value for key, value in trial.user_attrs.items() if key not in TRY_ATTRS}
    with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
        RetryHeartbeatStaleTrialCallback(max_retry=None)(study, retried)


class RetryLostTrial:
    """Run by a live worker for each trial whose worker stopped beating: close its run, queue a retry.

    A chain of tries is retried after at most ``max_retry`` deaths; its stops from outside are not counted.
    """

    def __init__(self, max_retry: int, tracking_uri: str) -> None:
        self.max_retry = max_retry
        self.tracking_uri = tracking_uri

    def retry(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
            tries = len(RetryHeartbeatStaleTrialCallback.retry_history(trial)) + 1
        if tries - int(trial.user_attrs.get(STOPS_ATTR, 0)) <= self.max_retry:
            queue_retry(study, trial)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # The trial's run, and the seed runs a raced configuration had in flight (its retry reopens them).
        finished = trial.user_attrs.get(SEED_RUNS_ATTR, {})  # those seeds' runs were closed before the worker died
        in_flight = [run_id for seed, run_id in open_seed_runs(trial).items() if str(seed) not in finished]
        for run_id in (*in_flight, trial.user_attrs.get(RUN_ID_ATTR)):
            if run_id is None:
                continue
            recorder = Recorder.of_run(self.tracking_uri, run_id)
            recorder.set_tags({"state": "FAIL", "error": "worker lost: no heartbeat within the grace period; retried"})
            recorder.end("FAILED")  # what MLflow does not take, the recorder names in a warning
        self.retry(study, trial)


def quiet_libraries() -> None:
    """Keep Optuna's INFO lines, MLflow's database messages and experimental-API warnings off the terminal."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
