"""Where trials run. The sweep decides what to run; an Executor runs each trial as its own process.

LocalProcessPool: N processes on this machine, spread over the visible GPUs. RayExecutor (ray_executor.py,
`--executor ray`): the same commands as tasks on a Ray cluster. Both start a command, report exits, stop
everything, and tell the trial where it runs (EXECUTOR_ENV, NODE_ENV: its runs' executor and node tags).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nanosweep.memory import PROCESSES_PER_GPU_ENV


@dataclass(frozen=True)
class TrialLaunch:
    """One trial process to start (a fused group of runs, or one): its command, environment and log."""

    run_ids: tuple[str, ...]  # the MLflow runs it trains
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)


EXECUTORS = ("local", "ray")
STOP_GRACE_SECONDS = 60.0  # a stopped trial has this long to flush its logging and end its runs KILLED
EXECUTOR_ENV = "NANOSWEEP_EXECUTOR"  # set for a trial process: the executor that started it
NODE_ENV = "NANOSWEEP_NODE"  # ... and the node it runs on


class ExecutorError(RuntimeError):
    """An executor cannot run this sweep as asked; the message says why and what to do."""


@dataclass(frozen=True)
class TrialExit:
    launch: TrialLaunch
    returncode: int  # negative: killed by that signal
    seconds: float
    lost: str = ""  # why the process was lost with its machine (a dead Ray node); its runs are to be resumed


class Executor(ABC):
    """Runs trial commands with bounded concurrency."""

    cuda: bool  # trials run on GPUs (the sweep sizes fused groups for them)
    where: str  # for the sweep's first line, e.g. "CPU, 1 thread(s) per trial"

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

    @abstractmethod
    def close(self) -> None:
        """Let go of what the executor holds (a Ray connection); the sweep calls this once, at its end."""


def visible_gpus(count: int, environ: Mapping[str, str] = os.environ) -> list[str]:
    """This process's GPUs as a child process must name them: the entries of its own CUDA_VISIBLE_DEVICES (indices,
    GPU-... UUIDs or MIG-... ids), of which CUDA uses the first `count`; without that variable, 0 .. count-1."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [name.strip() for name in listed.split(",") if name.strip()][:count]


def plan_slots(workers: int, gpus: list[str], trials_per_gpu: int, cpu_count: int) -> tuple[list[str | None], int]:
    """One slot per concurrent trial process (with the GPU it runs on) and torch threads per trial.

    GPUs are dealt round-robin, so a second GPU is used before the first takes a second process. workers=0 means
    every GPU slot (gpus x trials_per_gpu), or one process at a time on CPU; a larger workers is honoured (more
    processes share each GPU, and each plans its memory for that). CPU cores are divided among the processes.
    """
    if gpus:
        slots: list[str | None] = [gpus[i % len(gpus)] for i in range(workers or len(gpus) * trials_per_gpu)]
    else:
        slots = [None] * (workers or 1)
    return slots, max(1, cpu_count // len(slots))


class LocalProcessPool(Executor):
    """Trials as child processes of the sweep, in its process group (Ctrl-C and killpg reach them all)."""

    def __init__(self, slots: list[str | None], threads_per_trial: int):
        self.slots = slots
        self.threads = threads_per_trial
        self._procs: dict[int, tuple[subprocess.Popen, TrialLaunch, float, int]] = {}  # slot -> process
        gpus = sorted({slot for slot in slots if slot is not None})
        self.cuda = bool(gpus)
        self.where = f"{len(gpus)} GPU(s)" if gpus else f"CPU, {threads_per_trial} thread(s) per trial"

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def running(self) -> list[TrialLaunch]:
        # list() copies in one step: the driver's heartbeat thread reads this while the driver changes it
        return [entry[1] for entry in list(self._procs.values())]

    def start(self, launch: TrialLaunch) -> int:
        slot = next(i for i in range(len(self.slots)) if i not in self._procs)
        env = {**os.environ, **launch.env, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        env.update({EXECUTOR_ENV: "local", NODE_ENV: socket.gethostname()})
        gpu = self.slots[slot]
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu  # the parent's own name for it: the trial sees it as cuda:0
            env[PROCESSES_PER_GPU_ENV] = str(self.slots.count(gpu))  # each plans its memory for its share
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

    def close(self) -> None:
        """Nothing to let go of: the trials are this process's children, waited for by stop() or wait()."""


def make_executor(
    kind: str, workers: int, trials_per_gpu: int, input_path: str | None = None, ray_address: str | None = None
) -> Executor:
    """The executor a sweep asked for: the local pool over this machine's GPUs (or CPU), or a Ray cluster
    (which sends the text --input or the usual places give, checked, to nodes that lack it)."""
    if kind == "local":
        import torch  # CUDA is looked at only where trials run locally

        gpus = visible_gpus(torch.cuda.device_count())
        slots, threads = plan_slots(workers, gpus, trials_per_gpu, os.cpu_count() or 1)
        return LocalProcessPool(slots, threads)
    if kind == "ray":
        try:
            import ray  # noqa: F401  (an optional extra)
        except ImportError:
            missing = "executor='ray' needs Ray, which is not installed: pip install 'nanosweep[ray]'"
            raise ExecutorError(missing) from None
        from nanosweep.data import find_input
        from nanosweep.ray_executor import RayExecutor

        return RayExecutor(ray_address, workers, trials_per_gpu, find_input(input_path))
    raise ExecutorError(f"executor={kind!r} is not allowed: choose one of {', '.join(EXECUTORS)}")
