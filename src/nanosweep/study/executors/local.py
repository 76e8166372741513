"""The local executor: N trial processes on this machine, spread round-robin over its visible GPUs (or the CPU)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping

from nanosweep.memory import PROCESSES_PER_GPU_ENV
from nanosweep.study.executors.base import Executor, TrialExit, TrialLaunch
from nanosweep.tracking.names import EXECUTOR_ENV, NODE_ENV


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
        self.nodes = 1
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
