"""The study's cost three ways, side by side on one machine: nanosweep fused, nanosweep --fuse 1, nanoGPT's train.py.

    NANOSWEEP_INPUT=... .venv/bin/python bench/bench_study.py --nanogpt ~/nanoGPT [--device cuda] [--archs all]
    NANOSWEEP_INPUT=... .venv/bin/python bench/bench_study.py --sweep all --fuse auto   # the real thing, timed

Per architecture (the study's smallest and largest by default, or all 16 with --archs all) it times, with the
full recipe (40 micro-batches of batch_size, evaluations of 2 x 200 batches):
- nanosweep fused: the real loop (train.train_fused) on the member's fusion group of that architecture and
  batch size (4 trials: MI1000/MI2000 x D10/D20), seconds per iteration of the whole group and one evaluation;
- nanosweep --fuse 1: one of those trials alone, the same two figures;
- nanoGPT: its own train.py from the checkout given with --nanogpt (never copied here), with the study's
  template config on the same device, seconds per iteration and one evaluation, read from what it prints.
Each figure is extrapolated to the 128 runs (1000 or 2000 iterations, an evaluation every 200): architectures not
measured are scaled by model FLOPs per iteration from the nearest measured one. --sweep runs `nanosweep sweep`
for real into a fresh SQLite store and reports its wall time, tokens/s and model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from nanosweep.config import TrainConfig
from nanosweep.data import Batches, find_input, prepare
from nanosweep.group import FusedGroup, Trial, build_model
from nanosweep.hardware import resolve_hardware
from nanosweep.study.grid import default_sweeps_dir, expand, load_members
from nanosweep.train import estimate_losses, plan_passes, train_fused

VOCAB = 65
EVALS_PER_RUN = {1000: 6, 2000: 11}  # at 0, every 200 and at max_iters


class StepClock:
    """Observer that notes when each iteration's log call arrives; nothing is stored anywhere."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "iter_loss" in metrics:
            self.stamps.append(time.perf_counter())

    def log_checkpoint(self, checkpoint: dict) -> None:
        pass


def flops_per_iter(cfg: TrainConfig) -> float:
    """nanoGPT's estimate_mfu: 6N + 12 L H Q T FLOPs per token, times the recipe's tokens per iteration."""
    n = 12 * cfg.n_layer * cfg.n_embd**2 + VOCAB * cfg.n_embd
    return (6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size) * cfg.tokens_per_iter


def loop_seconds(configs: list[TrainConfig], batches: Batches, iters: int) -> tuple[float, float]:
    """(seconds per iteration of the group, seconds per evaluation of the group), from the real loop."""
    # the loop evaluates at 0 and at max_iters: with one batch there, the steps are what it spends its time on
    timed = [c.replace(max_iters=iters + 2, log_interval=1, eval_iters=1, num_samples=0) for c in configs]
    clocks = [StepClock() for _ in timed]
    hw = resolve_hardware(timed[0])
    trials = [Trial(c, build_model(c, VOCAB), clock) for c, clock in zip(timed, clocks)]
    train_fused(trials, batches, hw, lambda trial, result: None)
    # step s's loss is read once step s+1 is done, the last one at the end with no step between: left out; the
    # intervals are then steps 2 .. iters+1, after a warm-up step
    stamps = clocks[0].stamps[:-1]
    step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    group = FusedGroup([Trial(c, build_model(c, VOCAB), StepClock()) for c in configs], hw)
    autocast = nullcontext() if hw.dtype == torch.float32 else torch.autocast(hw.device.type, dtype=hw.dtype)
    plan = plan_passes(group, batches, autocast)  # measured on a GPU, before the clock starts
    if hw.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    estimate_losses(group, batches, autocast, plan)
    return step, time.perf_counter() - t0


