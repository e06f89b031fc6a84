"""``mbu search STUDY.toml``: run (or resume) a hyperparameter study."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="run or resume an Optuna study described by a TOML study file",
        description="Create or resume the study of STUDY (Optuna storage, default sqlite:///optuna.db) and run "
        "trials until it has [study].n_trials finished ones. Each trial trains, scores its masks, and is "
        "recorded as a nested MLflow run (default store sqlite:///mlflow.db, or $MLFLOW_TRACKING_URI).",
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from search.runner import run_study
    from search.study_file import load_study_file

    config = load_study_file(args.study)
    summary = run_study(config, args.storage, args.tracking_uri, args.n_trials, progress=not args.no_progress)
    print(summary.format())
    return 0
