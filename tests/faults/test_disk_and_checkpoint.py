"""Faults while writing: a process killed mid-checkpoint, and a disk that is full (a file-size limit)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from helpers import mbu_command, tiny_study, tiny_train_config
from mlflow.tracking import MlflowClient

from mbu.cli import main
from mbu.train.checkpoint import load_checkpoint
from mbu.train.loop import train


def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(tiny_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = mbu_command("train", "--root", str(tiny_root), "--out", str(run), "--no-progress")
    command += ["--resize", "64", "--bs", "4", "--iters", "40", "--save_iter", "1", "--device", "cpu"]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ((run / "checkpoint.pt").exists() and [p for p in run.glob(".checkpoint.pt.*.tmp") if p.stat().st_size]):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "never caught a checkpoint being written"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # mid-write: the temporary file is half written
    proc.wait(timeout=30)
    assert list(run.glob(".checkpoint.pt.*.tmp")), "the kill should leave the half-written temporary file"

    state = load_checkpoint(run)  # the previous checkpoint, whole
    done = int(state["iteration"])
    assert 1 <= done < 40
    resumed = train(tiny_train_config(tiny_root, tmp_path / "resumed", load=str(run), iters=done + 2), progress=False)
    assert resumed.iterations == done + 2


# max_failures = 1: the launch stops at the first failed trial (failed trials do not count towards n_trials).
STUDY = tiny_study("full", study={"max_failures": 1}, train={"iters": 2, "progress_iter": 1})

FILE_SIZE_LIMIT = 64 * 2**20  # smaller than a checkpoint (about 250 MB at 64 px), larger than the databases


def _small_disk() -> None:
    """In the child: files may not grow past the limit, and the write fails instead of killing it."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.slow
def test_full_disk_fails_the_trial_clearly_and_keeps_earlier_trials(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(STUDY)
    assert main(["search", "study.toml", "--no-progress"]) == 0  # the healthy launch, in this process
    command = mbu_command("search", "study.toml", "--no-progress")
    trial0 = tmp_path / "runs" / "full" / "trial-0"
    before = (trial0 / "checkpoint.pt").stat().st_size

    full = subprocess.run(
        [*command, "--n-trials", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=_small_disk
    )
    assert full.returncode == 1, full.stdout + full.stderr  # stopped on the failed trial, which it lists
    assert "trial 1: WriteError: cannot write" in full.stderr

    study = optuna.load_study(study_name="full", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("full").experiment_id])}
    error = runs["trial-1"].data.tags["error"]
    assert runs["trial-1"].info.status == "FAILED" and error.startswith("WriteError: cannot write")
    assert "checkpoint.pt" in error and "MiB free" in error
    assert runs["trial-0"].info.status == "FINISHED"
    assert (trial0 / "checkpoint.pt").stat().st_size == before and load_checkpoint(trial0)["iteration"] == 2
    assert not list((tmp_path / "runs" / "full" / "trial-1").glob(".*.tmp"))  # no half-written leftovers


def _tiny_disk() -> None:
    """In the child: no file may grow past 64 bytes (an output PNG is larger); the write fails, not the process."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_full_disk_under_mbu_remove_is_one_line_and_leaves_no_truncated_output(
    tmp_path: Path, tiny_root: Path
) -> None:
    run = tmp_path / "run"
    train(tiny_train_config(tiny_root, run, iters=1), progress=False)
    image = sorted((tiny_root / "testA").iterdir())[0]
    command = mbu_command("remove", "--run", str(run), "--input", str(image), "--out", "out", "--device", "cpu")
    full = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=_tiny_disk)
    assert full.returncode == 2, full.stderr
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mbu remove: error: cannot write") and "MiB free" in lines[0]
    assert list((tmp_path / "out").iterdir()) == []  # no 0-byte or half PNG to block the rerun
    assert subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0  # room again
    assert (tmp_path / "out" / f"{image.stem}.png").stat().st_size > 64
