"""One worker of a study, as each ``--workers`` process and each SLURM array task runs it.

A worker is handed the launcher's :class:`~mbu.search.launching.launch.WorkerJob`: the study config with the
launch's flags already applied, and the launch options. It runs the launch API on them exactly as
``mbu search`` does in its own process; nothing is parsed again, so whatever the launcher resolved
reaches every worker as it is. ``python -m mbu.search.cluster.worker_main JOB`` runs a job pickled by
:func:`mbu.search.cluster.workers.start_workers`.
"""

from __future__ import annotations

import pickle
import signal
import sys
from pathlib import Path

from mbu.base.command import run_command
from mbu.search.launching.launch import WorkerJob, run_study
from mbu.search.launching.outcome import end_launch
from mbu.search.running.tracking import quiet_libraries
from mbu.train.stop import StopRequest, signals_stop


def run_worker(job: WorkerJob, stop: StopRequest | None = None) -> int:
    """Run the job's study in this process until it has its target; its exit code.

    ``stop`` is the stop request of a caller with its own signals (a SLURM task); SIGTERM is one either way.
    """

    def work() -> int:
        if not job.options.verbose:
            quiet_libraries()
        request = stop or StopRequest()
        with signals_stop(request.request, signal.SIGTERM):
            summary = run_study(job.config, job.options, request)
        return end_launch(summary, job.config, job.options, job.relaunch, late_stop=request())

    return run_command(work, "search", interrupted=f"relaunch with: {job.relaunch}")


def main(job_file: str) -> int:
    with Path(job_file).open("rb") as file:
        job = pickle.load(file)
    return run_worker(job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
