"""How many sequences one forward/backward pass holds: an execution choice that never changes the maths.

The recipe's batch (gradient_accumulation_steps x batch_size sequences per trial, the loss their mean) may run in
any number of passes. On a CPU a pass holds about CPU_PASS_TOKENS tokens of all its trials together; on a GPU tiny
passes leave it idle, so a pass holds as many sequences as this process's share of the GPU's memory does: measured
from the peaks of two probe passes (never guessed from a formula), and halved again whenever the allocator still
runs out. The plan is per trial-sequence, so when a fused group shrinks its passes grow back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

PROCESSES_PER_GPU_ENV = "NANOSWEEP_PROCESSES_PER_GPU"  # set by the local pool: how many trial processes share a GPU
HEADROOM = 0.85  # of this process's share: the caching allocator's fragmentation, cuBLAS and attention workspaces
# a CPU pass's tokens (sequences x block_size x trials): one trial's micro-batch at block 64 (512 tokens) took
# 1.15-1.27x as long a token as passes of 4096; bigger passes gained up to 10 % at width 128, lost 6 % at 256
# (bench/README, "Passes on a CPU")
CPU_PASS_TOKENS = 4096

T = TypeVar("T")


class DoesNotFit(RuntimeError):
    """Even one sequence per trial in a pass runs out of memory: the group cannot train on this device as it is."""


@dataclass
class PassPlan:
    """Sequences per trial in one pass: `preferred` where memory allows, never above `capacity` trial-sequences."""

    preferred: int  # sequences per trial in a training pass where the capacity allows: the recipe's whole batch
    capacity: int | None = None  # trial-sequences (sequences x trials) one pass can hold; None: no limit known
    bytes_per_sequence: float = 0.0  # measured memory of one trial-sequence in a training pass (0: not measured)
    fixed_bytes: float = 0.0  # measured memory of a pass beyond its sequences (gradients, workspaces)

    def train_pass(self, total: int, n_trials: int) -> int:
        """The largest divisor of total (equal passes) that is at most preferred and fits the capacity."""
        fit = self.preferred if self.capacity is None else min(self.preferred, self.capacity // n_trials)
        return max(d for d in range(1, total + 1) if total % d == 0 and d <= max(fit, 1))

    def eval_pass(self, n: int, n_trials: int) -> int:
        """Sequences per trial in an evaluation pass (no gradients kept): as many as the capacity allows, else the
        preferred training pass."""
        fit = self.preferred if self.capacity is None else self.capacity // n_trials
        return max(1, min(n, fit))

    def shrink(self, per_pass: int, n_trials: int, what: str) -> None:
        """A pass of per_pass sequences per trial ran out of memory: from now on at most half as many trial-sequences.

        A pass of one sequence per trial that does not fit is the end: DoesNotFit, with the reason in one line.
        """
        if per_pass <= 1:
            raise DoesNotFit(
                f"{what} of {n_trials} trial(s) ran out of device memory with one sequence per trial in a pass: "
                "train fewer trials per process (--fuse N), fewer processes per GPU (--trials-per-gpu)"
                " or a smaller model"
            )
        self.capacity = per_pass * n_trials // 2

    def in_passes(
        self,
        attempt: Callable[[int], T],
        pass_size: Callable[[], int],
        n_trials: int,
        drop_partial: Callable[[], None],
        what: str,
    ) -> T:
        """attempt(sequences per pass) until it fits. After an out-of-memory error: drop_partial() (the partial
        gradients), give the failed pass's blocks back to the device, shrink the plan and try the same inputs again."""
        while True:
            per_pass = pass_size()
            try:
                return attempt(per_pass)
            except torch.OutOfMemoryError:
                drop_partial()
                if torch.cuda.is_initialized():
                    torch.cuda.empty_cache()
                self.shrink(per_pass, n_trials, what)

    def predicted_bytes(self, sequences: int, n_trials: int) -> float:
        """The measured model of a training pass's peak above what was allocated before it."""
        return self.fixed_bytes + self.bytes_per_sequence * sequences * n_trials


def cpu_plan(block_size: int, total: int) -> PassPlan:
    """A CPU's passes of a step of `total` sequences per trial: CPU_PASS_TOKENS tokens of all trials together, and
    at least one sequence per trial."""
    return PassPlan(preferred=total, capacity=max(CPU_PASS_TOKENS // block_size, 1))


def processes_on_this_gpu() -> int:
    """How many trial processes share this process's GPU (the pool says so in PROCESSES_PER_GPU_ENV; else 1)."""
    return max(1, int(os.environ.get(PROCESSES_PER_GPU_ENV) or 1))


def device_share(total: int, free: int, held: int, sharers: int) -> int:
    """Bytes of a GPU one process may plan with: its equal share among the processes sharing the GPU, and never
    more than is free now plus what this process's allocator already holds (another program may use the GPU)."""
    return min(total // sharers, free + held)


def plan_from_peaks(
    peaks: tuple[float, float], probe: int, n_trials: int, preferred: int, available: float
) -> PassPlan:
    """Two probe passes' peaks (probe and 2 x probe sequences per trial) as a line: its slope is the memory of a
    trial-sequence, its intercept the pass's own (gradients, workspaces); capacity is what `available` bytes hold."""
    per_sequence = max((peaks[1] - peaks[0]) / (probe * n_trials), 1.0)
    fixed = max(peaks[0] - per_sequence * probe * n_trials, 0.0)
    return PassPlan(preferred, max(int((available - fixed) // per_sequence), 0), per_sequence, fixed)


def measure_plan(
    run_pass: Callable[[int], None], probe: int, n_trials: int, preferred: int, reserve: int, device: torch.device
) -> PassPlan:
    """A GPU's plan from two probe passes; run_pass(n) runs one training pass of n sequences per trial and drops its
    gradients. reserve is memory still to come (AdamW's moments before the first step)."""
    peaks = []
    for n in (probe, 2 * probe):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run_pass(n)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
    free, _ = torch.cuda.mem_get_info(device)
    total = torch.cuda.get_device_properties(device).total_memory
    share = device_share(total, free, torch.cuda.memory_reserved(device), processes_on_this_gpu())
    available = share * HEADROOM - torch.cuda.memory_allocated(device) - reserve
    return plan_from_peaks((peaks[0], peaks[1]), probe, n_trials, preferred, available)
