"""How a nanosweep process stops on SIGTERM or Ctrl-C (SIGINT): the first one raises Interrupted, later ones are
ignored so that they cannot cut the stopping short, and a section that must not be cut (creating or ending a run)
defers the first one to its end. One that lands inside a database call, or where Python discards exceptions (the
garbage collector's callbacks), comes again a moment later.

The command line installs the handlers for a whole command (cli.stops_cleanly); what the command opened is then
ended by tracking.open_runs on its way out.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REDELIVER_SECONDS = 0.05  # a stop signal that cannot be raised where it landed comes again after this


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the process: its runs end KILLED, their last checkpoints kept for resuming."""


def signal_name(exc: BaseException) -> str:
    """The signal that stopped the process: Interrupted carries its name; a bare KeyboardInterrupt is SIGINT."""
    return str(exc.args[0]) if isinstance(exc, Interrupted) and exc.args else "SIGINT"


def in_database_call(frame: FrameType | None) -> bool:
    """Is the code running inside SQLAlchemy (MLflow's SQL store, Optuna's storage), which an exception must not
    cut in the middle of a transaction?"""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("sqlalchemy."):
            return True
        frame = frame.f_back
    return False


class StopSignals:
    """SIGINT/SIGTERM as Interrupted, once: later ones are ignored. Inside `deferred` sections (which nest) the
    interruption waits until the outermost one ends; inside a database call, and where Python would discard it,
    it comes again a moment later."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first stop signal, once one came
        self.pending: str | None = None  # ... not raised yet, because a deferred section was running
        self.depth = 0  # deferred sections now running, nested
        self.unraisable_hook = sys.unraisablehook  # the one before installed(), for what is not ours
        self.active = False  # inside installed()
        self.again = False  # the next handle() is the received signal delivered again, not a new one

    def handle(self, signum: int, frame: FrameType | None) -> None:
        again, self.again = self.again, False
        if self.received and not again:
            return  # the process is stopping already: nothing may cut that short
        self.received = signal.Signals(signum).name
        if self.depth:
            self.pending = self.received
        elif in_database_call(frame):  # cut mid-transaction, its connection would keep holding SQLite's lock
            self.deliver_later(self.received)
        else:
            raise Interrupted(self.received)

    def discarded(self, unraisable: Any) -> None:
        """sys.unraisablehook: an Interrupted raised where Python discards exceptions (the handler ran inside a
        weakref callback or a __del__ of the garbage collector) is delivered again a moment later, from another
        thread, so that it lands in the code that was running: the stop is not lost."""
        if isinstance(unraisable.exc_value, Interrupted):
            self.deliver_later(signal_name(unraisable.exc_value))
        else:
            self.unraisable_hook(unraisable)

    def deliver_later(self, name: str) -> None:
        """The stop signal again in a moment, from another thread: it lands in the code running then."""
        again = threading.Timer(REDELIVER_SECONDS, self.deliver_again, [name])
        again.daemon = True
        again.start()

    def deliver_again(self, name: str) -> None:
        if self.active:  # the command has not ended meanwhile
            self.again = True
            _thread.interrupt_main(signal.Signals[name])  # the main thread runs handle() as for the real signal

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """SIGINT and SIGTERM raise Interrupted (once) inside this block; the handlers before come back after it."""
        self.received = self.pending = None
        previous = {stop: signal.signal(stop, self.handle) for stop in STOP_SIGNALS}
        self.unraisable_hook, sys.unraisablehook = sys.unraisablehook, self.discarded
        self.active = True
        try:
            yield
        finally:
            self.active = False
            self.received = self.pending = None  # outside the command no stop is on its way
            sys.unraisablehook = self.unraisable_hook
            for stop, handler in previous.items():
                signal.signal(stop, handler)

    @property
    def stopping(self) -> str | None:
        """The stop signal this command received (raised already, or still on its way), if one came."""
        return self.received if self.active else None

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """SIGINT's and SIGTERM's handlers as they are now, back after the block whatever it installed: ray.init
        installs Ray's own at the C level, which abort the process instead of ending its runs."""
        handlers = {stop: signal.getsignal(stop) for stop in STOP_SIGNALS}
        try:
            yield
        finally:
            for stop, handler in handlers.items():
                signal.signal(stop, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A section that a stop signal does not interrupt; the outermost one raises Interrupted at its end instead.

        Signals land in the main thread only, so a section on another thread (a run's end beside its siblings'
        training) defers nothing: the main thread, interrupted, waits for that thread before it stops."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending:
            name, self.pending = self.pending, None
            raise Interrupted(name)


stop_signals = StopSignals()
