"""Populations: K trials in one worker process, each exactly the trial it would be alone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from helpers import changed, mbu_command, study_runs, tiny_tables, toml_text
from mlflow.tracking import MlflowClient

from mbu.cli import main
from mbu.search.launching.launch import LaunchOptions, run_study
from mbu.search.studyfile.study_file import load_study_file

COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL


def population_tables(
    name: str, n_trials: int, lrs: list[float], population: int, study: dict | None = None, train: dict | None = None
) -> dict:
    """A tiny study whose first trials are the given learning rates; losses logged every iteration."""
    return tiny_tables(
        name,
        n_trials,
        study={"population": population, **(study or {})},
        train=train or {"iters": 6, "progress_iter": 1},
        space={"lr": {"low": 1e-5, "high": 1e12, "log": True}},
        **({"enqueue": [{"lr": lr} for lr in lrs]} if lrs else {}),
    )


def study_text(*args, **kwargs) -> str:
    return toml_text(population_tables(*args, **kwargs))


@pytest.fixture
def deterministic() -> Iterator[None]:
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def run(tmp_path: Path, text: str) -> optuna.Study:
    path = tmp_path / f"{text.split(chr(34))[1]}.toml"
    path.write_text(text)
    run_study(load_study_file(path), LaunchOptions(progress=False))
    return optuna.load_study(study_name=path.stem, storage="sqlite:///optuna.db")


def losses(trial: optuna.trial.FrozenTrial) -> list[tuple[int, float]]:
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    history = client.get_metric_history(trial.user_attrs["mlflow_run_id"], "train/loss_total")
    return sorted((m.step, m.value) for m in history)


def weights(tmp_path: Path, study: str, number: int) -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / "runs" / study / f"trial-{number}" / "checkpoint.pt", weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights differ: {different[:5]}"


@pytest.mark.slow
def test_a_trial_in_a_population_of_3_is_bit_identical_to_it_alone(tmp_path: Path, deterministic: None) -> None:
    lrs = [1e-4, 3e-4, 1e-3]
    together = run(tmp_path, study_text("together", 3, lrs, population=3))
    alone = run(tmp_path, study_text("alone", 1, lrs[1:2], population=1))

    trials = together.get_trials()
    assert [t.state for t in trials] == [COMPLETE] * 3
    solo = alone.get_trials()[0]
    (same,) = [t for t in trials if t.params["lr"] == 3e-4]
    assert len(losses(same)) == 6 and losses(same) == losses(solo)  # every iteration's loss, bit for bit
    assert same.value == solo.value
    assert_same_weights(weights(tmp_path, "together", same.number), weights(tmp_path, "alone", 0))
    # The three trials are three trainings, not one: their weights differ.
    first, last = (weights(tmp_path, "together", t.number) for t in (trials[0], trials[2]))
    assert not torch.equal(first["disc.net.0.weight"], last["disc.net.0.weight"])

    # MLflow: one run per trial, each with its own parameters, metrics, tags and report.
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    children = study_runs(client, "together").trials
    assert sorted(r.info.run_name for r in children) == ["trial-0", "trial-1", "trial-2"]
    assert {float(r.data.params["lr"]) for r in children} == set(lrs)
    for trial in trials:
        run_ = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run_.info.status == "FINISHED" and run_.data.tags["trial_number"] == str(trial.number)
        assert run_.data.metrics["test/iou"] == pytest.approx(trial.user_attrs["test/iou"])
        assert "report.json" in {a.path for a in client.list_artifacts(run_.info.run_id)}


@pytest.mark.slow
def test_a_diverging_slot_fails_alone_and_takes_the_next_trial(tmp_path: Path) -> None:
    # Slots: trial 0 (diverges at its first log) and trial 1; trial 2 takes trial 0's slot.
    lrs = [1e12, 3e-4, 1e-3]
    train = {"iters": 8, "progress_iter": 2}
    together = run(tmp_path, study_text("nan", 2, lrs, population=2, train=train))
    alone = run(tmp_path, study_text("solo", 1, lrs[1:2], population=1, train=train))

    diverged, kept, next_ = together.get_trials()
    assert (diverged.state, kept.state, next_.state) == (FAIL, COMPLETE, COMPLETE)
    assert "non-finite loss at iteration 2" in diverged.user_attrs["error"]
    assert losses(kept) == losses(alone.get_trials()[0])  # the other slot's losses unchanged
    assert_same_weights(weights(tmp_path, "nan", 1), weights(tmp_path, "solo", 0))
    # The next trial started while trial 1 was mid-way, and ran to its own end.
    assert [step for step, _ in losses(next_)] == [2, 4, 6, 8]
    assert next_.datetime_start < kept.datetime_complete


def test_failures_in_a_row_stop_the_asking_even_if_a_trial_in_flight_then_completes(tmp_path: Path) -> None:
    # Trial 0 diverges; trial 2 takes its slot and diverges too (2 in a row) while trial 1 trains on.
    text = study_text("failing", 3, [1e12, 3e-4, 1e12, 1e12], population=2, study={"max_failures": 2},
                      train={"iters": 8, "progress_iter": 2})  # fmt: skip
    (tmp_path / "study.toml").write_text(text)
    assert main(["search", "study.toml", "--no-progress"]) == 1
    trials = optuna.load_study(study_name="failing", storage="sqlite:///optuna.db").get_trials()
    # Trial 1 completed after the second failure; no trial 3 was asked for.
    assert [t.state for t in trials[:3]] == [FAIL, COMPLETE, FAIL]
    assert all(t.state == optuna.trial.TrialState.WAITING for t in trials[3:])


KILLED_ITERS = 20  # a checkpoint at 10: the kill lands while the first trial trains its second half
KILLED = population_tables(
    "killed",
    2,
    [2e-4, 5e-4],
    population=2,
    study={"heartbeat_interval": 1, "grace_period": 2},
    train={"iters": KILLED_ITERS, "progress_iter": 10, "save_iter": 10},
)


def start_worker(tmp_path: Path, text: str, ready: str) -> tuple[subprocess.Popen, list[Path]]:
    """``mbu search`` on ``text`` in a process of its own, once trials 0 and 1 both hold the file ``ready``."""
    (tmp_path / "study.toml").write_text(text)
    command = mbu_command("search", "study.toml", "--no-progress")
    worker = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    name = text.split('"')[1]
    folders = [tmp_path / "runs" / name / f"trial-{n}" for n in (0, 1)]
    deadline = time.monotonic() + 180
    while not all((folder / ready).exists() for folder in folders):
        assert worker.poll() is None, worker.stdout.read().decode()
        assert time.monotonic() < deadline, f"the population's trials wrote no {ready}"
        time.sleep(0.05)
    return worker, [folder / "checkpoint.pt" for folder in folders]


@pytest.mark.slow
def test_a_killed_population_worker_has_all_its_trials_resumed(tmp_path: Path) -> None:
    worker, checkpoints = start_worker(tmp_path, toml_text(KILLED), ready="checkpoint.pt")
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    killed_at = [torch.load(c, weights_only=True)["iteration"] for c in checkpoints]
    assert all(10 <= i < KILLED_ITERS for i in killed_at)
    time.sleep(3)  # past the grace period: both trials' heartbeats have stopped

    assert main(["search", "study.toml", "--no-progress"]) == 0
    trials = optuna.load_study(study_name="killed", storage="sqlite:///optuna.db").get_trials()
    assert [t.state for t in trials] == [FAIL, FAIL, COMPLETE, COMPLETE]
    for retry in trials[2:]:
        lost = retry.system_attrs["failed_trial"]
        assert retry.user_attrs["resumed_from_iteration"] >= killed_at[lost]
        assert retry.params == trials[lost].params
        final = torch.load(tmp_path / "runs" / "killed" / f"trial-{retry.number}" / "checkpoint.pt", weights_only=True)
        assert final["iteration"] == KILLED_ITERS


@pytest.mark.slow
def test_sigterm_checkpoints_the_population_and_a_relaunch_resumes_it(tmp_path: Path) -> None:
    # No periodic checkpoint (save_iter > iters): any checkpoint is the stop's own. max_retry = 0: a stop
    # from outside is queued to resume all the same.
    text = toml_text(changed(KILLED, {"study": {"name": "stopped", "max_retry": 0}, "train": {"save_iter": 1000}}))
    worker, checkpoints = start_worker(tmp_path, text, ready="config.json")
    time.sleep(1)  # both trials are training
    worker.send_signal(signal.SIGTERM)
    output = worker.communicate(timeout=60)[0].decode()
    assert worker.returncode == 75, output
    assert "stopped by SIGTERM" in output

    study = optuna.load_study(study_name="stopped", storage="sqlite:///optuna.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [FAIL, FAIL, optuna.trial.TrialState.WAITING, optuna.trial.TrialState.WAITING]
    saved = []
    for trial, checkpoint in zip(trials[:2], checkpoints, strict=True):
        error = trial.user_attrs["error"]
        match = re.fullmatch(r"stopped: SIGTERM; checkpoint at iteration (\d+), queued to resume", error)
        assert match, error
        saved.append(torch.load(checkpoint, weights_only=True)["iteration"])
        assert saved[-1] == int(match[1]) < KILLED_ITERS  # the stop wrote it, at the iteration it names
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    for trial in trials[:2]:
        assert client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "FAILED"

    assert main(["search", "study.toml", "--no-progress"]) == 0
    trials = study.get_trials()
    assert [t.state for t in trials] == [FAIL, FAIL, COMPLETE, COMPLETE]
    for retry in trials[2:]:
        # Resumed exactly where the stop checkpointed it: nothing trained twice.
        assert retry.user_attrs["resumed_from_iteration"] == saved[retry.system_attrs["failed_trial"]]


def test_population_must_be_a_positive_integer(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text(study_text("bad", 1, [], population=0))
    with pytest.raises(ValueError, match=r"\[study\].population must be a positive integer"):
        load_study_file(tmp_path / "bad.toml")
    (tmp_path / "ok.toml").write_text(study_text("ok", 1, [], population=1))
    with pytest.raises(ValueError, match="--population must be a positive integer"):
        run_study(load_study_file(tmp_path / "ok.toml"), LaunchOptions(population=-2, progress=False))
