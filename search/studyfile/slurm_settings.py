"""The ``[slurm]`` table of a study file (and ``mbu search --slurm``'s flags of the same names), and its checks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from mbu.search.studyfile.typed_tables import positive_integer_problem


@dataclass
class SlurmSettings:
    """``mbu search --slurm``: one array job whose tasks are ordinary workers of the study."""

    partition: str = ""  # SLURM partition; empty: the cluster's default partition
    tasks: int = 2  # tasks in the array, each one worker process of the study
    gpus_per_task: int = 0  # GPUs per task (0: none requested)
    cpus_per_task: int = 4  # CPU cores per task (also the worker's thread count)
    mem_gb: float = 0  # memory per task in GB (0: the partition's default)
    time_min: int = 60  # time limit per task, in minutes
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint, requeue
    max_requeue: int = 3  # requeues of one task after time-limit signals; then it ends
    single_node: bool = False  # the partition is one node: allows a SQLite storage (unsafe across nodes)
    sbatch: list[str] = field(default_factory=list)  # extra sbatch options, e.g. ["--account=lab", "--qos=high"]
    setup: list[str] = field(default_factory=list)  # shell lines run before the worker (module load, activate)


def slurm_problem(settings: SlurmSettings) -> tuple[str, str] | None:
    """The first bad ``[slurm]`` value as (key, what is wrong), or None."""
    for key in ("tasks", "cpus_per_task", "time_min", "signal_delay_s"):
        problem = positive_integer_problem(getattr(settings, key))
        if problem is not None:
            return key, problem
    for key in ("gpus_per_task", "max_requeue"):
        value = getattr(settings, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return key, f"must be an integer >= 0, got {value!r}"
    if isinstance(settings.mem_gb, bool) or not isinstance(settings.mem_gb, int | float) or settings.mem_gb < 0:
        return "mem_gb", f"must be a number >= 0, got {settings.mem_gb!r}"
    if settings.signal_delay_s >= settings.time_min * 60:
        return "signal_delay_s", f"must be shorter than the time limit ({settings.time_min * 60} s)"
    for key in ("sbatch", "setup"):
        value = getattr(settings, key)
        if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
            return key, f"must be a list of strings, got {value!r}"
    for option in settings.sbatch:
        if not option.startswith("--") or option == "--":
            return "sbatch", f"options are written --name=value or --flag, got {option!r}"
    return None


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """``--slurm``, ``--wait`` and one flag per ``[slurm]`` key (same name), each overriding the study file."""
    group = parser.add_argument_group(
        "SLURM cluster (see docs/slurm.md)",
        "With --slurm, the study is prepared here as with --workers, then submitted as one array job whose tasks "
        'are workers of the study (needs submitit: pip install -e ".[slurm]"); it prints the job id and '
        "the log folder runs/<study>/slurm/. Each flag below overrides its [slurm] key in the study file.",
    )
    group.add_argument("--slurm", action="store_true", help="submit the study as a SLURM array job of workers")
    group.add_argument(
        "--wait",
        action="store_true",
        help="with --slurm: block until every task has ended (printing each task's state changes from squeue), "
        "then exit 0 if the study has its n_trials finished trials, 1 if not",
    )
    group.add_argument(
        "--partition", default=None, metavar="NAME", help="SLURM partition (default: the cluster's default)"
    )
    group.add_argument(
        "--tasks", type=int, default=None, metavar="N", help="tasks in the array, one worker each (default 2)"
    )
    group.add_argument("--gpus-per-task", type=int, default=None, metavar="N", help="GPUs per task (default 0: none)")
    group.add_argument("--cpus-per-task", type=int, default=None, metavar="N", help="CPU cores per task (default 4)")
    group.add_argument(
        "--mem-gb", type=float, default=None, metavar="GB", help="memory per task, GB (default: the partition's)"
    )
    group.add_argument(
        "--time-min", type=int, default=None, metavar="MIN", help="time limit per task in minutes (default 60)"
    )
    group.add_argument(
        "--signal-delay-s",
        type=int,
        default=None,
        metavar="S",
        help="SLURM sends SIGUSR2 this many seconds before the time limit (it may come up to a minute earlier); "
        "the task's trials then checkpoint, are queued to resume, and the task requeues itself (default 120)",
    )
    group.add_argument(
        "--max-requeue",
        type=int,
        default=None,
        metavar="N",
        help="time-limit requeues of one task before it ends (default 3)",
    )
    group.add_argument(
        "--single-node",
        action="store_true",
        help="the partition is one node: allow SQLite Optuna and MLflow stores, otherwise refused with --slurm "
        "(SQLite file locking across the nodes of a shared filesystem is not safe)",
    )
    group.add_argument(
        "--sbatch",
        action="append",
        default=None,
        metavar="OPTION",
        help="an extra sbatch option, e.g. --sbatch=--account=lab (repeatable; added to [slurm].sbatch)",
    )
    group.add_argument(
        "--setup",
        action="append",
        default=None,
        metavar="LINE",
        help="a shell line each task runs before its worker, e.g. --setup 'module load cuda' "
        "(repeatable; added to [slurm].setup)",
    )


# One flag per [slurm] key, of the same name.
SLURM_FLAGS = tuple(f.name for f in fields(SlurmSettings))
