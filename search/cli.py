"""``mbu search STUDY.toml``: run (or resume) a hyperparameter study."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mbu.base.command import EXIT_FAILED, EXIT_OK, EXIT_STOPPED
from mbu.search.studyfile.slurm_settings import SLURM_FLAGS, add_slurm_arguments
from mbu.search.studyfile.study_file import StudyConfig
from mbu.train.stop import StopRequest, signals_stop

if TYPE_CHECKING:  # the launchers import Optuna, MLflow and plotting: only when a study runs
    from mbu.search.launching.launch import LaunchOptions


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``mbu search`` and ``mbu confirm``: one set of launch flags, the confirmation stage alone for the latter."""
    search = subparsers.add_parser(
        "search",
        help="run or resume an Optuna study described by a TOML study file",
        description="Create or resume the study of STUDY (Optuna storage, default sqlite:///optuna.db) and run "
        "trials until it has [study].n_trials finished (complete or pruned) ones; failed trials do not count, "
        "and [study].max_failures failed trials in a row stop the launch. Each trial trains, scores its masks, "
        "and is recorded as a nested MLflow run (default store sqlite:///mlflow.db, or $MLFLOW_TRACKING_URI). "
        "With a [confirm] table (or a confirmation flag) the best trials are then confirmed on fresh seeds, "
        "as mbu confirm does. Exit codes: 0 target reached, 1 stopped on failures (each failed trial listed) "
        "or a worker failed, 2 a usage error, 75 stopped by SIGTERM (trials checkpointed and queued to resume), "
        "130 Ctrl-C.",
    )
    add_launch_arguments(search)
    confirm = subparsers.add_parser(
        "confirm",
        help="train a finished study's best trials and presets again on fresh seeds, with intervals",
        description="Once the study of STUDY has its [study].n_trials finished trials, train its [confirm].top_k "
        "best complete trials (and, with presets, the trial of every [[enqueue]] point) again on [confirm].seeds "
        "fresh seeds ([train].seed + 1, + 2, ...: the same seeds for every candidate), score each run as a trial "
        "is, and write runs/<study>/confirm_report.{md,json}: per candidate the mean, standard deviation and "
        "t-based 95% interval of validation and test IoU; per preset the paired difference in test IoU with its "
        "interval and a verdict. Runs go to runs/<study>/confirm/ and under the study's parent MLflow run. A "
        "relaunch runs only what is missing; raising --seeds or --top-k tops it up. The confirmation runs are "
        "trials of the Optuna study <study>/confirm, so --workers, --population and --slurm work as in mbu search. "
        "Exit codes as mbu search.",
    )
    add_launch_arguments(confirm)
    confirm.set_defaults(confirm_only=True)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", type=Path, help="study file, e.g. studies/synthetic_glasses.toml")
    parser.add_argument("--storage", default=None, help="Optuna storage URL, overriding [study].storage")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI, overriding [study].tracking_uri and $MLFLOW_TRACKING_URI",
    )
    parser.add_argument(
        "--n-trials", type=int, default=None, help="finished trials to reach, overriding [study].n_trials"
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="run nothing: print the study's best trial, trial counts by state, parameter importances "
        "and where its reports are",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes on this machine, all on this study; each takes the next trial, logs to "
        "runs/<study>/workers/worker-<i>.log and gets an equal share of the CPU threads (default: %(default)s)",
    )
    parser.add_argument(
        "--gpus",
        type=lambda text: [g.strip() for g in text.split(",") if g.strip()],
        default=None,
        metavar="0,1,...",
        help="GPU indices to spread the workers over, round-robin (CUDA_VISIBLE_DEVICES per worker; several "
        "workers may share one GPU)",
    )
    parser.add_argument(
        "--population",
        type=int,
        default=None,
        metavar="K",
        help="trials each worker process trains at once on its device, overriding [study].population "
        "(default 1). On a GPU the K steps overlap (one CUDA stream per trial); on CPU they take turns, as fast "
        "as K trials one after another. Each trial keeps its own run, checkpoint, evaluations and pruning",
    )
    add_confirm_arguments(parser)
    add_slurm_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Optuna's and MLflow's own log lines and experimental-API warnings (hidden by default)",
    )
    parser.set_defaults(func=main, confirm_only=False, records_trials=True)


