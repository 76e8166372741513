"""The training loop, read top to bottom: evaluate/checkpoint, step, log, stop.

One loop trains K trials of one architecture at once (K = 1 for a single run) as one stacked model (model.GPT)
stepped by one optimizer (optim.StackedAdamW): each trial keeps its own init, batches, dropout rate, schedule,
AdamW hyperparameters, clipping, loss scale, evaluations and checkpoints, and its slice of the stack is nanoGPT's
model. It knows nothing of MLflow: everything it reports goes to each trial's RunObserver, which the tracking
layer implements (a benchmark can use a timer).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from nanosweep.config import TrainConfig
from nanosweep.data import Batches
from nanosweep.group import (
    Diverged,
    FusedGroup,
    RunningTrial,
    RunObserver,
    StoppedEarly,
    TrainOutcome,
    Trial,
    fusion_key,
    learning_rate,
    seed_global_rng,
)
from nanosweep.hardware import Hardware, resolve_hardware
from nanosweep.memory import PassPlan, cpu_plan, measure_plan
from nanosweep.model import GPT


def plan_passes(group: FusedGroup, batches: Batches, autocast: Any) -> PassPlan:
    """CPU: passes of memory.CPU_PASS_TOKENS tokens. GPU: the whole batch in one pass where this process's share of
    memory holds it, else as many sequences as it does, measured on two probe passes before training starts."""
    cfg, hw = group.runs[0].cfg, group.hw
    total = cfg.gradient_accumulation_steps * cfg.batch_size
    if hw.device.type != "cuda":
        return cpu_plan(cfg.block_size, total)

    def probe_pass(n: int) -> None:
        # throwaway windows from generators of their own; the global RNG (dropout) is put back afterwards
        with torch.random.fork_rng(devices=[hw.device]):
            generators = [torch.Generator().manual_seed(k) for k in range(len(group.runs))]
            x, y = batches.sample_trials("train", n, cfg.block_size, generators)
            group.accumulate(x, y, n, autocast)
        group.drop_gradients()

    try:  # AdamW's moments are allocated already: nothing more is to come
        return measure_plan(probe_pass, cfg.batch_size, len(group.runs), total, 0, hw.device)
    except torch.OutOfMemoryError:  # not even the probe fits: start from one sequence per trial
        torch.cuda.empty_cache()
        return PassPlan(preferred=total, capacity=len(group.runs))


@torch.no_grad()
def estimate_losses(group: FusedGroup, batches: Batches, autocast: Any, plan: PassPlan) -> list[dict[str, float]]:
    """Each trial's mean loss over eval_iters random batches per split, in eval mode (no dropout)."""
    runs = group.runs
    cfg = runs[0].cfg  # batch_size, block_size and eval_iters are equal in a fused group
    # their own generators, seeded by the iteration: evaluation never shifts the training batches
    generators = [torch.Generator().manual_seed(r.cfg.seed * 1_000_003 + r.iter_num) for r in runs]
    group.model.eval()
    out: list[dict[str, float]] = [{} for _ in runs]
    n = cfg.eval_iters * cfg.batch_size

    def split_total(x: torch.Tensor, y: torch.Tensor, per_pass: int) -> torch.Tensor:
        total = torch.zeros(len(runs), device=batches.device)
        for a in range(0, n, per_pass):
            with autocast:
                total += group.forward(x[:, a : a + per_pass], y[:, a : a + per_pass])[1] * min(per_pass, n - a)
        return total

    for split in ("train", "val"):
        x, y = batches.sample_trials(split, n, cfg.block_size, generators)  # drawn once, whatever the passes
        total = plan.in_passes(
            functools.partial(split_total, x, y),
            lambda: plan.eval_pass(n, len(runs)),
            len(runs),
            lambda: None,
            "an evaluation",
        )
        for k, mean in enumerate((total / n).tolist()):  # one CPU-GPU sync per split
            out[k][split] = mean
    group.model.train()
    return out


