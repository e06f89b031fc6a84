"""The ``mbu`` command as a process: ``python -m mbu`` and the installed ``mbu`` script both call :func:`run`.

A process that has imported torch and MLflow spends 1.5-3 s after its last line of Python
tearing the interpreter down (C-level finalization; measured on a 2-core AMD EPYC, CPU build of
torch). Every command paid it, as did each ``--workers`` child and each test that starts ``mbu``.
:func:`run` ends the process once its exit hooks have run, skipping that teardown. Calling
:func:`mbu.cli.main` from Python (as the tests do) is unaffected. A hook registered before the command
started is cut off (``coverage run -m mbu`` would lose its data): such tools should run
``python -c "import sys; from mbu.cli import main; sys.exit(main())" ARGS`` instead.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys

INTERRUPTED_STATUS = 130  # what a shell reports for a process stopped by Ctrl-C


def _exit_status(code: object) -> int:
    """The status Python gives ``SystemExit(code)``: None is 0, an int itself, anything else 1 (printed)."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _end_process(status: list[int]) -> None:
    """The last exit hook: flush what Python and the C library buffer, then end the process without the teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach the reader
            pass
    try:  # and what native code printed through the C library's buffers
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    os._exit(status[0])


def run() -> None:
    """Run the ``mbu`` command line and exit with its status.

    The hook is registered before torch, MLflow and the rest are imported, so it runs after their exit
    hooks (atexit runs the last registered first), and after Python has joined the non-daemon threads.
    """
    status = [1]  # an exception that escapes main: its traceback is printed, the status is 1 as in Python
    atexit.register(_end_process, status)
    try:
        from mbu.cli import main

        status[0] = main()
    except SystemExit as exit_:
        status[0] = _exit_status(exit_.code)
        raise
    except KeyboardInterrupt:
        status[0] = INTERRUPTED_STATUS
        raise
    sys.exit(status[0])


if __name__ == "__main__":
    run()
