"""The ``mbu`` command: one entry point dispatching to each package's thin CLI."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from mbu.data import cli as data_cli
from mbu.data.files import WriteError
from mbu.evaluate import cli as evaluate_cli
from mbu.search import cli as search_cli
from mbu.train import cli as train_cli
from mbu.train.checkpoint import CheckpointError
from mbu.train.step import NonFiniteLossError

# Errors a user can fix from the message alone: one line on stderr and exit 2, without a traceback
# (set MBU_DEBUG=1 to see it). ValueError covers the project's data, study-file, device and
# tracking errors; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
    CheckpointError,
    WriteError,
)
EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 1, 130


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


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if os.environ.get("MBU_DEBUG"):
            raise
        print(f"mbu {args.command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as err:
        if os.environ.get("MBU_DEBUG"):
            raise
        print(
            f"mbu {args.command}: training diverged: {one_line(err)}; lower --lr or --disclr "
            "(the last checkpoint, if any, is intact)",
            file=sys.stderr,
        )
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        again = ""
        if args.command == "search":  # its trials in flight were recorded FAIL: a relaunch retries them
            again = f"; the trials in flight were recorded FAIL; relaunch with: mbu {shlex.join(argv or sys.argv[1:])}"
        print(f"mbu {args.command}: interrupted{again}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
