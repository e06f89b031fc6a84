"""Studies on a real SLURM: ``mbu search --slurm`` on a throwaway one-node cluster (tests/slurm_cluster.py).

An array of workers against PostgreSQL and an MLflow server; a task cancelled
mid-trial; a task that reaches its time limit and is requeued. Skipped where
SLURM is not installed, unless MBU_REQUIRE_SLURM=1 (set by `.ci/run`).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from helpers import TrackingServer, mbu_command, study_runs, tiny_study
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from slurm_cluster import SlurmCluster, missing

from mbu.cli import main
from mbu.train.checkpoint import load_checkpoint

# One cluster: every test of this file in one test process. Each takes 1-2 minutes.
pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.slow]

REASON = missing()
if REASON is not None and os.environ.get("MBU_REQUIRE_SLURM") != "1":
    pytest.skip(REASON, allow_module_level=True)

# Heartbeats every 2 s: a task killed before it could stop is noticed within the grace period.
FAST_HEARTBEATS = {"heartbeat_interval": 2, "grace_period": 10}
# One core per task: two tasks fit the CI machine's two cores.
ONE_CORE = ["--cpus-per-task", "1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    assert REASON is None, f"MBU_REQUIRE_SLURM=1 but {REASON}"
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_env(slurm: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlurmCluster]:
    """The cluster, with its SLURM_CONF in this test's environment (so in mbu's and in the tasks')."""
    for name, value in slurm.env.items():
        monkeypatch.setenv(name, value)
    yield slurm
    slurm.cancel_all()  # a failed test's tasks must not hold the node's cores for the next test


def mbu_search(cwd: Path, *args: str) -> subprocess.Popen:
    command = mbu_command("search", "study.toml", "--no-progress", *args)
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(
    process: subprocess.Popen, cluster: SlurmCluster, cwd: Path, timeout: float = 600, expect_code: int = 0
) -> str:
    """The launch's output once it has ended; on another exit code, the task logs and the daemons' too."""
    try:
        output = process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0] + "\n(timed out)"
    if process.returncode != expect_code:
        logs = [f"--- {p.name}\n{p.read_text()}" for p in sorted(cwd.glob("runs/*/slurm/*_log.out"))]
        pytest.fail(f"exit {process.returncode}\n{output}\n" + "\n".join(logs) + "\n" + cluster.logs())
    return output


def job_id_of(output: str) -> str:
    found = re.search(r"submitted array job (\d+)", output)
    assert found, output
    return found.group(1)


def test_a_four_trial_study_runs_as_a_two_task_array_against_postgresql_and_an_mlflow_server(
    tmp_path: Path, slurm_env: SlurmCluster, postgres_url: str, tracking_server: TrackingServer, capsys
) -> None:
    (tmp_path / "study.toml").write_text(tiny_study("array", 4, study=FAST_HEARTBEATS))
    stores = ["--storage", postgres_url, "--tracking-uri", tracking_server.uri]
    output = finish(mbu_search(tmp_path, "--slurm", "--tasks", "2", *ONE_CORE, "--wait", *stores), slurm_env, tmp_path)
    job_id = job_id_of(output)
    assert "study array: 4 COMPLETE" in output
    assert "sacct" not in output and "UNKNOWN" not in output  # no accounting: states come from squeue
    assert f"slurm job {job_id} task 1: COMPLETED" in output

    trials = optuna.load_study(study_name="array", storage=postgres_url).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]

    client = MlflowClient(tracking_server.uri)
    parents, children = study_runs(client, "array")
    assert len(parents) == 1
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == [0, 1, 2, 3]
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.info.status == "FINISHED" for r in children + parents)
    assert {r.data.tags["slurm_array_job_id"] for r in children} == {job_id}
    assert {r.data.tags["slurm_array_task_id"] for r in children} <= {"0", "1"}
    assert all(r.data.tags["slurm_job_id"] for r in children)

    capsys.readouterr()
    assert main(["search", "study.toml", "--summary", *stores]) == 0
    summary = capsys.readouterr().out
    assert f"slurm array job {job_id}: 2 tasks" in summary
    assert "task 0: COMPLETED" in summary and "task 1: COMPLETED" in summary


