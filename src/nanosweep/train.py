"""The training loop, read top to bottom: evaluate/checkpoint, step, log, stop.

One loop trains K trials of one architecture at once (K = 1 for a single run): each keeps its own
model, optimizer, batches, schedule and checkpoints, while their forward and backward passes run
as one stacked model (model.fused_forward). It knows nothing of MLflow: everything it reports goes
to each trial's RunObserver, which the tracking module implements (a benchmark can use a timer).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from nanosweep.checkpoint import load_optimizer_state, make_checkpoint
from nanosweep.config import ConfigError, TrainConfig
from nanosweep.data import Batches
from nanosweep.memory import PassPlan, measure_plan
from nanosweep.model import GPT, GPTConfig, fused_forward


class RunObserver(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_hardware(cfg: TrainConfig) -> Hardware:
    """cuda when present (bf16 where native, else fp16 with a grad scaler), cpu in fp32; refuse what isn't here."""
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} is not available on this machine: use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={cfg.device!r} is not available on this machine: use auto or cpu")
    device = torch.device(name)
    if cfg.dtype == "auto":
        if device.type == "cuda":
            # emulated bf16 (pre-Ampere) is slower than fp16 with loss scaling
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            dtype = torch.bfloat16 if native_bf16 else torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("dtype='float16' is not allowed on cpu: use float32 or bfloat16")
    return Hardware(device, dtype)


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
    torch.manual_seed(cfg.seed)  # the weights depend on the seed alone, fused or not
    return GPT(GPTConfig(cfg.block_size, vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout))


@dataclass(frozen=True)
class TrainOutcome:
    iter_num: int
    train_loss: float
    val_loss: float
    best_val_loss: float


class Diverged(RuntimeError):
    """A trial's loss became NaN or infinite: its run ends FAILED, its fused siblings go on."""


class StoppedEarly(Exception):
    """An observer ended its trial at an evaluation on purpose (a search's pruner); the run keeps these tags."""

    def __init__(self, reason: str, tags: dict[str, str]):
        super().__init__(reason)
        self.tags = tags


@dataclass
class Trial:
    """One configuration to train: its fresh model (from build_model), observer and checkpoint to resume from."""

    cfg: TrainConfig
    model: GPT
    observer: RunObserver
    resume_from: dict[str, Any] | None = None


def fusion_key(cfg: TrainConfig) -> tuple:
    """Trials with equal keys can train fused: same architecture, same batch shape, same evaluation size."""
    return (
        cfg.block_size,
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.batch_size,
        cfg.gradient_accumulation_steps,
        cfg.eval_iters,
        cfg.device,
        cfg.dtype,
    )


class RunningTrial:
    """A trial inside the loop: its optimizer, scaler, batch generator, iteration and last evaluation."""

    def __init__(self, trial: Trial, hw: Hardware):
        cfg, model = trial.cfg, trial.model
        self.cfg, self.model, self.observer = cfg, model.to(hw.device), trial.observer
        self.optimizer = model.configure_optimizer(
            cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), fused=hw.device.type == "cuda"
        )
        # fp16 needs loss scaling against underflow; bf16 and fp32 do not. One scaler per trial: an
        # overflow in one trial skips that trial's step only
        self.scaler = torch.amp.GradScaler(hw.device.type, enabled=hw.dtype == torch.float16)
        # batches are drawn on the CPU, so the stream (and a checkpoint's state of it) is the same on any device
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.iter_num, self.best_val_loss = 0, float("inf")
        self.losses = {"train": math.nan, "val": math.nan}
        self.resumed_at: int | None = None
        if trial.resume_from is not None:
            ckpt = trial.resume_from
            model.load_state_dict(ckpt["model"])
            load_optimizer_state(self.optimizer, ckpt["optimizer"])  # this device's AdamW kernel, not the saver's
            if "scaler" in ckpt and self.scaler.is_enabled():
                self.scaler.load_state_dict(ckpt["scaler"])
            self.iter_num, self.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
            self.losses, self.resumed_at = ckpt["eval_losses"], ckpt["iter_num"]
            self.generator.set_state(ckpt["rng"]["batches"])
        self.t0, self.iters_since_log = time.perf_counter(), 0

    @property
    def eval_due(self) -> bool:
        """Evaluate at 0, every eval_interval and at max_iters; a resume point was evaluated before the kill."""
        cfg, it = self.cfg, self.iter_num
        return (it % cfg.eval_interval == 0 or it == cfg.max_iters) and it != self.resumed_at

    def checkpoint(self, hw: Hardware) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "batches": self.generator.get_state()}
        if hw.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(hw.device)
        ckpt = make_checkpoint(
            self.model, self.optimizer, self.iter_num, self.best_val_loss, self.cfg, rng, self.losses
        )
        if self.scaler.is_enabled():
            ckpt["scaler"] = self.scaler.state_dict()
        return ckpt

    def outcome(self) -> TrainOutcome:
        return TrainOutcome(self.iter_num, self.losses["train"], self.losses["val"], self.best_val_loss)


