"""The ask/tell runner: honest budgets, exit codes, one MLflow store per study, study plots, quiet output."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import optuna
import pytest
from helpers import mbu_command, study_runs, tiny_study
from mlflow.tracking import MlflowClient

from mbu.cli import main
from mbu.search.judging.study_report import PLOTS
from mbu.search.launching.launch import LaunchOptions, run_study
from mbu.search.studyfile.study_file import load_study_file

DIVERGING_SPACE = "\n[space.lr]\nlow = 1e11\nhigh = 1e12\nlog = true\n"  # every lr here makes the loss non-finite


def _trials(name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage="sqlite:///optuna.db").get_trials()


@pytest.mark.fresh_mlflow_store  # it checks that nothing creates the default store
def test_two_studies_in_one_process_log_only_to_their_own_stores(tmp_path: Path) -> None:
    for name in ("first", "second"):
        store = {"tracking_uri": f"sqlite:///{tmp_path / name}.db"}
        (tmp_path / f"{name}.toml").write_text(tiny_study(name, study=store, train={"iters": 2, "progress_iter": 1}))
        assert run_study(load_study_file(tmp_path / f"{name}.toml"), LaunchOptions(progress=False)).states == {
            "COMPLETE": 1
        }
    for name, other in (("first", "second"), ("second", "first")):
        client = MlflowClient(f"sqlite:///{tmp_path / name}.db")
        assert client.get_experiment_by_name(other) is None
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert sorted(r.info.run_name for r in runs) == [f"study-{name}", "trial-0"]
        assert all(r.info.status == "FINISHED" for r in runs)
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the default store


def test_a_failing_preset_does_not_use_up_the_budget(tmp_path: Path) -> None:
    study = tiny_study("budget", n_trials=2, train={"iters": 2, "progress_iter": 1}, lr_space=False)
    study += "\n[space.lr]\nlow = 1e-4\nhigh = 1e12\nlog = true\n"
    study += "".join(f"\n[[enqueue]]\nlr = {lr}\n" for lr in ("2e-4", "1e12", "3e-4"))
    (tmp_path / "study.toml").write_text(study)
    assert main(["search", "study.toml", "--no-progress"]) == 0
    states = [t.state for t in _trials("budget")]
    complete, fail = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
    assert states == [complete, fail, complete]  # the failed preset did not count towards n_trials = 2


def test_an_always_failing_study_stops_after_max_failures_and_lists_them(tmp_path: Path, capsys) -> None:
    study = tiny_study("doomed", n_trials=3, study={"max_failures": 2}, train={"iters": 4, "progress_iter": 2})
    (tmp_path / "study.toml").write_text(study.split("\n[space.lr]")[0] + DIVERGING_SPACE)
    assert main(["search", "study.toml", "--no-progress"]) == 1
    captured = capsys.readouterr()
    err = captured.err
    # Nothing completed, so nothing to confirm: no "not confirmed: mbu confirm ..." advice.
    assert "no trial has completed yet" in captured.out and "not confirmed" not in captured.out
    assert "stopped: 2 trials failed in a row" in err
    assert "  trial 0: NonFiniteLossError: non-finite loss" in err and "  trial 1: NonFiniteLossError" in err
    assert [t.state for t in _trials("doomed")] == [optuna.trial.TrialState.FAIL] * 2


def test_study_plots_are_written_shown_and_logged(tmp_path: Path) -> None:
    study = tiny_study("pictures", n_trials=2, train={"iters": 2, "progress_iter": 1})
    study += "\n[space.gama]\nlow = 1.0\nhigh = 10.0\n"
    (tmp_path / "study.toml").write_text(study)
    run_study(load_study_file(tmp_path / "study.toml"), LaunchOptions(progress=False))
    folder = tmp_path / "runs" / "pictures"
    for name in PLOTS:
        assert (folder / name).read_bytes().startswith(b"\x89PNG"), name
    markdown = (folder / "study_report.md").read_text()
    assert all(f"]({name})" in markdown for name in PLOTS)
    study = optuna.load_study(study_name="pictures", storage="sqlite:///optuna.db")
    assert study.metric_names == ["val/iou_best"]
    report = json.loads((folder / "study_report.json").read_text())
    assert report["objective"] == "val/iou_best" and report["plots"] == list(PLOTS)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = study_runs(client, "pictures").parents
    assert set(PLOTS) <= {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_search_is_quiet_by_default_and_verbose_on_request(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(tiny_study("hush", train={"iters": 2, "progress_iter": 1}))
    command = mbu_command("search", "study.toml", "--no-progress")
    quiet = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    for noise in ("ExperimentalWarning", "A new study created", "INFO mlflow"):
        assert noise not in quiet.stdout + quiet.stderr, noise
    assert "study hush: 1 COMPLETE" in quiet.stdout
    (tmp_path / "loud").mkdir()
    (tmp_path / "loud" / "study.toml").write_text((tmp_path / "study.toml").read_text())
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'loud' / 'mlflow.db'}"}
    loud = subprocess.run([*command, "-v"], cwd=tmp_path / "loud", capture_output=True, text=True, timeout=300, env=env)
    assert loud.returncode == 0 and "A new study created" in loud.stderr, loud.stderr
