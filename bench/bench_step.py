"""What one fused training step costs in launches: aten operations per step and host time per step, K = 1, 2, 4, 8.

    .venv/bin/python bench/bench_step.py --layers 6 --trials 1,2,4,8
    PYTHONPATH=OTHER_CHECKOUT/src .venv/bin/python bench/bench_step.py ...   # the same figures for another version
    .venv/bin/python bench/bench_step.py --layers 4 --block 64 --embd 128 --heads 4 --batch 8 --accum 40 \
        --dropout 0.1 --per_pass 64 --threads 2 --trials 1 --iters 1 --repeats 3   # the recipe's step, passes of 64

A GPU running these tiny models waits on the host: each aten operation is a kernel launch (about 5-10 us of host
time), so a step's cost is its number of operations. The counter is a TorchDispatchMode that sees every aten call,
forward, backward and optimizer. A step is measured as the difference between train_fused runs of 2n and n
iterations (their evaluations, at 0 and at the end, cancel), through the loop's public interface only, so the script
measures any version of nanosweep. Host time is that difference in wall-clock time on the CPU at a width where
arithmetic is negligible (block 16, width 32, batch 2: launch-bound, as the study's models are on a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanosweep.config import TrainConfig
from nanosweep.data import Batches, prepare
from nanosweep.memory import PassPlan
from nanosweep.train import train_fused

try:  # the layout since issue 18
    from nanosweep.group import Trial, build_model
    from nanosweep.hardware import resolve_hardware
except ImportError:  # an earlier version, measured side by side
    from nanosweep.train import Trial, build_model, resolve_hardware

VOCAB = 65


class CountOps(TorchDispatchMode):
    """Counts every aten operation dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.count += 1
        return func(*args, **(kwargs or {}))


class Quiet:
    """A RunObserver that keeps nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_checkpoint(self, checkpoint: dict) -> None:
        pass


@dataclass(frozen=True)
class Size:
    layers: int = 6
    block: int = 16
    embd: int = 32
    heads: int = 2
    batch: int = 2
    accum: int = 1  # micro-batches of `batch` sequences per step (the recipe's gradient_accumulation_steps: 40)
    dropout: float = 0.0  # the study trains with 0.1 and 0.2
    per_pass: int = 0  # sequences per trial in a pass; 0: the device's own plan (train.plan_passes)
    dtype: str = "float32"
    compile: str = "off"  # on: torch.compile'd passes (the figures then exclude compiling: 2n - n iterations)


def configs(size: Size, trials: int, iters: int) -> list[TrainConfig]:
    base = TrainConfig(block_size=size.block, n_layer=size.layers, n_head=size.heads, n_embd=size.embd,
                       batch_size=size.batch, gradient_accumulation_steps=size.accum, max_iters=iters,
                       eval_interval=10**6, eval_iters=1, log_interval=10**6, warmup_iters=10, dropout=size.dropout,
                       device="cpu",
                       dtype=size.dtype, **({"compile": size.compile} if size.compile != "off" else {}))  # fmt: skip
    return [base.replace(seed=k + 1) for k in range(trials)]


def run(cfgs: list[TrainConfig], batches: Batches, per_pass: int = 0) -> None:
    trials = [Trial(c, build_model(c, VOCAB), Quiet()) for c in cfgs]
    plan = PassPlan(preferred=per_pass) if per_pass else None  # None: what train_fused plans for the device
    train_fused(trials, batches, resolve_hardware(cfgs[0]), lambda trial, result: None, plan)


def ops_per_step(size: Size, trials: int, batches: Batches, n: int = 2) -> int:
    counts = []
    for iters in (n, 2 * n):
        with CountOps() as counter:
            run(configs(size, trials, iters), batches, size.per_pass)
        counts.append(counter.count)
    return (counts[1] - counts[0]) // n


def host_ms_per_step(size: Size, trials: int, batches: Batches, n: int, repeats: int) -> float:
    """Median over repeats of the wall-clock difference between 2n and n iterations, per iteration."""
    samples = []
    for _ in range(repeats):
        times = []
        for iters in (n, 2 * n):
            t0 = time.perf_counter()
            run(configs(size, trials, iters), batches, size.per_pass)
            times.append(time.perf_counter() - t0)
        samples.append((times[1] - times[0]) / n * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in vars(Size()).items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trials", default="1,2,4,8")
    parser.add_argument("--iters", type=int, default=20, help="n: host time from 2n - n iterations")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # one core by default: the other's load moves the figures less
    size = Size(**{name: getattr(args, name) for name in vars(Size())})
    batches = Batches(prepare(), torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.threads} thread(s), {size}, {os.uname()[1]}")
    print(f"| trials K | aten ops per step | host ms per step (median) | first run of {args.iters} iterations, s |")
    print("|---|---|---|---|")
    for k in (int(t) for t in args.trials.split(",")):
        t0 = time.perf_counter()
        # compiled: this run pays for compiling, the timed ones do not
        run(configs(size, k, args.iters), batches, size.per_pass)
        first = time.perf_counter() - t0
        ops = ops_per_step(size, k, batches) if size.compile == "off" else "-"  # compiled kernels are not aten ops
        ms = host_ms_per_step(size, k, batches, args.iters, args.repeats)
        print(f"| {k} | {ops} | {ms:.2f} | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
