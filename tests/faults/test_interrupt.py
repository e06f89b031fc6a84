"""Fault: Ctrl-C during a study. No MLflow run is left RUNNING; a relaunch resumes the study."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from helpers import TINY_DATA_AND_TRAIN, mbu_command_with_ctrl_c
from mlflow.tracking import MlflowClient

import mbu.search.running.tracking
from mbu.cli import main
from mbu.evaluate.segmentation import load_test_annotations
from mbu.search.launching.launch import LaunchOptions, prepare_data, resolve_settings
from mbu.search.running.population import Population
from mbu.search.studyfile.study_file import load_study_file
from mbu.train.stop import StopRequest, interrupts_held, signals_stop
from mbu.train.tracking import Recorder

STUDY = """
[study]
name = "interrupted"
n_trials = 1

{TINY_DATA_AND_TRAIN}iters = {iters}
progress_iter = 2
device = "cpu"
""".replace("{TINY_DATA_AND_TRAIN}", TINY_DATA_AND_TRAIN)


@pytest.mark.slow
def test_ctrl_c_leaves_no_running_run_and_relaunch_resumes(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(STUDY.format(iters=16))
    mbu = mbu_command_with_ctrl_c("search", "study.toml", "--no-progress")
    proc = subprocess.Popen(mbu, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_file = tmp_path / "runs" / "interrupted" / "trial-0" / "mlflow_run.json"
    deadline = time.monotonic() + 120
    while not run_file.exists():  # the trial's MLflow run has started
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the trial never started"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # mid-trial: its run exists, and 16 iterations are ahead of it
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode != 0, output

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("interrupted")
    runs = client.search_runs([experiment.experiment_id])
    assert runs and all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    trial_run = next(r for r in runs if r.info.run_name == "trial-0")
    assert trial_run.info.status == "FAILED" and "KeyboardInterrupt" in trial_run.data.tags["error"]

    # The interrupted trial is recorded as failed; a relaunch finishes the study.
    assert main(["search", "study.toml", "--no-progress"]) == 0  # the relaunch, in this process
    study = optuna.load_study(study_name="interrupted", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]


@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT raises KeyboardInterrupt in this process during the test, as in a terminal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_is_held_to_the_end_of_the_block_then_raised(ctrl_c_interrupts: None) -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            reached.append("after the signal")
        reached.append("after the block")
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_in_a_held_block_interrupts_at_once(ctrl_c_interrupts: None) -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            reached.append("after the first")
            signal.raise_signal(signal.SIGINT)
            reached.append("after the second")
    assert reached == ["after the first"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_ctrl_c_under_a_stop_handler_asks_for_the_stop() -> None:
    stop = StopRequest()
    with signals_stop(stop.request, signal.SIGINT):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            assert stop() is None  # held
        assert stop() == "SIGINT"  # the block's end passed it on; no exception: the stop handler's own way
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the next Ctrl-C interrupts


def test_ignored_ctrl_c_stays_ignored_in_a_held_block() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_the_trial_run_is_being_tagged_leaves_it_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ctrl_c_interrupts: None
) -> None:
    """The instant the run file appears the run is open but not yet the trial's: a Ctrl-C there must not lose it."""
    (tmp_path / "study.toml").write_text(STUDY.format(iters=4))
    config = resolve_settings(load_study_file(tmp_path / "study.toml"), LaunchOptions())
    annotated = load_test_annotations(prepare_data(config, progress=False), 64, progress=False)
    study = optuna.create_study(direction="maximize")
    parent = Recorder.start(os.environ["MLFLOW_TRACKING_URI"], "interrupted", "launch")
    population = Population(study, config, annotated, parent, progress=False)

    real_params = mbu.search.running.tracking.train_params

    def params_then_ctrl_c(cfg):  # the signal lands between the run file and the run's parameters
        assert (Path(cfg.out) / "mlflow_run.json").is_file()
        signal.raise_signal(signal.SIGINT)
        return real_params(cfg)

    monkeypatch.setattr(mbu.search.running.tracking, "train_params", params_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        population.start(study.ask())

    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.FAIL
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("KeyboardInterrupt")
    assert run.data.params  # the held Ctrl-C let the run be completed before it was closed
