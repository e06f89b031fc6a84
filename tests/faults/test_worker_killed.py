"""Fault: a worker SIGKILLed mid-trial. A relaunch within the grace period says the trial's worker is
silent and waits; the trial is failed after the grace period, retried and resumed from its last
checkpoint; its MLflow run is closed as FAILED."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
from helpers import mbu_command, tiny_study
from mlflow.tracking import MlflowClient

from mbu.search.launching.launch import LaunchOptions, run_study
from mbu.search.studyfile.study_file import load_study_file

STUDY = tiny_study(
    "killed",
    study={"heartbeat_interval": 1, "grace_period": 5},
    train={"iters": 40, "progress_iter": 10, "save_iter": 10},
    lr_space=False,
)


@pytest.mark.slow
def test_killed_worker_trial_is_retried_and_resumed_from_its_checkpoint(tmp_path: Path, capsys) -> None:
    (tmp_path / "study.toml").write_text(STUDY)
    command = mbu_command("search", "study.toml", "--no-progress")
    worker = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoint = tmp_path / "runs" / "killed" / "trial-0" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert worker.poll() is None, worker.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    killed_at = torch.load(checkpoint, weights_only=True)["iteration"]
    assert 10 <= killed_at < 40

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name="killed", storage=storage)
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.RUNNING]  # as the kill left it

    # Relaunched at once, inside the grace period: it waits for the silent trial to be retried.
    summary = run_study(load_study_file(tmp_path / "study.toml"), LaunchOptions(progress=False))
    assert summary.states == {"FAIL": 1, "COMPLETE": 1}
    out = capsys.readouterr().out
    assert "trial 0 is RUNNING but its worker has been silent for" in out and "waiting" in out, out
    lost, retry = study.get_trials()
    assert lost.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.system_attrs["failed_trial"] == 0
    assert retry.user_attrs["resumed_from_iteration"] >= killed_at  # resumed, not started over
    final = torch.load(tmp_path / "runs" / "killed" / "trial-1" / "checkpoint.pt", weights_only=True)
    assert final["iteration"] == 40

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("killed").experiment_id])}
    assert runs["trial-0"].info.status == "FAILED" and "worker lost" in runs["trial-0"].data.tags["error"]
    assert runs["trial-1"].info.status == "FINISHED"
    assert runs["trial-1"].data.tags["resumed_from_iteration"] == str(retry.user_attrs["resumed_from_iteration"])
    assert all(r.info.status != "RUNNING" for r in runs.values())
