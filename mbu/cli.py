"""The ``mbu`` command: one entry point dispatching to each package's thin CLI."""

from __future__ import annotations

import argparse
import shlex
import sys

from mbu.base.command import run_command
from mbu.data import cli as data_cli
from mbu.evaluate import cli as evaluate_cli
from mbu.search import cli as search_cli
from mbu.search import report_cli
from mbu.train import cli as train_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbu",
        description="Mask-based unsupervised content transfer: data, training, evaluation and hyperparameter search.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_cli.add_parser(commands)
    train_cli.add_parser(commands, log_model=evaluate_cli.log_trained_model)  # train cannot import evaluate
    for module in (evaluate_cli, search_cli):
        module.add_parser(commands)
    evaluate_cli.add_apply_parsers(commands)
    report_cli.add_report_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    interrupted = ""
    if getattr(args, "records_trials", False):  # its trials in flight were recorded FAIL: a relaunch retries them
        interrupted = f"the trials in flight were recorded FAIL; relaunch with: mbu {shlex.join(argv)}"
    return run_command(lambda: args.func(args), args.command, interrupted)


if __name__ == "__main__":
    sys.exit(main())
