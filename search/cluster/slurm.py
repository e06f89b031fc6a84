"""Studies on a SLURM cluster: one array job of ordinary study workers, submitted through submitit.

``mbu search STUDY --slurm`` prepares the study on the submitting node exactly
as ``--workers`` does (data, decode cache, study, parent run, under the launch
lock), then submits one array job of ``[slurm].tasks`` tasks. Each task runs
one ordinary worker of the study (the arguments ``--workers`` gives its
processes), inside the task's own process so that SLURM's signals reach it:

- SIGUSR2 (submitit's signal), sent ``signal_delay_s`` before the time limit
  (``--signal=USR2@N``) or by hand for a preemption warning: the worker stops
  (its trials write a checkpoint and are queued to resume), then the task
  requeues itself (``scontrol requeue``, at most ``max_requeue`` times);
- SIGTERM (``scancel``, the end of a preemption grace time): the worker stops
  the same way and the task ends; SLURM requeues a preempted task itself (the
  array is submitted ``--requeue``).

A task killed before it could stop loses its heartbeats; a live worker then
retries its trial from the same checkpoint. Task states come from ``squeue``,
never from accounting (``sacct`` needs a ``slurmdbd`` that many clusters and
the tests lack); the study's state comes from its storage. Everything the
array writes goes to ``runs/<study>/slurm/``: one log per task
(``<job>_<task>_0_log.out``), submitit's pickles, and ``job.json``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mbu.base.urls import url_scheme
from mbu.search.cluster.slurm_task import ArrayTask
from mbu.search.judging.study_report import StudySummary
from mbu.search.launching.launch import LaunchOptions, WorkerJob, launch_summary, prepare_for_workers, resolve_settings
from mbu.search.launching.storage import load_existing_study
from mbu.search.studyfile.slurm_settings import SlurmSettings, slurm_problem
from mbu.search.studyfile.study_file import StudyConfig

LOG_FOLDER = "slurm"  # runs/<study>/slurm/
JOB_RECORD = "job.json"  # in LOG_FOLDER: the last array submitted for this study
POLL_SECONDS = 5  # --wait: seconds between two squeue calls
# squeue states after which a task does nothing more (a requeued task goes back to PENDING instead).
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY",
         "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}  # fmt: skip
INSTALL_HINT = 'pip install -e ".[slurm]" (or pip install submitit)'


class SubmititMissing(ValueError):
    """``--slurm`` where submitit is not installed."""


def import_submitit() -> Any:
    """The submitit module, or a one-line error saying what to install."""
    try:
        import submitit
    except ImportError as err:
        raise SubmititMissing(f"--slurm needs submitit, which is not installed: {INSTALL_HINT}") from err
    return submitit


def log_folder(config: StudyConfig) -> Path:
    """``runs/<study>/slurm/``, absolute: the tasks' logs are written by other nodes."""
    return (config.study_dir / LOG_FOLDER).resolve()


def resolve_slurm(settings: SlurmSettings, overrides: dict[str, Any]) -> SlurmSettings:
    """Flags over the ``[slurm]`` table: values replace its own, ``sbatch`` and ``setup`` lines are added."""
    values = {}
    for key, value in overrides.items():
        if value is None or value is False or value == []:
            continue  # flag not given
        values[key] = getattr(settings, key) + value if key in ("sbatch", "setup") else value
    resolved = replace(settings, **values)
    problem = slurm_problem(resolved)
    if problem is not None:
        key, message = problem
        raise ValueError(f"--{key.replace('_', '-')} (over [slurm].{key}) {message}")
    return resolved


def check_shared_stores(storage: str, tracking_uri: str, settings: SlurmSettings) -> None:
    """Refuse SQLite stores for an array that may span nodes: SQLite's file locks are not safe over NFS."""
    for what, url in (("Optuna storage", storage), ("MLflow tracking store", tracking_uri)):
        if url_scheme(url) == "sqlite" and not settings.single_node:
            raise ValueError(
                f"--slurm with the SQLite {what} {url}: tasks on several nodes would share one SQLite file, "
                "and file locking over a shared filesystem is not safe; use PostgreSQL and an MLflow server "
                "(--storage postgresql://..., --tracking-uri http://...), or pass --single-node "
                "([slurm].single_node = true) if the partition is one node"
            )


