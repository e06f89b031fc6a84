"""Exit codes and the errors a user can fix from the message alone: the same rules for every command.

``run_command`` is how ``mbu`` and every worker (a ``--workers`` child, a SLURM
array task) run a parsed command: a user error is one line on stderr and exit 2
(``MBU_DEBUG=1`` shows the traceback), anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from mbu.data.files import WriteError
from mbu.train.checkpoint import CheckpointError
from mbu.train.step import NonFiniteLossError

EXIT_OK = 0
EXIT_FAILED = 1  # trials failed, training diverged, a worker or an array ended short of the target
EXIT_USAGE = 2  # a user error (one line)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped from outside (SIGTERM) with the work checkpointed; launching again goes on
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it

# ValueError covers the project's data, study-file, device and tracking errors.
USER_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
    CheckpointError,
    WriteError,
)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def first_line(err: BaseException) -> str:
    """The first line of an error's message (libraries such as MLflow add paragraphs), else its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_command(args: argparse.Namespace, argv: list[str]) -> int:
    """``args.func(args)`` with the exit-code rules above; ``argv`` is what to relaunch after a Ctrl-C."""
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
        return EXIT_FAILED
    except KeyboardInterrupt:
        again = ""
        if args.command == "search":  # its trials in flight were recorded FAIL: a relaunch retries them
            again = f"; the trials in flight were recorded FAIL; relaunch with: mbu {shlex.join(argv)}"
        print(f"mbu {args.command}: interrupted{again}", file=sys.stderr)
        return EXIT_INTERRUPTED
