"""Exit codes and the errors a user can fix from the message alone: the same rules for every command.

:func:`run_command` is how ``mbu`` and every worker (a ``--workers`` process, a SLURM
array task) run a command: a user error is one line on stderr and exit 2
(``MBU_DEBUG=1`` shows the traceback), anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """An error the message alone lets the user fix (a layer's own kind: a checkpoint for another model,
    a file that cannot be written, ...); :func:`run_command` prints it as one line, exit 2."""


class TrainingDiverged(RuntimeError):
    """Training produced a loss that is not finite: exit 1, with a hint to lower the learning rates."""


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
    UserError,
)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def first_line(err: BaseException) -> str:
    """The first line of an error's message (libraries such as MLflow add paragraphs), else its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_command(work: Callable[[], int], command: str, interrupted: str = "") -> int:
    """``work()`` with the exit-code rules above; ``command`` names it in messages, ``interrupted`` is what
    to say after a Ctrl-C (how to go on)."""
    try:
        return work()
    except USER_ERRORS as err:
        if os.environ.get("MBU_DEBUG"):
            raise
        print(f"mbu {command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as err:
        if os.environ.get("MBU_DEBUG"):
            raise
        print(
            f"mbu {command}: training diverged: {one_line(err)}; lower --lr or --disclr "
            "(the last checkpoint, if any, is intact)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"mbu {command}: interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
