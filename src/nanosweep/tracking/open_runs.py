"""The runs a command opened and has not ended: however it stops, the command ends them (cli.options.stops_cleanly)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

from nanosweep.signals import Interrupted, signal_name, stop_signals


class EndableRun(Protocol):
    """What ending a run needs of it (a TrackedRun): its id, its state in the store, and its end."""

    run_id: str

    def info(self) -> Any: ...

    def finish(self, status: str, reason: str | None = None) -> None: ...


class OpenRuns:
    """The runs this process created or took over and has not ended yet.

    TrackedRun.create and take_over add a run in the same step as they make it RUNNING (a stop signal waits for
    that step), and TrackedRun.finish removes it. A command that leaves `ended_on_exit` by an exception ends every
    run it opened that is still RUNNING: KILLED when a stop signal came, FAILED on an error. So whatever moment
    SIGTERM or Ctrl-C comes at, no run is left behind RUNNING.
    """

    def __init__(self) -> None:
        self._runs: dict[str, EndableRun] = {}

    def add(self, run: EndableRun) -> None:
        self._runs[run.run_id] = run

    def discard(self, run_id: str) -> None:
        """The run is ended, or another process ended it (a trial that exited): nothing left to do for it."""
        self._runs.pop(run_id, None)

    @contextlib.contextmanager
    def ended_on_exit(self) -> Iterator[None]:
        before = set(self._runs)
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, (Interrupted, KeyboardInterrupt)):
                status, reason = "KILLED", f"interrupted by {signal_name(exc)}"
            else:
                status, reason = "FAILED", f"{type(exc).__name__}: {exc}"
            with stop_signals.deferred():
                for run in [run for run_id, run in self._runs.items() if run_id not in before]:
                    # a trial process may have ended it already (this is its driver): only RUNNING ones are left
                    with contextlib.suppress(Exception):  # the store may be what failed: the error below says so
                        if run.info().info.status == "RUNNING":
                            run.finish(status, reason)
                    self.discard(run.run_id)
            raise


open_runs = OpenRuns()