def wait_for_checkpoint(study_dir: Path, process: subprocess.Popen, timeout: float = 300) -> Path:
    """The first trial folder holding a checkpoint (its trial is mid-training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        found = sorted(study_dir.glob("trial-*/checkpoint.pt"))
        if found and (found[0].parent / "mlflow_run.json").is_file():
            return found[0].parent
        time.sleep(0.5)
    raise AssertionError(f"no trial wrote a checkpoint (launch exit code {process.poll()})")


def assert_resumed(study: optuna.Study, first: int, reason: str) -> list[optuna.trial.FrozenTrial]:
    """Trial ``first`` was stopped (error containing ``reason``) and retried until a retry completed.

    Returns the tries, first to last: each stopped one recorded FAIL, each retry resumed from the
    checkpoint its predecessor wrote when it stopped.
    """
    trials = {t.number: t for t in study.get_trials()}
    with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
        history = {t.number: RetryHeartbeatStaleTrialCallback.retry_history(t) for t in trials.values()}
    last = [t for t in trials.values() if t.state == optuna.trial.TrialState.COMPLETE and first in history[t.number]]
    assert len(last) == 1, trials
    tries = [trials[n] for n in [*history[last[0].number], last[0].number]]
    assert tries[0].number == first
    for before, after in itertools.pairwise(tries):
        assert before.state == optuna.trial.TrialState.FAIL and reason in before.user_attrs["error"], before
        checkpoint = load_checkpoint(Path(f"runs/{study.study_name}/trial-{before.number}"))
        assert after.user_attrs["resumed_from_iteration"] == int(checkpoint["iteration"]) > 0
    return tries


def test_a_task_cancelled_mid_trial_leaves_its_trial_to_resume_from_its_checkpoint(
    tmp_path: Path, slurm_env: SlurmCluster
) -> None:
    # SQLite on this one-node cluster (--single-node); trials of ~10 s, a checkpoint every 5 iterations.
    train = {"iters": 20, "progress_iter": 5, "save_iter": 5}
    (tmp_path / "study.toml").write_text(
        tiny_study("cancel", 2, study={**FAST_HEARTBEATS, "max_retry": 2}, train=train)
    )
    launch = mbu_search(tmp_path, "--slurm", "--single-node", "--tasks", "2", *ONE_CORE, "--wait")
    trial_dir = wait_for_checkpoint(tmp_path / "runs" / "cancel", launch)
    run_id = json.loads((trial_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    tags = client.get_run(run_id).data.tags
    task = f"{tags['slurm_array_job_id']}_{tags['slurm_array_task_id']}"
    subprocess.run(["scancel", task], check=True)
    output = finish(launch, slurm_env, tmp_path)
    assert f"slurm job {tags['slurm_array_job_id']} task {tags['slurm_array_task_id']}: CANCELLED" in output

    stopped = int(trial_dir.name.split("-")[1])
    study = optuna.load_study(study_name="cancel", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    # scancel's SIGTERM stopped the worker: it checkpointed and recorded the trial itself (no lost heartbeat).
    _, retry = assert_resumed(study, stopped, "stopped: SIGTERM")
    states = sorted(t.state.name for t in study.get_trials())
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]

    parents, children = study_runs(client, "cancel")
    assert len(parents) == 1
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == sorted(t.number for t in study.get_trials())
    by_number = {int(r.data.tags["trial_number"]): r for r in children}
    assert by_number[stopped].info.status == "FAILED" and by_number[stopped].data.tags["state"] == "FAIL"
    assert by_number[retry.number].info.status == "FINISHED"


def test_a_task_reaching_its_time_limit_is_requeued_resumes_its_trial_and_stops_at_max_requeue(
    tmp_path: Path, slurm_env: SlurmCluster
) -> None:
    # A 2-minute limit and SIGUSR2 60 s before it; SLURM checks limits once a minute on its own clock, so each
    # run of the task trains for 25-85 s. The trial is far longer than any run, whatever the machine's speed:
    # run 1 is stopped and requeued, run 2 resumes from run 1's checkpoint, is stopped again and, at
    # max_requeue = 1, is not requeued. The launch then ends short of its target, with the retry still queued.
    train = {"iters": 100000, "progress_iter": 10, "save_iter": 100000}
    (tmp_path / "study.toml").write_text(tiny_study("limit", 1, study=FAST_HEARTBEATS, train=train))
    limits = ["--time-min", "2", "--signal-delay-s", "60", "--max-requeue", "1"]
    launch = mbu_search(tmp_path, "--slurm", "--single-node", "--tasks", "1", *ONE_CORE, *limits, "--wait")
    output = finish(launch, slurm_env, tmp_path, timeout=600, expect_code=1)
    job_id = job_id_of(output)
    assert "PENDING (BeginTime)" in output  # the requeued task waiting to start again
    assert "the array ended with 0 of 1 trials finished" in output, output
    log = (tmp_path / "runs" / "limit" / "slurm" / f"{job_id}_0_log.out").read_text()
    assert f"requeueing job {job_id} (requeued 0 times before)" in log, log
    assert "task 0: not requeued: requeued 1 times already ([slurm].max_requeue)" in log, log
    assert log.count("requeueing job") == 1, log

    study = optuna.load_study(study_name="limit", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "WAITING"], trials
    for stopped in trials[:2]:
        assert "stopped: SLURM SIGUSR2" in stopped.user_attrs["error"], stopped.user_attrs
    # Run 2 resumed where run 1 stopped; the queued retry will resume where run 2 stopped (a later iteration).
    first = int(load_checkpoint(tmp_path / "runs" / "limit" / "trial-0")["iteration"])
    second = int(load_checkpoint(tmp_path / "runs" / "limit" / "trial-1")["iteration"])
    assert trials[1].user_attrs["resumed_from_iteration"] == first > 0
    assert second > first
    assert trials[2].params == trials[0].params  # a retry keeps its trial's parameters

    # One MLflow run per try, each in its own run of the task: the requeue count grows along the chain.
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    children = study_runs(client, "limit").trials
    by_number = {int(r.data.tags["trial_number"]): r for r in children}
    assert sorted(by_number) == [0, 1]
    assert [by_number[n].data.tags.get("slurm_restart_count", "0") for n in (0, 1)] == ["0", "1"]
    assert {r.data.tags["slurm_job_id"] for r in children} == {job_id}
    assert [by_number[n].info.status for n in (0, 1)] == ["FAILED", "FAILED"]
