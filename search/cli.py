"""``mbu search STUDY.toml``: run (or resume) a hyperparameter study."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped from outside (SIGTERM); launching again goes on


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="run or resume an Optuna study described by a TOML study file",
        description="Create or resume the study of STUDY (Optuna storage, default sqlite:///optuna.db) and run "
        "trials until it has [study].n_trials finished (complete or pruned) ones; failed trials do not count, "
        "and [study].max_failures failed trials in a row stop the launch. Each trial trains, scores its masks, "
        "and is recorded as a nested MLflow run (default store sqlite:///mlflow.db, or $MLFLOW_TRACKING_URI). "
        "Exit codes: 0 target reached, 1 stopped on failures (each failed trial listed) or a worker failed, "
        "2 a usage error, 75 stopped by SIGTERM (trials checkpointed and queued to resume), 130 Ctrl-C.",
    )
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
    add_slurm_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Optuna's and MLflow's own log lines and experimental-API warnings (hidden by default)",
    )
    parser.set_defaults(func=main)


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """``--slurm``, ``--wait`` and one flag per ``[slurm]`` key (same name), each overriding the study file."""
    group = parser.add_argument_group(
        "SLURM cluster (see README, Studies on a SLURM cluster)",
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


SLURM_FLAGS = ("partition", "tasks", "gpus_per_task", "cpus_per_task", "mem_gb", "time_min", "signal_delay_s",
               "max_requeue", "single_node", "sbatch", "setup")  # fmt: skip


def slurm_main(args: argparse.Namespace, config) -> int:
    """``--slurm``: the overrides given, then :func:`mbu.search.slurm.launch_array`."""
    from mbu.search.slurm import launch_array

    if args.workers != 1 or args.gpus:
        raise ValueError("--slurm runs one worker per array task: use --tasks and --gpus-per-task, not --workers")
    overrides = {key: getattr(args, key) for key in SLURM_FLAGS}
    return launch_array(
        config,
        overrides,
        args.storage,
        args.tracking_uri,
        args.n_trials,
        args.population,
        args.wait,
        not args.no_progress,
        args.verbose,
    )


def quiet_libraries() -> None:
    """Keep Optuna's INFO lines, MLflow's database messages and experimental-API warnings off the terminal."""
    import logging
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(args: argparse.Namespace) -> int:
    import signal

    from mbu.search.runner import run_study, stopping_on
    from mbu.search.study_file import load_study_file

    if not args.verbose:
        quiet_libraries()
    config = load_study_file(args.study)
    if args.summary:
        from mbu.search.runner import study_summary

        print(study_summary(config, args.storage, args.tracking_uri))
        from mbu.search.slurm import array_summary

        array = array_summary(config)  # the study's last SLURM array, if it was submitted with --slurm
        if array is not None:
            print(array)
        return 0
    if args.slurm:
        return slurm_main(args, config)
    given = [key for key in (*SLURM_FLAGS, "wait") if getattr(args, key) not in (None, False)]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} needs --slurm")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.workers == 1 and not args.gpus:
        with stopping_on(signal.SIGTERM):  # kill, scancel, a scheduler: checkpoint the trials and leave
            summary = run_study(
                config, args.storage, args.tracking_uri, args.n_trials, not args.no_progress, args.population
            )
        print(summary.format())
        return exit_code(summary, config)
    from mbu.search.runner import launch_workers

    summary, ended = launch_workers(
        config,
        args.workers,
        args.gpus,
        args.storage,
        args.tracking_uri,
        args.n_trials,
        not args.no_progress,
        args.verbose,
        args.population,
    )
    print(summary.format())
    if ended.stopped_by == "SIGINT":
        raise KeyboardInterrupt  # the workers recorded their trials; mbu.cli prints how to relaunch
    failed = [i for i, code in enumerate(ended.codes) if code not in (0, STOPPED_EXIT)]
    if failed:
        print(f"workers {failed} exited with an error; see their logs", file=sys.stderr)
        return 1
    return exit_code(summary, config)


def exit_code(summary, config) -> int:
    """0 at the target; 75 stopped by a signal (relaunch to go on); 1 stopped on failures (listed)."""
    if summary.stopped_by:
        print(
            f"mbu search: stopped by {summary.stopped_by}: the trials in flight were checkpointed and queued "
            f"to resume; launch the study again to go on: mbu search {config.path}",
            file=sys.stderr,
        )
        return STOPPED_EXIT
    if summary.stopped_on_failures:
        print(
            f"mbu search: stopped: {config.study.max_failures} trials failed in a row ([study].max_failures); "
            "failed trials of this launch:",
            file=sys.stderr,
        )
        for number, error in summary.failed:
            print(f"  trial {number}: {error}", file=sys.stderr)
        return 1
    return 0


def add_report_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write the segmentation report of a run folder, or of a whole study",
        description="RUN_DIR: re-score the run's checkpoint and write report.json, report.md, iou_curves.png, "
        "examples.png and masks.npz into it, logging them to the run's MLflow run when it has one. "
        "--study NAME: rank the study's trials by validation IoU (with test IoU), link the best trial's "
        "report, add Optuna's parameter importances; written to RUNS_DIR/NAME/study_report.{md,json} and "
        "logged to the study's parent run.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("run_dir", nargs="?", type=Path, help="run folder holding checkpoint.pt")
    target.add_argument("--study", help="name of a study in the Optuna storage")
    parser.add_argument("--storage", default="sqlite:///optuna.db", help="Optuna storage URL (default: %(default)s)")
    parser.add_argument(
        "--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    parser.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="folder holding <study>/trial-<n>/ (default: %(default)s)"
    )
    parser.add_argument(
        "--root", default=None, help="RUN_DIR only: data root to score on (default: the one it trained on)"
    )
    parser.add_argument(
        "--device", default="auto", help="RUN_DIR only: auto, cpu, cuda or cuda:N (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=report_main)


def report_main(args: argparse.Namespace) -> int:
    import json

    from mbu.train.tracking import Recorder, check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_uri(uri)
    if args.study:
        from mbu.search.storage import load_existing_study
        from mbu.search.study_report import write_study_report
        from mbu.search.tracking import PARENT_RUN_ATTR

        study = load_existing_study(args.study, args.storage)
        paths = write_study_report(study, args.runs_dir / args.study)
        parent = study.user_attrs.get(PARENT_RUN_ATTR)
        if parent:
            recorder = Recorder.of_run(uri, parent)
            for path in paths:
                recorder.log_artifact(path)
            recorder.flush()
        print(f"study report: {paths[1]}" + (f" (logged to MLflow run {parent})" if parent else ""))
        return 0

    from mbu.evaluate.report import evaluate_run
    from mbu.evaluate.tracking import RUN_FILE

    result = evaluate_run(args.run_dir, args.root, args.device, progress=not args.no_progress)
    run_file = args.run_dir / RUN_FILE
    logged = ""
    if run_file.is_file():
        run_id = json.loads(run_file.read_text())["run_id"]
        recorder = Recorder.of_run(uri, run_id)
        # Scored on other masks or data: beside the run's own report in MLflow too, never over it.
        folder = None if result["report_dir"] == args.run_dir else result["report_dir"].name
        for name in result["paths"]:
            recorder.log_artifact(name, folder)
        logged = f" (logged to MLflow run {run_id})" if not recorder.flush() else ""
    print(f"report: {result['paths'][1]}{logged}")
    return 0
