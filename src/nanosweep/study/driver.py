"""What a sweep and a search share as drivers: the parent run, claims' bookkeeping, the tally line, adopting and
closing trial runs, ending dead drivers' parents, and supervising the trials while they run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from nanosweep.signals import Interrupted, signal_name, stop_signals
from nanosweep.study.executors.base import STOP_GRACE_SECONDS, Executor, TrialExit
from nanosweep.tracking.heartbeat import Heartbeat, alive, heartbeat_now
from nanosweep.tracking.names import HOST_TAG, PARENT_RUN_TAG, PID_TAG, RUN_KIND_TAG, SWEEP_RUN
from nanosweep.tracking.open_runs import open_runs
from nanosweep.tracking.run import TrackedRun
from nanosweep.tracking.store import search_runs


@dataclass
class Tally:
    """One line per event: done, running, skipped, failed, and an ETA from this sweep's trial times."""

    total: int
    capacity: int
    stream: TextIO
    done: int = 0
    failed: int = 0
    skipped: int = 0
    running: int = 0
    durations: list[float] = field(default_factory=list)

    def eta(self) -> str:
        left = self.total - self.done - self.failed - self.skipped
        if not self.durations or not left:
            return "-"
        seconds = sum(self.durations) / len(self.durations) * left / self.capacity
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

    def report(self, event: str) -> None:
        finished = self.done + self.failed + self.skipped
        self.stream.write(
            f"[{finished}/{self.total}] done {self.done} | running {self.running} | skipped {self.skipped} | "
            f"failed {self.failed} | ETA {self.eta()}  {event}\n"
        )
        self.stream.flush()


def end_stale_sweeps(experiment_ids: list[str], keep: str | None, kind: str = SWEEP_RUN) -> None:
    """End KILLED the parent runs (of a sweep, or a search) whose driver died (SIGKILL, a lost machine): their
    heartbeat is stale."""
    for run in search_runs(experiment_ids, f"tags.{RUN_KIND_TAG} = '{kind}' and attributes.status = 'RUNNING'"):
        if run.info.run_id != keep and not alive(run.data.tags):
            TrackedRun(run.info.run_id).finish("KILLED", f"the {kind} process was killed; a later {kind} took over")


def adopt(run_id: str, parent_id: str) -> None:
    """A cut-off run moves under the driver (sweep or search) that resumes it: its parent, a fresh heartbeat, and
    its ending if the driver stops before a trial process ends it."""
    run = TrackedRun(run_id)
    with stop_signals.deferred():
        run.set_tags({PARENT_RUN_TAG: parent_id, **heartbeat_now()})
        open_runs.add(run)


def close_trial_run(exit: TrialExit, run_id: str) -> Any:
    """One of the ended process's runs, its output added under logs/. A run the process left RUNNING ends here:
    KILLED when its machine was lost (a rerun resumes it), FAILED when the process died on its own."""
    run = TrackedRun(run_id)
    info = run.info()
    if info.info.status == "RUNNING" and exit.lost:
        run.finish("KILLED", f"its machine was lost: {exit.lost}")
        info = run.info()
    elif info.info.status == "RUNNING":
        lines = exit.launch.log_path.read_text(errors="replace").strip().splitlines()
        run.finish("FAILED", f"trial process exited with {exit.returncode}: {lines[-1] if lines else 'no output'}")
        info = run.info()
    run.log_file(exit.launch.log_path, "logs")
    open_runs.discard(run_id)  # ended, by its trial or just now
    return info


def keep_stopped_trial_log(exit: TrialExit) -> None:
    """The output of a trial the driver stopped, under logs/ of each of its runs (which end KILLED: by the trial,
    or with the command); what went wrong while it stopped is then read from the run."""
    for run_id in exit.launch.run_ids:
        with contextlib.suppress(Exception):  # the store may be what failed: the runs' end reasons say so
            TrackedRun(run_id).log_file(exit.launch.log_path, "logs")


def open_parent(experiment_id: str, attached: str | None, name: str, kind: str, tags: dict[str, Any]) -> TrackedRun:
    """The parent run of a sweep or a search (the run `mlflow run` created, else a new one), tagged with its driver."""
    if attached:
        parent = TrackedRun(attached)
        parent.take_over()
    else:
        parent = TrackedRun.create(experiment_id, name, {RUN_KIND_TAG: kind})
    driver = {HOST_TAG: socket.gethostname(), PID_TAG: os.getpid(), **heartbeat_now()}
    parent.set_tags({RUN_KIND_TAG: kind, "mlflow.runName": name, **tags, **driver})
    return parent


@contextlib.contextmanager
def supervise_trials(name: str, executor: Executor, parent: TrackedRun, stream: TextIO) -> Iterator[None]:
    """The driver's duties while its trials run: keep the parent's and the running trials' heartbeats fresh
    (a trial waiting for its process, or for Ray to rerun it elsewhere, is still this driver's), and when the
    driver stops (SIGTERM, Ctrl-C, an error) stop the running trials first: they end their runs KILLED, to be
    resumed. The parent, and runs that no trial ended (killed after the grace, or never started), end with the
    command (tracking.open_runs).
    """

    def launched() -> list[str]:
        """The runs of every trial process started and not ended yet: this driver keeps them alive."""
        return [run_id for launch in executor.running() for run_id in launch.run_ids]

    with Heartbeat([parent.run_id], also=launched):
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, (Interrupted, KeyboardInterrupt)):
                stream.write(f"{name}: interrupted by {signal_name(exc)}; stopping {len(launched())} trial(s)\n")
            # trials that got the same Ctrl-C are already ending their runs and ignore this SIGTERM
            for exit in executor.stop(signal.SIGTERM, STOP_GRACE_SECONDS):
                keep_stopped_trial_log(exit)
            raise
