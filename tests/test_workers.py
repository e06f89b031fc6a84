"""Several processes on one study: `--workers 2`, and two independent launches at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from conftest import tiny_study
from mlflow.tracking import MlflowClient

from mbu.cli import main


def assert_recorded_once(tmp_path: Path, name: str, n_trials: int) -> None:
    """Every trial complete, numbered 0..n-1, with exactly one MLflow child run each, none left RUNNING."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * n_trials
    assert sorted(t.number for t in trials) == list(range(n_trials))

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    children = [r for r in runs if r.data.tags.get("role") != "study-parent"]
    parents = [r for r in runs if r.data.tags.get("role") == "study-parent"]
    assert len(parents) == 1
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == list(range(n_trials))
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]


def test_two_workers_finish_a_six_trial_study_recording_each_trial_once(tmp_path: Path, capsys) -> None:
    (tmp_path / "study.toml").write_text(tiny_study("pair", 6, study="seed = 2\n"))
    assert main(["search", "study.toml", "--workers", "2", "--no-progress"]) == 0
    assert "study pair: 6 COMPLETE" in capsys.readouterr().out
    assert_recorded_once(tmp_path, "pair", 6)
    logs = [(tmp_path / "runs" / "pair" / "workers" / f"worker-{i}.log").read_text() for i in range(2)]
    # Both workers took trials (each prints the study summary it saw at the end).
    assert all("study pair:" in log for log in logs), logs


def test_two_launches_at_once_both_contribute_and_no_trial_is_recorded_twice(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(tiny_study("twice", 4, study="seed = 2\n"))
    command = [sys.executable, "-m", "mbu", "search", "study.toml", "--no-progress"]
    launches = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in "ab"]
    outputs = [p.communicate(timeout=300)[0].decode() for p in launches]
    assert [p.returncode for p in launches] == [0, 0], outputs
    assert_recorded_once(tmp_path, "twice", 4)
