"""The ``[slurm]`` table of a study file (and ``mbu search --slurm``'s flags of the same names), and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field


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
        value = getattr(settings, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return key, f"must be a positive integer, got {value!r}"
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
