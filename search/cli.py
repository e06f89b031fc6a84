"""``mbu search STUDY.toml``: run (or resume) a hyperparameter study."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="run or resume an Optuna study described by a TOML study file",
        description="Create or resume the study of STUDY (Optuna storage, default sqlite:///optuna.db) and run "
        "trials until it has [study].n_trials finished (complete or pruned) ones; failed trials do not count, "
        "and [study].max_failures failed trials in a row stop the launch. Each trial trains, scores its masks, "
        "and is recorded as a nested MLflow run (default store sqlite:///mlflow.db, or $MLFLOW_TRACKING_URI). "
        "Exit codes: 0 target reached, 1 stopped on failures (each failed trial listed) or a worker failed, "
        "2 a usage error, 130 Ctrl-C.",
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Optuna's and MLflow's own log lines and experimental-API warnings (hidden by default)",
    )
    parser.set_defaults(func=main)


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
    from mbu.search.runner import run_study
    from mbu.search.study_file import load_study_file

    if not args.verbose:
        quiet_libraries()
    config = load_study_file(args.study)
    if args.summary:
        from mbu.search.runner import study_summary

        print(study_summary(config, args.storage, args.tracking_uri))
        return 0
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.workers == 1 and not args.gpus:
        summary = run_study(config, args.storage, args.tracking_uri, args.n_trials, progress=not args.no_progress)
        print(summary.format())
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
    from mbu.search.runner import launch_workers

    summary, codes = launch_workers(
        config,
        args.workers,
        args.gpus,
        args.storage,
        args.tracking_uri,
        args.n_trials,
        not args.no_progress,
        args.verbose,
    )
    print(summary.format())
    failed = [i for i, code in enumerate(codes) if code != 0]
    if failed:
        print(f"workers {failed} exited with an error; see their logs", file=sys.stderr)
    return 1 if failed else 0


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
