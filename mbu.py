"""The ``mbu`` command: one entry point dispatching to each package's thin CLI."""

from __future__ import annotations

import argparse
import os
import sys

from data import cli as data_cli
from evaluate import cli as evaluate_cli
from search import cli as search_cli
from train import cli as train_cli

# Errors a user can fix from the message alone: printed without a traceback
# (set MBU_DEBUG=1 to see it).
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, FileExistsError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbu",
        description="Mask-based unsupervised content transfer: data, training, evaluation and hyperparameter search.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (data_cli, train_cli, evaluate_cli, search_cli):
        module.add_parser(commands)
    evaluate_cli.add_apply_parsers(commands)
    search_cli.add_report_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if os.environ.get("MBU_DEBUG"):
            raise
        print(f"mbu {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
