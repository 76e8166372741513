"""Where trials run. The sweep decides what to run; an Executor runs each trial as its own process.

LocalProcessPool is the first implementation: N processes on this machine, spread over the visible GPUs.
A distributed engine goes behind the same interface: start a command, report exits, stop everything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TrialLaunch:
    """One trial process to start (a fused group of runs, or one): its command, environment and log."""

    run_ids: tuple[str, ...]  # the MLflow runs it trains
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialExit:
    launch: TrialLaunch
    returncode: int  # negative: killed by that signal
    seconds: float


class Executor(ABC):
    """Runs trial commands with bounded concurrency."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Trials that may run at once."""

    @abstractmethod
    def running(self) -> list[TrialLaunch]: ...

    @abstractmethod
    def start(self, launch: TrialLaunch) -> int:
        """Start a trial; returns its process id."""

    @abstractmethod
    def wait(self, timeout: float) -> list[TrialExit]:
        """Trials that ended within timeout seconds (possibly none)."""

    @abstractmethod
    def stop(self, signum: int, grace: float) -> list[TrialExit]:
        """Send signum to every running trial, wait up to grace seconds, then kill what is left."""


def plan_slots(workers: int, gpus: list[int], trials_per_gpu: int, cpu_count: int) -> tuple[list[str | None], int]:
    """One slot per concurrent trial (with the GPU it owns) and torch threads per trial.

    On GPUs, workers=0 means every GPU slot (gpus x trials_per_gpu); on CPU it means one trial at a time.
    CPU cores are divided among the trials so that they do not oversubscribe the machine.
    """
    if gpus:
        gpu_slots = [str(g) for g in gpus for _ in range(trials_per_gpu)]
        slots: list[str | None] = gpu_slots[: workers or len(gpu_slots)]
    else:
        slots = [None] * (workers or 1)
    return slots, max(1, cpu_count // len(slots))


class LocalProcessPool(Executor):
    """Trials as child processes of the sweep, in its process group (Ctrl-C and killpg reach them all)."""

    def __init__(self, slots: list[str | None], threads_per_trial: int):
        self.slots = slots
        self.threads = threads_per_trial
        self._procs: dict[int, tuple[subprocess.Popen, TrialLaunch, float, int]] = {}  # slot -> process

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def running(self) -> list[TrialLaunch]:
        return [launch for _, launch, _, _ in self._procs.values()]

    def start(self, launch: TrialLaunch) -> int:
        slot = next(i for i in range(len(self.slots)) if i not in self._procs)
        env = {**os.environ, **launch.env, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self.slots[slot] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.slots[slot]  # the trial sees its one GPU as cuda:0
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(launch.log_path, "wb") as log:
            proc = subprocess.Popen(
                launch.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        self._procs[slot] = (proc, launch, time.monotonic(), slot)
        return proc.pid

    def wait(self, timeout: float) -> list[TrialExit]:
        deadline = time.monotonic() + timeout
        while True:
            done = []
            for slot, (proc, launch, started, _) in list(self._procs.items()):
                if proc.poll() is not None:
                    del self._procs[slot]
                    done.append(TrialExit(launch, proc.returncode, time.monotonic() - started))
            if done or not self._procs or time.monotonic() >= deadline:
                return done
            time.sleep(0.2)

    def stop(self, signum: int, grace: float) -> list[TrialExit]:
        for proc, _, _, _ in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)
        exits = []
        deadline = time.monotonic() + grace
        while self._procs and time.monotonic() < deadline:
            exits += self.wait(timeout=0.5)
        for proc, _, _, _ in self._procs.values():
            proc.send_signal(signal.SIGKILL)
        return exits + self.wait(timeout=5.0)