def add_confirm_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``[confirm]`` key, each overriding it; any of them confirms a study without the table."""
    group = parser.add_argument_group(
        "confirmation on fresh seeds (see docs/confirmation.md)",
        "Each flag overrides its [confirm] key in the study file; with mbu search, giving one confirms a study "
        "that has no [confirm] table.",
    )
    group.add_argument(
        "--top-k", type=int, default=None, metavar="K", help="confirm the K best complete trials (default 1)"
    )
    group.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="fresh training seeds per candidate, [train].seed + 1 ... + N, the same for every candidate "
        "(default 3; at least 2 for an interval)",
    )
    group.add_argument(
        "--presets",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also confirm the trial of every [[enqueue]] point and compare each candidate with them, paired "
        "by seed (default: --presets)",
    )


def launch_options(args: argparse.Namespace) -> LaunchOptions:
    from mbu.search.launching.launch import LaunchOptions

    return LaunchOptions(
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        n_trials=args.n_trials,
        population=args.population,
        progress=not args.no_progress,
        verbose=args.verbose,
        top_k=args.top_k,
        seeds=args.seeds,
        presets=args.presets,
        confirm_only=args.confirm_only,
    )


def main(args: argparse.Namespace) -> int:
    """``mbu search`` and ``mbu confirm``."""
    from mbu.search.launching.launch import launch_workers, run_study, study_summary
    from mbu.search.launching.outcome import end_launch
    from mbu.search.running.tracking import quiet_libraries
    from mbu.search.studyfile.study_file import load_study_file

    if not args.verbose:
        quiet_libraries()
    config = load_study_file(args.study)
    options = launch_options(args)
    if args.summary:
        print(study_summary(config, options))
        from mbu.search.cluster.slurm import array_summary

        array = array_summary(config)  # the study's last SLURM array, if it was submitted with --slurm
        if array is not None:
            print(array)
        return EXIT_OK
    if args.slurm:
        return slurm_main(args, config, options)
    given = [key for key in (*SLURM_FLAGS, "wait") if getattr(args, key) not in (None, False)]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} needs --slurm")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.workers == 1 and not args.gpus:
        stop = StopRequest()
        with signals_stop(stop.request, signal.SIGTERM):  # kill, scancel, a scheduler: checkpoint and leave
            summary = run_study(config, options, stop)
        prog = "mbu confirm" if args.confirm_only else "mbu search"
        return end_launch(summary, config, options, relaunch_command(args), prog, late_stop=stop())
    summary, ended = launch_workers(config, options, args.workers, args.gpus, relaunch_command(args))
    failed = [i for i, code in enumerate(ended.codes) if code not in (EXIT_OK, EXIT_STOPPED)]
    if ended.stopped_by == "SIGINT" or failed:
        print(summary.format())
    if ended.stopped_by == "SIGINT":
        raise KeyboardInterrupt  # the workers recorded their trials; run_command prints how to relaunch
    if failed:
        print(f"workers {failed} exited with an error; see their logs", file=sys.stderr)
        return EXIT_FAILED
    return end_launch(summary, config, options, relaunch_command(args))


def slurm_main(args: argparse.Namespace, config: StudyConfig, options: LaunchOptions) -> int:
    """``--slurm``: the overrides given, then :func:`mbu.search.cluster.slurm.launch_array`."""
    from mbu.search.cluster.slurm import launch_array
    from mbu.search.launching.outcome import end_launch

    if args.workers != 1 or args.gpus:
        raise ValueError("--slurm runs one worker per array task: use --tasks and --gpus-per-task, not --workers")
    overrides = {key: getattr(args, key) for key in SLURM_FLAGS}
    summary = launch_array(config, options, overrides, args.wait, relaunch_command(args))
    if summary is None:
        return EXIT_OK  # submitted; --summary follows it
    return end_launch(summary, config, options, relaunch_command(args), launch="the array")


def relaunch_command(args: argparse.Namespace) -> str:
    """The command that goes on where this launch stopped: the same subcommand, study and flags that matter."""
    parts = ["mbu", "confirm" if args.confirm_only else "search", str(args.study)]
    for flag in ("storage", "tracking_uri", "n_trials", "population", "top_k", "seeds"):
        if getattr(args, flag, None) is not None:
            parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if getattr(args, "presets", None) is not None:
        parts.append("--presets" if args.presets else "--no-presets")
    if getattr(args, "workers", 1) != 1:
        parts += ["--workers", str(args.workers)]
    if getattr(args, "gpus", None):
        parts += ["--gpus", ",".join(args.gpus)]
    if getattr(args, "slurm", False):
        parts.append("--slurm")
    return shlex.join(parts)