def _restore_global_rng(trials: list[Trial], hw: Hardware) -> None:
    """Dropout draws from the global RNG: continue it from the first resumed checkpoint (exact for one trial)."""
    resumed = [t.resume_from for t in trials if t.resume_from is not None]
    if resumed:
        rng = resumed[0]["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and hw.device.type == "cuda":  # a run moved between CPU and GPU keeps its batches only
            torch.cuda.set_rng_state(rng["cuda"], hw.device)


def plan_passes(active: list[RunningTrial], batches: Batches, hw: Hardware, autocast: Any) -> PassPlan:
    """CPU: the recipe's micro-batches. GPU: the whole batch in one pass where this process's share of memory holds
    it, else as many sequences as it does, measured on two probe passes before training starts."""
    cfg = active[0].cfg
    total = cfg.gradient_accumulation_steps * cfg.batch_size
    if hw.device.type != "cuda":
        return PassPlan(preferred=cfg.batch_size)

    def probe_pass(n: int) -> None:
        # throwaway windows from generators of their own; the global RNG (dropout) is put back afterwards
        with torch.random.fork_rng(devices=[hw.device]):
            generators = [torch.Generator().manual_seed(k) for k in range(len(active))]
            x, y = batches.sample_trials("train", n, cfg.block_size, generators)
            _forward_backward(active, x, y, n, autocast)
        for run in active:
            run.model.zero_grad(set_to_none=True)

    # AdamW allocates two fp32 moments per parameter at its first step: room for them is kept now
    reserve = sum(8 * p.numel() for r in active if not r.optimizer.state for p in r.model.parameters())
    try:
        return measure_plan(probe_pass, cfg.batch_size, len(active), total, reserve, hw.device)
    except torch.OutOfMemoryError:  # not even the probe fits: start from one sequence per trial
        torch.cuda.empty_cache()
        return PassPlan(preferred=total, capacity=len(active))


@torch.no_grad()
def estimate_losses(
    trials: list[RunningTrial], batches: Batches, autocast: Any, plan: PassPlan
) -> list[dict[str, float]]:
    """Each trial's mean loss over eval_iters random batches per split, in eval mode (no dropout)."""
    cfg = trials[0].cfg  # batch_size, block_size and eval_iters are equal in a fused group
    # their own generators, seeded by the iteration: evaluation never shifts the training batches
    generators = [torch.Generator().manual_seed(t.cfg.seed * 1_000_003 + t.iter_num) for t in trials]
    models = [t.model for t in trials]
    for model in models:
        model.eval()
    out: list[dict[str, float]] = [{} for _ in trials]
    n = cfg.eval_iters * cfg.batch_size

    def split_total(x: torch.Tensor, y: torch.Tensor, per_pass: int) -> torch.Tensor:
        total = torch.zeros(len(trials), device=batches.device)
        for a in range(0, n, per_pass):
            with autocast:
                total += fused_forward(models, x[:, a : a + per_pass], y[:, a : a + per_pass])[1] * min(per_pass, n - a)
        return total

    for split in ("train", "val"):
        x, y = batches.sample_trials(split, n, cfg.block_size, generators)  # drawn once, whatever the passes
        total = plan.in_passes(
            functools.partial(split_total, x, y),
            lambda: plan.eval_pass(n, len(trials)),
            len(trials),
            lambda: None,
            "an evaluation",
        )
        for k, mean in enumerate((total / n).tolist()):  # one CPU-GPU sync per split
            out[k][split] = mean
    for model in models:
        model.train()
    return out


def train_fused(
    trials: list[Trial],
    batches: Batches,
    hw: Hardware,
    ended: Callable[[Trial, TrainOutcome | Diverged | StoppedEarly], None],
    plan: PassPlan | None = None,
) -> None:
    """Train trials of one fusion_key together, each to its own max_iters; `ended` hears of each as it stops.

    Everything but the forward/backward pass is per trial: init, batches, dropout rate, schedule, AdamW,
    clipping, evaluations, checkpoints. A finished or diverged trial leaves the stack; the rest go on. plan says
    how many sequences a pass holds (plan_passes decides for this device when it is not given).
    """
    assert len({fusion_key(t.cfg) for t in trials}) == 1, "fused trials must share fusion_key"
    active = [RunningTrial(t, hw) for t in trials]
    origin = {id(r): t for r, t in zip(active, trials)}
    _restore_global_rng(trials, hw)
    autocast = nullcontext() if hw.dtype == torch.float32 else torch.autocast(hw.device.type, dtype=hw.dtype)
    cfg = trials[0].cfg
    total = cfg.gradient_accumulation_steps * cfg.batch_size  # the recipe's batch, per trial
    plan = plan or plan_passes(active, batches, hw, autocast)

    def end(run: RunningTrial, result: TrainOutcome | Diverged | StoppedEarly) -> None:
        active.remove(run)
        run.model.zero_grad(set_to_none=True)
        ended(origin[id(run)], result)

    def drop_gradients() -> None:
        for run in active:
            run.model.zero_grad(set_to_none=True)

    while active:
        # evaluate and checkpoint the trials whose iteration calls for it
        due = [r for r in active if r.eval_due]
        for run, losses in zip(due, estimate_losses(due, batches, autocast, plan) if due else []):
            run.losses = losses
            run.best_val_loss = min(run.best_val_loss, losses["val"])
            try:
                run.observer.log_metrics({"train_loss": losses["train"], "val_loss": losses["val"]}, step=run.iter_num)
            except StoppedEarly as stop:
                end(run, stop)
                continue
            if not math.isfinite(losses["train"] + losses["val"]):
                end(run, Diverged(f"evaluation loss is {losses['val']} at iteration {run.iter_num}"))
                continue
            if run.iter_num > 0:
                run.observer.log_checkpoint(run.checkpoint(hw))
            run.t0, run.iters_since_log = time.perf_counter(), 0  # throughput excludes evaluation
        for run in [r for r in active if r.iter_num >= r.cfg.max_iters]:
            end(run, run.outcome())
        if not active:
            break

        # one optimizer step per trial over its whole batch, drawn once, in as many passes as memory needs
        lrs = [learning_rate(r.iter_num, r.cfg) for r in active]
        for run, lr in zip(active, lrs):
            for group in run.optimizer.param_groups:
                group["lr"] = lr
        x, y = batches.sample_trials("train", total, cfg.block_size, [r.generator for r in active])
        step_loss = plan.in_passes(
            functools.partial(_forward_backward, active, x, y, autocast=autocast),
            lambda: plan.train_pass(total, len(active)),
            len(active),
            drop_gradients,
            "a training step",
        )
        for run in active:
            if run.cfg.grad_clip:
                run.scaler.unscale_(run.optimizer)
                # each trial's own gradient norm, never one across trials
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            run.iters_since_log += 1

        # log: .tolist() is a CPU-GPU sync point, so only when some trial logs
        logging = [k for k, r in enumerate(active) if r.iter_num % r.cfg.log_interval == 0]
        if logging:
            values = step_loss.tolist()
            for k, run, lr in [(k, active[k], lrs[k]) for k in logging]:
                elapsed = time.perf_counter() - run.t0
                tokens_per_sec = run.iters_since_log * run.cfg.tokens_per_iter / elapsed
                run.observer.log_metrics(
                    {"iter_loss": values[k], "lr": lr, "tokens_per_sec": tokens_per_sec}, step=run.iter_num
                )
                run.t0, run.iters_since_log = time.perf_counter(), 0
            for k, run in [(k, r) for k, r in enumerate(list(active)) if not math.isfinite(values[k])]:
                end(run, Diverged(f"training loss is {values[k]} at iteration {run.iter_num}"))
        for run in active:
            run.iter_num += 1


def _forward_backward(
    active: list[RunningTrial], x: torch.Tensor, y: torch.Tensor, per_pass: int, autocast: Any
) -> torch.Tensor:
    """Accumulate every trial's gradient of its mean loss over the batch; return those losses (K,)."""
    models = [run.model for run in active]
    total = x.size(1)
    step_loss = torch.zeros(len(active), device=x.device)
    for a in range(0, total, per_pass):
        with autocast:
            _, loss = fused_forward(models, x[:, a : a + per_pass], y[:, a : a + per_pass])
            loss = loss * (min(per_pass, total - a) / total)  # a pass's share of the mean over the batch
        # the trials' parameters are disjoint, so the gradient of the sum is each trial's own gradient
        sum(run.scaler.scale(loss[k]) for k, run in enumerate(active)).backward()
        step_loss += loss.detach().float()
    return step_loss


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