def sbatch_parameters(config: StudyConfig) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for the array's tasks."""
    settings = config.slurm
    extra: dict[str, Any] = {"requeue": True, "chdir": os.getcwd()}  # same folder as here: relative paths hold
    for option in settings.sbatch:
        name, _, value = option[2:].partition("=")
        extra[name] = value if value else True
    parameters: dict[str, Any] = {
        "job_name": f"mbu-{config.study.name}",
        "time": settings.time_min,
        "cpus_per_task": settings.cpus_per_task,
        "signal_delay_s": settings.signal_delay_s,
        "stderr_to_stdout": True,  # one log per task
        # torch sizes its thread pool from OMP_NUM_THREADS: the task's cores, not the node's.
        "setup": ["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}", *settings.setup],
        "additional_parameters": extra,
    }
    if settings.partition:
        parameters["partition"] = settings.partition
    if settings.gpus_per_task:
        parameters["gpus_per_node"] = settings.gpus_per_task  # one task per node in each array job
    if settings.mem_gb:
        parameters["mem"] = f"{int(settings.mem_gb * 1024)}MB"
    return parameters


def check_controller() -> None:
    """A submit host whose controller answers, checked before the study is prepared (minutes of work)."""
    if shutil.which("sbatch") is None:
        raise ValueError("--slurm: sbatch is not on PATH: run this on a SLURM submit (login) node")
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # SLURM itself retries such a file for a minute before saying so
        raise ValueError(f"--slurm: SLURM_CONF is {conf}, which is not a file")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ValueError(f"--slurm: the SLURM controller does not answer (scontrol ping: {err})") from err
    last_line = ((ping.stdout + ping.stderr).strip().splitlines() or [""])[-1]
    if ping.returncode != 0 or "DOWN" in ping.stdout:
        raise ValueError(f"--slurm: the SLURM controller does not answer (scontrol ping: {last_line})")


