"""Several processes on one study: `--workers 2`, and two independent launches at once."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from helpers import DROP, mbu_command, study_runs, tiny_study
from mlflow.tracking import MlflowClient

from mbu.cli import main
from mbu.search.cluster.slurm_task import ArrayTask
from mbu.search.launching.launch import LaunchOptions, WorkerJob, launch_workers, prepare_for_workers, resolve_settings
from mbu.search.launching.sampler import SEED_ATTR
from mbu.search.studyfile.study_file import load_study_file


def assert_recorded_once(tmp_path: Path, name: str, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """Every trial complete, numbered 0..n-1, with exactly one MLflow child run each, none left RUNNING."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * n_trials
    assert sorted(t.number for t in trials) == list(range(n_trials))

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parents, children = study_runs(client, name)
    runs = parents + children
    assert len(parents) == 1
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == list(range(n_trials))
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    return trials


def assert_distinct_points(trials: list[optuna.trial.FrozenTrial]) -> None:
    """No trial drew another's parameters, and each says which seed it drew them with."""
    points = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(points)) == len(points), points
    seeds = [t.user_attrs[SEED_ATTR] for t in trials]
    assert len(set(seeds)) == len(seeds)


def assert_one_champion(tmp_path: Path, name: str) -> None:
    """Every launch that reached the target published; the registry holds one version, the best trial's."""
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert client.get_model_version_by_alias(name, "champion").run_id == study.best_trial.user_attrs["mlflow_run_id"]


@pytest.mark.slow
def test_two_workers_finish_a_six_trial_study_recording_each_trial_once(tmp_path: Path, capsys) -> None:
    (tmp_path / "study.toml").write_text(tiny_study("pair", 6, study={"seed": 2, "registered_model": DROP}))
    # What a SIGKILLed launcher leaves behind: its job file, named after a process that is gone.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "runs/pair/workers" / f"job-{socket.gethostname()}-{gone.stdout.strip()}.pickle"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a killed launcher")
    assert main(["search", "study.toml", "--workers", "2", "--no-progress"]) == 0
    assert "study pair: 6 COMPLETE" in capsys.readouterr().out
    assert not stale.exists() and not list(stale.parent.glob("job-*.pickle"))
    trials = assert_recorded_once(tmp_path, "pair", 6)
    assert_distinct_points(trials)  # a sampler seeded once per process gave 3 points, each twice
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took trials
    assert_one_champion(tmp_path, "pair")  # both workers and the launcher published, one at a time

    # A relaunch that tops the study up draws new points too.
    assert main(["search", "study.toml", "--n-trials", "8", "--no-progress"]) == 0
    assert_distinct_points(assert_recorded_once(tmp_path, "pair", 8))


@pytest.mark.slow
def test_two_launches_at_once_both_contribute_and_no_trial_is_recorded_twice(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(tiny_study("twice", 4, study={"seed": 2, "registered_model": DROP}))
    command = mbu_command("search", "study.toml", "--no-progress")
    launches = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in "ab"]
    outputs = [p.communicate(timeout=300)[0].decode() for p in launches]
    assert [p.returncode for p in launches] == [0, 0], outputs
    trials = assert_recorded_once(tmp_path, "twice", 4)
    assert_distinct_points(trials)
    assert {t.user_attrs["worker"].split(":")[1] for t in trials} == {str(p.pid) for p in launches}
    assert_one_champion(tmp_path, "twice")


@pytest.mark.slow
def test_workers_are_handed_the_resolved_study_so_a_new_override_reaches_them(tmp_path: Path) -> None:
    """A value the launcher resolved that no flag or worker code knows (here ``[train].iters`` replaced in
    memory, as a new override would) is what a ``--workers`` process and a SLURM task (its pickled
    :class:`ArrayTask`, run as the task runs it) train with; the study file says otherwise."""
    (tmp_path / "study.toml").write_text(tiny_study("handed", train={"iters": 3}))
    config = load_study_file(Path("study.toml"))
    overridden = replace(config, train={**config.train, "iters": 1})

    summary, ended = launch_workers(overridden, LaunchOptions(progress=False), workers=1)
    assert ended.codes == [0] and summary.states == {"COMPLETE": 1}
    assert json.loads((tmp_path / "runs/handed/trial-0/config.json").read_text())["iters"] == 1

    slurm = replace(overridden, study=replace(overridden.study, name="handed-slurm"))
    slurm = resolve_settings(slurm, LaunchOptions())
    assert prepare_for_workers(slurm, progress=False)
    task = pickle.loads(pickle.dumps(ArrayTask(WorkerJob(slurm, LaunchOptions(progress=False), "again"), 0)))
    assert task(0) == 0
    assert json.loads((tmp_path / "runs/handed-slurm/trial-0/config.json").read_text())["iters"] == 1
