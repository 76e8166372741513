"""A fused group: the trials of one fusion key trained as one stacked model, each with its own schedule,
bookkeeping and checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from nanosweep.checkpoint import make_checkpoint
from nanosweep.config import TrainConfig
from nanosweep.data import Batches
from nanosweep.hardware import Hardware
from nanosweep.model import GPT, GPTConfig, init_weights
from nanosweep.optim import StackedAdamW


class RunObserver(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class TrainOutcome:
    iter_num: int
    train_loss: float
    val_loss: float
    best_val_loss: float


def learning_rate(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at decay_iters, then min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.decay_iters:
        return cfg.min_lr
    # nanoGPT divides 0/0 here when warmup_iters == decay_iters; the boundary itself is the peak
    if cfg.decay_iters == cfg.warmup_iters:
        return cfg.learning_rate
    ratio = (it - cfg.warmup_iters) / (cfg.decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def build_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    """One trial's fresh model: nanoGPT's init from its seed alone, so its weights are the same fused or not."""
    config = GPTConfig(cfg.block_size, vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)
    model = GPT(config)
    model.load_trial_state(0, init_weights(config, cfg.seed))
    return model


class Diverged(RuntimeError):
    """A trial's loss became NaN or infinite: its run ends FAILED, its fused siblings go on."""


class StoppedEarly(Exception):
    """An observer ended its trial at an evaluation on purpose (a search's pruner); the run keeps these tags."""

    def __init__(self, reason: str, tags: dict[str, str]):
        super().__init__(reason)
        self.tags = tags


@dataclass
class Trial:
    """One configuration to train: its model (fresh from build_model; it holds the trained weights once the trial
    ends), observer and checkpoint to resume from."""

    cfg: TrainConfig
    model: GPT
    observer: RunObserver
    resume_from: dict[str, Any] | None = None


def fusion_key(cfg: TrainConfig) -> tuple:
    """Trials with equal keys can train fused: same weight shapes (any number of heads), batch shape and evaluation
    size."""
    return (
        cfg.block_size,
        cfg.n_layer,
        cfg.n_embd,
        cfg.batch_size,
        cfg.gradient_accumulation_steps,
        cfg.eval_iters,
        cfg.device,
        cfg.dtype,
        cfg.compile,
    )