def submit_array(job: WorkerJob) -> str:
    """Submit the prepared study's array job, each task handed ``job``; its job id, recorded in ``job.json``."""
    config = job.config
    submitit = import_submitit()
    settings = config.slurm
    folder = log_folder(config)
    try:
        # No max_num_timeout: ArrayTask handles the time-limit signal itself and applies [slurm].max_requeue.
        executor = submitit.SlurmExecutor(folder=folder)
    except RuntimeError as err:  # no srun on this machine
        raise ValueError(f"--slurm: this machine is not a SLURM submit host: {err}") from err
    executor.update_parameters(**sbatch_parameters(config))
    task = ArrayTask(job, settings.max_requeue)
    try:
        jobs = executor.map_array(task, range(settings.tasks))
    except submitit.core.utils.FailedJobError as err:  # sbatch refused it: bad partition, account, time ...
        raise ValueError(f"sbatch refused the array job: {err}") from err
    job_id = jobs[0].job_id.split("_")[0]
    record = {"job_id": job_id, "tasks": settings.tasks, "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}
    (folder / JOB_RECORD).write_text(json.dumps({**record, "study_file": str(config.path)}, indent=1) + "\n")
    return job_id


def submitit_id(job_id: str, task: str, tasks: int) -> str:
    """submitit's name for a task in its file names: ``<job>_<task>``, or the job id alone for a 1-task array."""
    return f"{job_id}_{task}" if tasks > 1 else job_id


def task_log(config: StudyConfig, job_id: str, task: str, tasks: int) -> Path:
    """A task's output and errors."""
    return log_folder(config) / f"{submitit_id(job_id, task, tasks)}_0_log.out"


@dataclass
class TaskState:
    """One array task as squeue shows it."""

    task: str  # array index ("0" for a job that is not an array)
    state: str  # PENDING, RUNNING, COMPLETED, CANCELLED, ...
    where: str  # the node, or why it waits (e.g. BeginTime after a requeue)


def task_states(job_id: str) -> list[TaskState] | None:
    """The array's tasks from squeue, ended ones included while the controller keeps them; None if it can't tell."""
    try:
        result = subprocess.run(
            ["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i|%T|%R"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return [] if "Invalid job id" in result.stderr else None  # forgotten: ended long ago
    states = []
    for line in result.stdout.splitlines():
        job, state, where = line.strip().split("|", 2)
        where = where.strip("()")  # squeue writes a pending reason as (Reason)
        states.append(TaskState(job.split("_", 1)[1] if "_" in job else "0", state, where))
    return sorted(states, key=lambda s: int(s.task) if s.task.isdigit() else -1)


def wait_for_array(job_id: str, poll_seconds: float = POLL_SECONDS) -> list[TaskState]:
    """Block until every task of the array has ended, printing each task's state as it changes."""
    seen: dict[str, str] = {}
    while True:
        states = task_states(job_id)
        if states is not None:
            for task in states:
                if seen.get(task.task) != task.state:
                    print(f"slurm job {job_id} task {task.task}: {task.state} ({task.where})", flush=True)
                    seen[task.task] = task.state
            if all(task.state in ENDED for task in states):
                return states
        time.sleep(poll_seconds)


def task_outcome(config: StudyConfig, job_id: str, task: str, tasks: int) -> str:
    """How a task squeue no longer lists ended, from submitit's result file."""
    path = log_folder(config) / f"{submitit_id(job_id, task, tasks)}_result.pkl"
    if not path.is_file():
        return "ended (no result: cancelled, killed or requeued)"
    with open(path, "rb") as file:
        outcome, _ = pickle.load(file)  # written by submitit in this study's own folder
    return "ended: worker finished" if outcome == "success" else "ended: worker failed (see its log)"


def array_summary(config: StudyConfig) -> str | None:
    """``mbu search --summary``: the last array's task states, or None when the study was never submitted."""
    path = log_folder(config) / JOB_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    job_id, tasks = record["job_id"], record["tasks"]
    lines = [f"slurm array job {job_id}: {tasks} tasks, submitted {record['submitted']}"]
    states = task_states(job_id)
    if states is None:
        return "\n".join([*lines, "  task states unknown: squeue did not answer (not a SLURM host?)"])
    listed = {s.task: s for s in states}
    for index in map(str, range(tasks)):
        task = listed.get(index)
        state = f"{task.state} ({task.where})" if task else task_outcome(config, job_id, index, tasks)
        lines.append(f"  task {index}: {state}; log {task_log(config, job_id, index, tasks)}")
    return "\n".join(lines)


def launch_array(
    config: StudyConfig, options: LaunchOptions, overrides: dict[str, Any], wait: bool = False, relaunch: str = ""
) -> StudySummary | None:
    """``mbu search --slurm``: prepare here as ``--workers`` does, submit the array, optionally wait for it.

    The study's summary once the array has ended (with ``wait``, or when there was nothing to submit); None
    when it was submitted and left running. ``relaunch`` is what a stopped task's log tells the user to run.
    """
    started = time.monotonic()
    slurm = resolve_slurm(config.slurm, overrides)
    import_submitit()  # before anything is prepared
    config = resolve_settings(config, options)
    check_shared_stores(config.study.storage, config.study.tracking_uri, slurm)
    check_controller()
    config = replace(config, slurm=slurm)
    if prepare_for_workers(config, options.progress):
        relaunch = relaunch or f"mbu search {config.path} --slurm"
        job_id = submit_array(WorkerJob(config, replace(options, progress=False), relaunch))
        print(f"slurm: submitted array job {job_id}: {slurm.tasks} workers of study {config.study.name}", flush=True)
        print(f"logs: {task_log(config, job_id, '<task>', slurm.tasks)}")
        print(f"follow: squeue -j {job_id}; mbu search {config.path} --summary; cancel: scancel {job_id}", flush=True)
        if not wait:
            return None
        wait_for_array(job_id)
    return launch_summary(config, load_existing_study(config.study.name, config.study.storage), started)
