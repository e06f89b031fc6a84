"""``mbu report``: the segmentation report of one run folder, or the ranked report of a whole study."""

from __future__ import annotations

import argparse
from pathlib import Path


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
        "--tracking-uri",
        default="",
        help="MLflow tracking URI (default: for RUN_DIR the store its run recorded, else $MLFLOW_TRACKING_URI or "
        "sqlite:///mlflow.db)",
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
    if args.study:
        return study_report_main(args)
    return run_report_main(args)


def study_report_main(args: argparse.Namespace) -> int:
    """``mbu report --study NAME``: the ranked report, logged to the study's parent run."""
    from mbu.base.urls import check_store_to_read, resolve_tracking_uri
    from mbu.search.judging.study_report import write_study_report
    from mbu.search.launching.storage import load_existing_study
    from mbu.search.running.tracking import PARENT_RUN_ATTR
    from mbu.train.tracking import Recorder

    uri = resolve_tracking_uri(args.tracking_uri)
    study = load_existing_study(args.study, args.storage)
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent:  # its report goes to the study's parent run: a store that is gone or foreign is never created
        check_store_to_read(uri)
    paths = write_study_report(study, args.runs_dir / args.study)
    if parent:
        recorder = Recorder.of_run(uri, parent)
        for path in paths:
            recorder.log_artifact(path)
        recorder.flush()
    print(f"study report: {paths[1]}" + (f" (logged to MLflow run {parent})" if parent else ""))
    return 0


def run_store(args: argparse.Namespace, record: dict) -> str:
    """The MLflow store of a run folder's run: ``--tracking-uri``, else the store the run recorded, else the
    default; checked, and never created (a store that is gone is one line naming it)."""
    from mbu.base.urls import check_store_to_read, recorded_store

    uri = recorded_store(record, args.tracking_uri)
    try:
        check_store_to_read(uri, f"the MLflow store of {args.run_dir}")
    except ValueError as err:
        raise ValueError(f"{err}; pass --tracking-uri of the store that holds run {record['run_id']}") from err
    return uri


def run_report_main(args: argparse.Namespace) -> int:
    """``mbu report RUN_DIR``: the run re-scored, its report files logged to its own MLflow run (if it has one)."""
    import json

    from mbu.base.run_files import RUN_FILE
    from mbu.evaluate.report import evaluate_run
    from mbu.train.tracking import Recorder

    run_file = args.run_dir / RUN_FILE
    record = json.loads(run_file.read_text()) if run_file.is_file() else None
    uri = run_store(args, record) if record is not None else None  # checked before the scoring
    result = evaluate_run(args.run_dir, args.root, args.device, progress=not args.no_progress)
    logged = ""
    if record is not None:
        recorder = Recorder.of_run(uri, record["run_id"])
        # Scored on other masks or data: beside the run's own report in MLflow too, never over it.
        folder = None if result["report_dir"] == args.run_dir else result["report_dir"].name
        for name in result["paths"]:
            recorder.log_artifact(name, folder)
        logged = f" (logged to MLflow run {record['run_id']})" if not recorder.flush() else ""
    print(f"report: {result['paths'][1]}{logged}")
    return 0