def nanogpt_seconds(tree: Path, cfg: TrainConfig, device: str, iters: int) -> tuple[float, float]:
    """(seconds per iteration, seconds per evaluation) of nanoGPT's own train.py with the study's template."""
    data = tree / "data" / "shakespeare_char"
    if not (data / "train.bin").exists():
        (data / "input.txt").write_bytes(find_input().read_bytes())
        subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    dtype = "float32" if device == "cpu" else "bfloat16"  # nanoGPT trains a CPU in fp32 whatever it is told
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "bench_config.py"
        config.write_text(
            f"out_dir = {work!r}\ndataset = 'shakespeare_char'\neval_interval = {iters}\nlog_interval = 1\n"
            f"always_save_checkpoint = True\nbatch_size = {cfg.batch_size}\nblock_size = {cfg.block_size}\n"
            f"n_layer = {cfg.n_layer}\nn_head = {cfg.n_head}\nn_embd = {cfg.n_embd}\ndropout = {cfg.dropout}\n"
            f"max_iters = {iters}\nlr_decay_iters = {iters}\ndevice = {device!r}\ndtype = {dtype!r}\n"
            f"compile = False\ngradient_accumulation_steps = {cfg.gradient_accumulation_steps}\n"
            f"eval_iters = {cfg.eval_iters}\n"
        )
        out = subprocess.run(
            [sys.executable, "train.py", str(config)], cwd=tree, check=True, capture_output=True, text=True
        ).stdout
    times = {
        int(m[1]): float(m[2]) / 1000 for m in re.finditer(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", out, re.M)
    }
    steps = [times[i] for i in range(2, iters)]  # iterations 0 and `iters` carry the evaluations
    step = statistics.median(steps)
    return step, times[iters] - step


@dataclass
class Measured:
    name: str
    cfg: TrainConfig
    flops: float
    seconds: dict[str, tuple[float, float]]  # way -> (per iteration, per evaluation)


def study_groups(device: str) -> dict[str, list[TrainConfig]]:
    """The study's fusion groups with the full recipe: architecture and batch size -> its 4 trials per member."""
    groups: dict[str, list[TrainConfig]] = {}
    for member in load_members(default_sweeps_dir(), "all"):
        for point in expand(member, "full"):
            c = point.config.replace(device=device)
            groups.setdefault(f"b{c.block_size}_L{c.n_layer}_H{c.n_head}_E{c.n_embd}_BS{c.batch_size}", []).append(c)
    return groups


def extrapolate(groups: dict[str, list[TrainConfig]], measured: list[Measured], way: str) -> float:
    """Seconds for the whole study, each group scaled by FLOPs from the measured architecture nearest in FLOPs."""
    total = 0.0
    for configs in groups.values():
        flops = flops_per_iter(configs[0])
        ref = min(measured, key=lambda m: abs(m.flops - flops))
        step, evaluation = (s * flops / ref.flops for s in ref.seconds[way])
        if way == "fused":  # the group trains together; the MI1000 trials leave half-way (scaled by trials left)
            long, k = sum(c.max_iters == 2000 for c in configs), len(configs)
            total += 1000 * step + 1000 * step * long / k + evaluation * (6 + 5 * long / k)
        else:
            total += sum(c.max_iters * step + EVALS_PER_RUN[c.max_iters] * evaluation for c in configs)
    return total


def run_sweep(member: str, fuse: str, device: str) -> None:
    """Time `nanosweep sweep` with the full recipe into a fresh store; tokens/s and MFU from its runs."""
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "nanosweep", "sweep", "--member", member, "--fuse", fuse]
        subprocess.run(cmd, cwd=work, env=env, check=True)
        wall = time.perf_counter() - t0
    configs = [c for group in study_groups(device).values() for c in group]
    if member != "all":
        names = {p.config.run_name for m in load_members(default_sweeps_dir(), member) for p in expand(m, "full")}
        configs = [c for c in configs if c.run_name in names]
    tokens = sum(c.max_iters * c.tokens_per_iter for c in configs)
    flops = sum(c.max_iters * flops_per_iter(c) for c in configs)
    print(f"nanosweep sweep --member {member} --fuse {fuse}: {len(configs)} runs in {wall / 60:.1f} min wall clock, ")
    print(f"{tokens / wall:,.0f} training tokens/s, {flops / wall / 1e12:.1f} model TFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iters", type=int, default=3, help="timed recipe iterations after one warm-up")
    parser.add_argument("--archs", default="extremes", help="extremes (smallest and largest), smallest, largest or all")
    parser.add_argument("--nanogpt", type=Path, default=None, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--sweep", default=None, help="also time `nanosweep sweep --member SWEEP` for real")
    parser.add_argument("--fuse", default="auto")
    args = parser.parse_args()
    hw = resolve_hardware(TrainConfig(device=args.device))
    device = str(hw.device)
    batches = Batches(prepare(), hw.device)
    groups = study_groups(device)
    names = sorted(groups, key=lambda n: flops_per_iter(groups[n][0]))
    chosen = {"all": names, "smallest": names[:1], "largest": names[-1:]}.get(args.archs, [names[0], names[-1]])
    measured = []
    for name in chosen:
        configs = sorted(groups[name], key=lambda c: (c.dropout, c.max_iters))[:4]  # one member's group
        m = Measured(name, configs[0], flops_per_iter(configs[0]), {})
        m.seconds["fused"] = loop_seconds(configs, batches, args.iters)
        m.seconds["fuse 1"] = loop_seconds(configs[:1], batches, args.iters)
        if args.nanogpt:
            m.seconds["nanoGPT"] = nanogpt_seconds(args.nanogpt, configs[0], device, args.iters + 3)
        measured.append(m)
        dtype = resolve_hardware(configs[0]).dtype_name  # dtype=auto for this architecture; nanoGPT: fp32 on CPU
        print(name, dtype, {way: (round(s, 3), round(e, 3)) for way, (s, e) in m.seconds.items()}, flush=True)

    gpu = torch.cuda.get_device_name(hw.device) if hw.device.type == "cuda" else None
    print(
        f"\ndevice: {gpu or 'cpu'} ({hw.dtype_name}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}\n"
    )
    print("| architecture (4 trials per group) | way | s per iteration (group) | s per evaluation (group) |")
    print("|---|---|---|---|")
    for m in measured:
        for way, (step, evaluation) in m.seconds.items():
            print(f"| {m.name} | {way} | {step:.3f} | {evaluation:.2f} |")
    study_flops = sum(c.max_iters * flops_per_iter(c) for group in groups.values() for c in group)
    print("\n| the study's 128 runs, extrapolated | hours | x nanoGPT | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    totals = {way: extrapolate(groups, measured, way) for way in measured[0].seconds}
    for way, seconds in totals.items():
        ratio = f"{totals['nanoGPT'] / seconds:.2f}" if "nanoGPT" in totals else "-"
        mfu = f"{study_flops / seconds / (args.peak_tflops * 1e12):.1%}" if gpu else "-"
        print(f"| {way} | {seconds / 3600:.2f} | {ratio} | {study_flops / seconds / 1e12:.3f} | {mfu} |")
    if args.sweep:
        run_sweep(args.sweep, args.fuse, device)


if __name__ == "__main__":
    main()
