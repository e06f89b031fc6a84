"""A stop asked from outside (a signal): the loop finishes its iteration, checkpoints, and returns.

The request is an object the command creates and hands to the training loop,
never module state, so two trainings in one process each have their own.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mbu.base.command import EXIT_INTERRUPTED, EXIT_STOPPED


class StopRequest:
    """Set once by a signal handler, read by the loop between iterations (``stop()`` is the reason or None)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def __call__(self) -> str | None:
        return self.reason


@contextmanager
def signals_stop(request: Callable[[str], None], *signals: int) -> Iterator[None]:
    """Within: each of ``signals`` calls ``request(NAME)`` instead of ending the process.

    SIGINT is honoured once this way; a second Ctrl-C interrupts at once (KeyboardInterrupt),
    for a user who will not wait for the checkpoint. The previous handlers come back on the way out;
    they are not called meanwhile: the ones a command replaces are the default (end the process) or
    submitit's (requeue and exit at once), and either would end it mid-iteration, which is what the
    stop is for avoiding.
    """

    def handler(number: int, _frame: object) -> None:
        request(signal.Signals(number).name)
        if number == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    with handling(signals, handler):
        yield


@contextmanager
def handling(signals: tuple[int, ...], handler: Callable[[int, object], None]) -> Iterator[None]:
    """Within: ``handler`` for each of ``signals``; the previous handlers come back on the way out."""
    previous = {number: signal.getsignal(number) for number in signals}
    for number in signals:
        signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Within: a Ctrl-C waits for the block's end, where the handler it would have reached runs.

    For a few calls that must finish together, such as opening an MLflow run and keeping its id: an
    interrupt between the two would leave a run that nobody closes. A second Ctrl-C within the block
    reaches that handler at once, for a user who will not wait (a tracking server that does not answer).
    Only in the main thread (the only one Python runs signal handlers in) and only over a Python
    handler: SIG_IGN and SIG_DFL stay as they are.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    caught: list[object] = []

    def hold(number: int, frame: object) -> None:
        caught.append(frame)
        if len(caught) == 2:
            previous(number, frame)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if len(caught) == 1:
            previous(signal.SIGINT, caught[0])


class StopSignal(BaseException):
    """A signal that ends work which has no iteration to stop at (logging a model, registering a champion).

    Raised in the main thread by :func:`signals_raise`, so ``finally`` blocks and temporary folders clean
    up on the way out; a BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@contextmanager
def signals_raise(*signals: int) -> Iterator[None]:
    """Within: each of ``signals`` raises :class:`StopSignal` (its name) instead of ending the process."""

    def handler(number: int, _frame: object) -> None:
        raise StopSignal(signal.Signals(number).name)

    with handling(signals, handler):
        yield


def finish_or_stop(work: Callable[[], int], message: Callable[[str], str]) -> int:
    """``work()``'s exit code; SIGTERM or Ctrl-C meanwhile ends it (``finally`` blocks run) with one stderr line,
    ``message("stopped by SIGTERM")`` or ``message("interrupted")``, and exit 75 or 130."""
    try:
        with signals_raise(signal.SIGTERM):
            return work()
    except (StopSignal, KeyboardInterrupt) as err:
        reason = err.name if isinstance(err, StopSignal) else "SIGINT"
        print(message("interrupted" if reason == "SIGINT" else f"stopped by {reason}"), file=sys.stderr)
        return EXIT_INTERRUPTED if reason == "SIGINT" else EXIT_STOPPED
