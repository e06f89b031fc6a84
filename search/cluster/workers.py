"""Several workers on one study: the launch lock, and worker processes on this machine.

Workers share nothing but the study's storage and tracking store: each runs the
launcher's resolved study (:mod:`mbu.search.cluster.worker_main`), taking the next trial
until the study's target is reached. The launch lock makes data preparation, study creation and the parent
run happen once, whoever launches first.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

WORKER_LOGS = "workers"  # runs/<study>/workers/worker-<i>.log


@contextmanager
def launch_lock(study_dir: Path) -> Iterator[None]:
    """One launch at a time through data preparation, study creation and the parent run.

    Two launches of one study on this machine would otherwise both write the
    synthetic data, queue the first trials twice or open two parent runs.
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / ".launch.lock", "a") as lock:  # "a": taking the lock leaves the file as it is
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def _die_with_parent() -> None:
    """In a worker, before exec: Linux sends it SIGTERM if the launcher dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the launcher's own signal forwarding still holds
        pass


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


@dataclass
class WorkersEnded:
    codes: list[int]  # each worker's exit code, in launch order
    stopped_by: str | None = None  # the signal that the launcher passed on to its workers, if any


def remove_stale_jobs(logs: Path) -> list[Path]:
    """Delete the job files that launchers on this host left when they died (a SIGKILLed launcher cannot delete
    its own); the ones removed. A live launcher's (a concurrent launch of the same study), and any other
    host's, is left alone."""
    removed = []
    for path in logs.glob(f"job-{socket.gethostname()}-*.pickle"):
        try:
            os.kill(int(path.stem.rsplit("-", 1)[1]), 0)
        except ValueError:
            continue  # not a name this module writes
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path)
        except PermissionError:
            pass  # a live process of another user
    return removed


def start_workers(job: object, study_dir: Path, workers: int, gpus: list[str] | None) -> WorkersEnded:
    """Run ``workers`` worker processes on the (prepared) study and wait for them.

    Each is handed ``job`` (a :class:`mbu.search.launching.launch.WorkerJob`, pickled into ``runs/<study>/workers/``)
    and runs it with :mod:`mbu.search.cluster.worker_main`.

    Workers are spread round-robin over ``gpus`` (``CUDA_VISIBLE_DEVICES``); CPU
    threads are shared out. Each worker's output goes to ``runs/<study>/workers/worker-<i>.log``.
    The workers run in their own session, so a signal reaches them once, through the launcher:
    SIGTERM (``kill``, ``timeout``, a scheduler) and Ctrl-C are passed on to every worker, which
    stops as a single ``mbu search`` does, and the launcher waits for them all. A launcher that
    dies outright takes its workers down with SIGTERM (Linux).
    """
    logs = study_dir / WORKER_LOGS
    logs.mkdir(parents=True, exist_ok=True)
    remove_stale_jobs(logs)
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    job_file = logs / f"job-{socket.gethostname()}-{os.getpid()}.pickle"  # this launch's own: launches do not mix
    job_file.write_bytes(pickle.dumps(job))
    command = [sys.executable, "-m", "mbu.search.cluster.worker_main", str(job_file)]
    processes: list[subprocess.Popen] = []
    stopped: list[str] = []

    def pass_on(number: int, _frame: object) -> None:
        stopped.append(signal.Signals(number).name)
        for process in processes:
            if process.poll() is None:
                process.send_signal(number)

    previous = {number: signal.signal(number, pass_on) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(workers):
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            with open(logs / f"worker-{i}.log", "w") as log:  # the worker holds its own copy
                process = subprocess.Popen(
                    command,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            processes.append(process)
            where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
            print(f"worker {i}: pid {process.pid}{where}, log {log.name}", flush=True)
            if stopped:  # a signal came while starting: this worker gets it too
                process.send_signal(signal.Signals[stopped[0]])
        codes = [process.wait() for process in processes]
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for process in processes:  # only if the launcher itself failed: never leave a worker behind
            if process.poll() is None:
                process.terminate()
                process.wait()
        job_file.unlink(missing_ok=True)
    return WorkersEnded(codes, stopped[0] if stopped else None)
