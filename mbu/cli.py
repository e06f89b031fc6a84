"""The ``mbu`` command: one entry point dispatching to each package's thin CLI."""

from __future__ import annotations

import argparse
import sys

from mbu.data import cli as data_cli
from mbu.evaluate import cli as evaluate_cli
from mbu.search import cli as search_cli
from mbu.search import report_cli
from mbu.train import cli as train_cli
from mbu.train.errors import run_command


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
    return run_command(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
