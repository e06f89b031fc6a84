"""Several workers on one study: the launch lock, and worker processes on this machine.

Workers share nothing but the study's storage and tracking store: each is an
ordinary ``mbu search`` that takes the next trial until the study's target is
reached. The launch lock makes data preparation, study creation and the parent
run happen once, whoever launches first.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mbu.search.study_file import StudyConfig

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


def worker_arguments(config: StudyConfig, verbose: bool = False) -> list[str]:
    """The ``mbu`` arguments of one worker of the (prepared) study: its resolved settings, spelt out.

    ``start_workers`` runs them as processes here; ``search.slurm`` runs them in each array task.
    """
    settings = config.study
    arguments = ["search", str(config.path), "--no-progress"]
    arguments += ["--storage", settings.storage, "--tracking-uri", settings.tracking_uri]
    arguments += ["--n-trials", str(settings.n_trials), "--population", str(settings.population)]
    return arguments + (["--verbose"] if verbose else [])


def start_workers(config: StudyConfig, workers: int, gpus: list[str] | None, verbose: bool = False) -> list[int]:
    """Run ``workers`` processes of ``mbu search`` on the (prepared) study; returns their exit codes.

    Workers are spread round-robin over ``gpus`` (``CUDA_VISIBLE_DEVICES``); CPU
    threads are shared out. Each worker's output goes to ``runs/<study>/workers/worker-<i>.log``.
    """
    logs = config.study_dir / WORKER_LOGS
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    command = [sys.executable, "-m", "mbu", *worker_arguments(config, verbose)]
    processes = []
    for i in range(workers):
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        log = open(logs / f"worker-{i}.log", "w")  # closed once the worker has ended
        processes.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
        print(f"worker {i}: pid {processes[-1][0].pid}{where}, log {log.name}", flush=True)
    try:
        return [process.wait() for process, _ in processes]
    except KeyboardInterrupt:
        # The terminal sent SIGINT to the workers too: let them close their trials and runs.
        for process, _ in processes:
            process.wait(timeout=60)
        raise
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.terminate()
            log.close()
