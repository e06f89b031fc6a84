"""What runs inside each task of a study's SLURM array: one ordinary worker, and its requeue.

The task's own process runs the worker (:func:`mbu.search.cluster.worker_main.run_worker`), so SLURM's
signals reach it: the time-limit signal (SIGUSR2) and SIGTERM both become the worker's
stop request; after a time-limit stop the task requeues itself, at most ``max_requeue``
times (the only place that limit is applied: submitit's own requeue is not used).
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mbu.base.command import EXIT_OK, EXIT_STOPPED
from mbu.train.stop import StopRequest, signals_stop

if TYPE_CHECKING:
    from mbu.search.launching.launch import WorkerJob


class TaskFailed(RuntimeError):
    """An array task whose worker did not end cleanly; SLURM then shows the task FAILED."""


@dataclass
class ArrayTask:
    """The callable submitit pickles and runs in each array task."""

    job: WorkerJob  # the launcher's resolved study and options
    max_requeue: int  # time-limit requeues of one task ([slurm].max_requeue)

    def __call__(self, index: int) -> int:
        from mbu.search.cluster.worker_main import run_worker

        stop = StopRequest()
        warned: list[str] = []

        def on_warning(name: str) -> None:
            warned.append(name)
            stop.request(f"SLURM {name} (time limit or preemption)")

        # In place of submitit's handler (restored on the way out), which would requeue and exit mid-trial.
        with signals_stop(on_warning, warning_signal()):
            code = run_worker(self.job, stop)  # the worker turns SIGTERM (scancel) into the same stop
        if warned and code == EXIT_STOPPED:
            restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
            if restarts >= self.max_requeue:
                print(f"task {index}: not requeued: requeued {restarts} times already ([slurm].max_requeue)")
            else:
                requeue_this_task(restarts)
                # Not a return: submitit would record the task as finished. SystemExit passes its handler by.
                raise SystemExit(code)
        if code != EXIT_OK:
            raise TaskFailed(f"task {index}: the worker exited with {code} (see this log)")
        return code


def warning_signal() -> signal.Signals:
    """The signal the array asks SLURM for before the time limit (submitit's ``--signal``: USR2 by default)."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    return signal.Signals["SIG" + SlurmJobEnvironment.USR_SIG]


def requeue_this_task(restarts: int) -> None:
    """Put this task back in the queue (SLURM starts it again once this run has ended)."""
    job = os.environ["SLURM_JOB_ID"]
    print(f"requeueing job {job} (requeued {restarts} times before)", flush=True)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
