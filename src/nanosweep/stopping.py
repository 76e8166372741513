"""How a nanosweep process stops on SIGTERM or Ctrl-C (SIGINT): the first one raises Interrupted, later ones are
ignored so that they cannot cut the stopping short, and a section that must not be cut (creating or ending a run)
defers the first one to its end.

The command line installs the handlers for a whole command (cli.stops_cleanly); what the command opened is then
ended by tracking.open_runs on its way out.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the process: its runs end KILLED, their last checkpoints kept for resuming."""


def signal_name(exc: BaseException) -> str:
    """The signal that stopped the process: Interrupted carries its name; a bare KeyboardInterrupt is SIGINT."""
    return str(exc.args[0]) if isinstance(exc, Interrupted) and exc.args else "SIGINT"


class StopSignals:
    """SIGINT/SIGTERM as Interrupted, once: later ones are ignored. Inside `deferred` sections (which nest) the
    interruption waits until the outermost one ends."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first stop signal, once one came
        self.pending: str | None = None  # ... not raised yet, because a deferred section was running
        self.depth = 0  # deferred sections now running, nested

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received:
            return  # the process is stopping already: nothing may cut that short
        self.received = signal.Signals(signum).name
        if self.depth:
            self.pending = self.received
            return
        raise Interrupted(self.received)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """SIGINT and SIGTERM raise Interrupted (once) inside this block; the handlers before come back after it."""
        self.received = self.pending = None
        previous = {stop: signal.signal(stop, self.handle) for stop in STOP_SIGNALS}
        try:
            yield
        finally:
            for stop, handler in previous.items():
                signal.signal(stop, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A section that a stop signal does not interrupt; the outermost one raises Interrupted at its end instead."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending:
            name, self.pending = self.pending, None
            raise Interrupted(name)


stop_signals = StopSignals()
