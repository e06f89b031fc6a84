"""Fault: the loss diverges mid-trial. The trial fails with the reason, the study goes on."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from helpers import TINY_DATA_AND_TRAIN
from mlflow.tracking import MlflowClient

from mbu.cli import main

STUDY = """
[study]
name = "diverge"
n_trials = 2

{TINY_DATA_AND_TRAIN}iters = 10
progress_iter = 2

[space.lr]
low = 1e-4
high = 1e12
log = true

[[enqueue]]
lr = 1e12

[[enqueue]]
lr = 2e-4
""".replace("{TINY_DATA_AND_TRAIN}", TINY_DATA_AND_TRAIN)


def test_diverging_trial_fails_with_its_reason_and_the_study_continues(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(STUDY)
    # One finished trial is the target: the diverging preset fails (failures do not count), the next completes.
    assert main(["search", "study.toml", "--no-progress", "--n-trials", "1"]) == 0

    study = optuna.load_study(study_name="diverge", storage="sqlite:///optuna.db")
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert states[0] == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.COMPLETE in states[1:]

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    failed = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert failed.info.status == "FAILED"
    assert failed.data.tags["state"] == "FAIL"
    assert "non-finite loss at iteration" in failed.data.tags["error"]
    iteration = int(failed.data.tags["error"].rsplit(" ", 1)[1])
    assert iteration <= 10 and iteration % 2 == 0  # caught at a progress_iter boundary