class RunningTrial:
    """A trial inside the loop: its batch generator, iteration and last evaluation (its weights and AdamW state
    are its slice of the group's stack)."""

    def __init__(self, trial: Trial):
        self.trial, self.cfg, self.observer = trial, trial.cfg, trial.observer
        # batches are drawn on the CPU, so the stream (and a checkpoint's state of it) is the same on any device
        self.generator = torch.Generator().manual_seed(trial.cfg.seed)
        self.iter_num, self.best_val_loss = 0, float("inf")
        self.losses = {"train": math.nan, "val": math.nan}
        self.resumed_at: int | None = None
        if trial.resume_from is not None:
            ckpt = trial.resume_from
            self.iter_num, self.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
            self.losses, self.resumed_at = ckpt["eval_losses"], ckpt["iter_num"]
            self.generator.set_state(ckpt["rng"]["batches"])
        self.t0, self.iters_since_log = time.perf_counter(), 0

    @property
    def next_evaluation(self) -> int:
        """The next iteration after this one at which the trial evaluates (and checkpoints)."""
        cfg = self.cfg
        return min((self.iter_num // cfg.eval_interval + 1) * cfg.eval_interval, cfg.max_iters)

    @property
    def eval_due(self) -> bool:
        """Evaluate at 0, every eval_interval and at max_iters; a resume point was evaluated before the kill."""
        cfg, it = self.cfg, self.iter_num
        return (it % cfg.eval_interval == 0 or it == cfg.max_iters) and it != self.resumed_at

    def outcome(self) -> TrainOutcome:
        return TrainOutcome(self.iter_num, self.losses["train"], self.losses["val"], self.best_val_loss)


class FusedGroup:
    """The trials training together: one stacked GPT and one StackedAdamW, of which runs[k] is slice k."""

    def __init__(self, trials: list[Trial], hw: Hardware):
        self.hw = hw
        configs = [t.cfg for t in trials]
        rates, heads = tuple(c.dropout for c in configs), tuple(c.n_head for c in configs)
        self.model = GPT(trials[0].model.config, len(trials), rates, heads).to(hw.device)
        # the passes go through `forward`: compiled (forward and backward, by AOTAutograd), Dynamo compiles again when
        # trials leave the stack or a pass is shorter, and after a second size treats that dimension as dynamic
        self.forward = torch.compile(self.model) if hw.compile else self.model
        self.optimizer = StackedAdamW(
            self.model,
            betas=[(c.beta1, c.beta2) for c in configs],
            weight_decay=[c.weight_decay for c in configs],
            grad_clip=[c.grad_clip for c in configs],
            loss_scaling=hw.dtype == torch.float16,  # fp16 underflows without loss scaling; bf16 and fp32 do not
        )
        for k, trial in enumerate(trials):
            trial.model.to(hw.device)  # it takes the trial's trained weights at its end (samples are drawn from it)
            if trial.resume_from is None:
                self.model.load_trial_state(k, trial.model.trial_state(0))
            else:  # from any device and kernel: the state moves to this stack's device
                self.model.load_trial_state(k, trial.resume_from["model"])
                self.optimizer.load_trial_state(k, trial.resume_from["optimizer"], trial.resume_from.get("scaler"))
        self.runs = [RunningTrial(t) for t in trials]
        # every trial's learning rate at every iteration, on the device: a step reads its row without a copy
        longest = max(c.max_iters for c in configs)
        table = [[learning_rate(min(i, c.max_iters), c) for i in range(longest + 1)] for c in configs]
        self.lr_table = torch.tensor(table, device=hw.device)
        self.iters = torch.tensor([r.iter_num for r in self.runs], device=hw.device)
        self.starts = torch.empty(len(trials), 0, 0, dtype=torch.long, device=hw.device)  # drawn steps ahead
        self.drawn = 0  # of which this many steps are used

    def next_batch(self, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's windows for every trial, (K, batch, block) twice. The starts are drawn in bulk up to the next
        evaluation of any trial, so that a checkpoint's generator state is the one of a draw per step."""
        cfg = self.runs[0].cfg
        if self.drawn == self.starts.size(1):
            steps = min(run.next_evaluation - run.iter_num for run in self.runs)
            generators = [run.generator for run in self.runs]
            total = cfg.gradient_accumulation_steps * cfg.batch_size
            self.starts, self.drawn = batches.draw_starts("train", cfg.block_size, generators, total, steps), 0
        self.drawn += 1
        return batches.windows("train", cfg.block_size, self.starts[:, self.drawn - 1])

    def learning_rates(self) -> torch.Tensor:
        """This step's learning rate of each trial, (K,)."""
        return self.lr_table.gather(1, self.iters[:, None])[:, 0]

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, per_pass: int, autocast: Any) -> torch.Tensor:
        """Accumulate every trial's gradient of its mean loss over its batch x (K, n, T) in passes of per_pass
        sequences; return those losses (K,)."""
        total = x.size(1)
        step_loss = torch.zeros(len(self.runs), device=x.device)
        for a in range(0, total, per_pass):
            with autocast:
                _, loss = self.forward(x[:, a : a + per_pass], y[:, a : a + per_pass])
                loss = loss * (min(per_pass, total - a) / total)  # a pass's share of the mean over the batch
            # the trials' weights are disjoint slices, so the gradient of the sum is each trial's own gradient
            self.optimizer.scaled(loss).backward()
            step_loss += loss.detach().float()
        return step_loss

    def step(self) -> None:
        self.optimizer.step(self.learning_rates())
        self.iters += 1
        for run in self.runs:
            run.iter_num += 1
            run.iters_since_log += 1

    def drop_gradients(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def checkpoint(self, k: int) -> dict[str, Any]:
        """Trial k's ckpt.pt: its own weights and AdamW state (nanoGPT's format), RNG state, scale, on the CPU."""
        run, hw = self.runs[k], self.hw
        rng = {"torch": torch.get_rng_state(), "batches": run.generator.get_state()}
        if hw.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(hw.device)
        model, optimizer = (
            self.model.saved_state(k),
            self.optimizer.trial_state(k, learning_rate(run.iter_num, run.cfg)),
        )
        config = run.trial.model.config
        ckpt = make_checkpoint(model, optimizer, config, run.iter_num, run.best_val_loss, run.cfg, rng, run.losses)
        if self.optimizer.loss_scaling:
            ckpt["scaler"] = self.optimizer.scaler_state(k)
        return ckpt

    def leave(self, runs: list[RunningTrial]) -> None:
        """These trials leave the stack: each trial's model takes its trained weights, the others go on."""
        for run in runs:
            run.trial.model.load_trial_state(0, self.model.trial_state(self.runs.index(run)))
        keep = [k for k, run in enumerate(self.runs) if run not in runs]
        self.model.keep(keep)
        self.optimizer.keep(keep)
        self.lr_table, self.iters, self.starts = self.lr_table[keep], self.iters[keep], self.starts[keep]
        self.runs = [self.runs[k] for k in keep]


def seed_global_rng(trials: list[Trial], hw: Hardware) -> None:
    """Dropout draws from the global RNG: seed it with the first trial's seed, or continue it from the first resumed
    checkpoint (exact for one trial)."""
    resumed = [t.resume_from for t in trials if t.resume_from is not None]
    if not resumed:
        torch.manual_seed(trials[0].cfg.seed)
        return
    rng = resumed[0]["rng"]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and hw.device.type == "cuda":  # a run moved between CPU and GPU keeps its batches only
        torch.cuda.set_rng_state(rng["cuda"], hw.device)
