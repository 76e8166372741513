"""Time the trainer: per-iteration and evaluation cost of the real loop, and a whole tracked run.

    NANOSWEEP_INPUT=... .venv/bin/python bench/bench_train.py [--device cuda] [--iters 30]

Prints a Markdown table for bench/README.md. Iteration times come from the loop's own log calls
(log_interval=1), so they include everything the loop does per step, sync point included.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext

import mlflow
import torch

from nanosweep.config import TrainConfig
from nanosweep.data import Batches, prepare
from nanosweep.grid import PROFILES
from nanosweep.train import build_model, estimate_loss, resolve_hardware, train
from nanosweep.trial import run_trial

ARCHITECTURES = {
    "b64_L4_H4_E128_BS8": dict(block_size=64, n_layer=4, n_head=4, n_embd=128, batch_size=8),
    "b128_L6_H8_E256_BS16": dict(block_size=128, n_layer=6, n_head=8, n_embd=256, batch_size=16),
}


class StepClock:
    """Observer that notes when each iteration's log call arrives; nothing is stored anywhere else."""

    def __init__(self) -> None:
        self.stamps: list[tuple[int, float]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "iter_loss" in metrics:
            self.stamps.append((step, time.perf_counter()))

    def log_checkpoint(self, checkpoint: dict) -> None:
        pass


def iteration_seconds(cfg: TrainConfig, batches: Batches) -> float:
    """Median wall time of one optimizer step, measured between consecutive iterations."""
    clock = StepClock()
    train(cfg, build_model(cfg, 65), batches, clock)
    gaps = [b[1] - a[1] for a, b in zip(clock.stamps[2:], clock.stamps[3:])]  # skip warm-up steps
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    prepared = prepare()
    rows = []
    for name, arch in ARCHITECTURES.items():
        base = TrainConfig(**arch, device=args.device, log_interval=1, eval_interval=10_000, num_samples=0)
        hw = resolve_hardware(base)
        batches = Batches(prepared, hw.device)
        single = iteration_seconds(base.replace(gradient_accumulation_steps=1, max_iters=args.iters), batches)
        accum = iteration_seconds(base.replace(max_iters=max(6, args.iters // 8)), batches)  # the recipe's 40
        model = build_model(base, 65).to(hw.device)
        autocast = nullcontext() if hw.dtype == torch.float32 else torch.autocast(hw.device.type, dtype=hw.dtype)
        t0 = time.perf_counter()
        estimate_loss(model, batches, base, 0, autocast)
        evaluation = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
            quick = PROFILES["quick"](base.replace(max_iters=1000, log_interval=10, eval_interval=200, num_samples=10))
            t0 = time.perf_counter()
            run_trial(quick, "bench")
            whole = time.perf_counter() - t0
        full_run = 1000 * accum + 6 * evaluation  # MI1000: 1000 steps, evaluations at 0, 200, ..., 1000
        rows.append((name, single, accum, evaluation, whole, full_run))
    device = str(hw.device) if hw.device.type == "cpu" else torch.cuda.get_device_name(hw.device)
    print(
        f"device: {device} ({hw.dtype_name}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}\n"
    )
    print(
        "| config | iteration, no accumulation | iteration, 40 micro-batches | evaluation (2 x 200 batches) |"
        " whole quick run (tracked, MI50) | full MI1000 run (estimated) |"
    )
    print("|---|---|---|---|---|---|")
    for name, single, accum, evaluation, whole, full_run in rows:
        print(
            f"| {name} | {single * 1000:.1f} ms | {accum:.2f} s | {evaluation:.2f} s | {whole:.1f} s | "
            f"{full_run / 60:.0f} min |"
        )


if __name__ == "__main__":
    main()