def train_fused(
    trials: list[Trial],
    batches: Batches,
    hw: Hardware,
    on_end: Callable[[Trial, TrainOutcome | Diverged | StoppedEarly], None],
    plan: PassPlan | None = None,
) -> None:
    """Train trials of one fusion_key together, each to its own max_iters; `on_end` hears of each as it stops.

    A finished, diverged or stopped trial leaves the stack; the rest go on. plan says how many sequences a pass
    holds (plan_passes decides for this device when it is not given).
    """
    assert len({fusion_key(t.cfg) for t in trials}) == 1, "fused trials must share fusion_key"
    group = FusedGroup(trials, hw)
    seed_global_rng(trials, hw)
    autocast = nullcontext() if hw.dtype == torch.float32 else torch.autocast(hw.device.type, dtype=hw.dtype)
    cfg = trials[0].cfg
    total = cfg.gradient_accumulation_steps * cfg.batch_size  # the recipe's batch, per trial
    plan = plan or plan_passes(group, batches, autocast)

    def end(results: list[tuple[RunningTrial, TrainOutcome | Diverged | StoppedEarly]]) -> None:
        group.leave([run for run, _ in results])
        for run, result in results:
            on_end(run.trial, result)

    def log_losses(readback: LossReadback | None) -> None:
        diverged = readback.log(group.runs) if readback else []
        if diverged:
            end(diverged)

    pending: LossReadback | None = None  # the last logged step's losses, read after the next step is queued
    while group.runs:
        if any(run.eval_due or run.iter_num >= run.cfg.max_iters for run in group.runs):
            log_losses(pending)  # a run's losses are logged before it evaluates or ends
            pending = None

        # evaluate and checkpoint the trials whose iteration calls for it (the stack is evaluated whole)
        stopping: list[tuple[RunningTrial, TrainOutcome | Diverged | StoppedEarly]] = []
        if any(run.eval_due for run in group.runs):
            for k, (run, losses) in enumerate(zip(group.runs, estimate_losses(group, batches, autocast, plan))):
                if not run.eval_due:
                    continue
                run.losses = losses
                run.best_val_loss = min(run.best_val_loss, losses["val"])
                try:
                    run.observer.log_metrics({"train_loss": losses["train"], "val_loss": losses["val"]}, run.iter_num)
                except StoppedEarly as stop:
                    stopping.append((run, stop))
                    continue
                if not math.isfinite(losses["train"] + losses["val"]):
                    stopping.append((run, Diverged(f"evaluation loss is {losses['val']} at iteration {run.iter_num}")))
                    continue
                if run.iter_num > 0:
                    run.observer.log_checkpoint(group.checkpoint(k))
                run.t0, run.iters_since_log = time.perf_counter(), 0  # throughput excludes evaluation
        stopped = {id(run) for run, _ in stopping}
        stopping += [(r, r.outcome()) for r in group.runs if r.iter_num >= r.cfg.max_iters and id(r) not in stopped]
        if stopping:
            end(stopping)
        if not group.runs:
            break

        # one AdamW step for the whole stack over each trial's batch, drawn once, in as many passes as memory needs
        lrs = [learning_rate(r.iter_num, r.cfg) for r in group.runs]  # for the log; the step reads the device's
        x, y = group.next_batch(batches)
        step_loss = plan.in_passes(
            functools.partial(group.accumulate, x, y, autocast=autocast),
            lambda: plan.train_pass(total, len(group.runs)),
            len(group.runs),
            group.drop_gradients,
            "a training step",
        )
        logging = [k for k, r in enumerate(group.runs) if r.iter_num % r.cfg.log_interval == 0]
        group.step()

        # log the previous logging step's losses, copied to the host while this step was queued: reading them waits
        # for that copy alone, so the GPU is not left idle while the host logs
        readback = LossReadback(step_loss, group.runs, logging, lrs, hw) if logging else None
        log_losses(pending)
        pending = readback


class LossReadback:
    """One step's losses on their way to the host (a CPU-GPU sync point read late, not avoided) and the runs that
    log them: read once the next step is queued, when the copy is long done."""

    def __init__(self, step_loss: torch.Tensor, runs: list[RunningTrial], logging: list[int], lrs: list[float],
                 hw: Hardware) -> None:  # fmt: skip
        self.runs, self.logging, self.lrs = list(runs), logging, lrs
        self.iters = [run.iter_num - 1 for run in runs]  # the iteration the losses are of
        self.copied: torch.cuda.Event | None = None
        self.losses = step_loss
        if hw.device.type == "cuda":
            self.losses = torch.empty(step_loss.shape, pin_memory=True)  # pinned, so that the copy does not block
            self.losses.copy_(step_loss, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(hw.device))  # the copy's stream, whichever device is current

    def log(self, training: list[RunningTrial]) -> list[tuple[RunningTrial, Diverged]]:
        """Log each logging run still training; return those whose loss is not finite, which end as diverged."""
        if self.copied is not None:
            self.copied.synchronize()
        values = self.losses.tolist()
        still = [k for k, run in enumerate(self.runs) if run in training]
        for k in (k for k in self.logging if k in still):
            run = self.runs[k]
            elapsed = time.perf_counter() - run.t0
            tokens_per_sec = run.iters_since_log * run.cfg.tokens_per_iter / elapsed
            metrics = {"iter_loss": values[k], "lr": self.lrs[k], "tokens_per_sec": tokens_per_sec}
            run.observer.log_metrics(metrics, step=self.iters[k])
            run.t0, run.iters_since_log = time.perf_counter(), 0
        return [(self.runs[k], Diverged(f"training loss is {values[k]} at iteration {self.iters[k]}"))
                for k in still if not math.isfinite(values[k])]  # fmt: skip


def train(
    cfg: TrainConfig,
    model: GPT,
    batches: Batches,
    observer: RunObserver,
    resume_from: dict[str, Any] | None = None,
    hardware: Hardware | None = None,
) -> TrainOutcome:
    """Train one model (fresh from build_model) to max_iters, or on from a checkpoint of the same config."""
    results: list[TrainOutcome | Diverged | StoppedEarly] = []
    train_fused(
        [Trial(cfg, model, observer, resume_from)],
        batches,
        hardware or resolve_hardware(cfg),
        lambda _, r: results.append(r),
    )
    if isinstance(results[0], Exception):
        raise results[0]
    return results[0]
