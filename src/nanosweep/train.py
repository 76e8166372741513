"""The training loop, read top to bottom: evaluate/checkpoint, step, log, stop.

It knows nothing of MLflow: everything it reports goes to a RunObserver, which the
tracking module implements (and a benchmark can replace with a timer).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from nanosweep.checkpoint import make_checkpoint
from nanosweep.config import ConfigError, TrainConfig
from nanosweep.data import Batches
from nanosweep.model import GPT, GPTConfig


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
    """cuda when present (bf16, else fp16 with a grad scaler), cpu in fp32; refuse what isn't here."""
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
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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
    torch.manual_seed(cfg.seed)  # the weights depend on the seed alone
    return GPT(GPTConfig(cfg.block_size, vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout))


@dataclass(frozen=True)
class TrainOutcome:
    iter_num: int
    train_loss: float
    val_loss: float
    best_val_loss: float


@torch.no_grad()
def estimate_loss(model: GPT, batches: Batches, cfg: TrainConfig, it: int, autocast: Any) -> dict[str, float]:
    """Mean loss over eval_iters random batches per split, in eval mode (no dropout)."""
    # its own generator, seeded by the iteration: evaluation never shifts the training batches
    generator = torch.Generator(batches.device).manual_seed(cfg.seed * 1_000_003 + it)
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = torch.zeros(cfg.eval_iters, device=batches.device)
        for k in range(cfg.eval_iters):
            x, y = batches.sample(split, cfg.batch_size, cfg.block_size, generator)
            with autocast:
                losses[k] = model(x, y)[1]
        out[split] = losses.mean().item()  # one CPU-GPU sync per split
    model.train()
    return out


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "batches": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def train(
    cfg: TrainConfig,
    model: GPT,
    batches: Batches,
    observer: RunObserver,
    resume_from: dict[str, Any] | None = None,
) -> TrainOutcome:
    """Train the model of cfg (fresh from build_model) to max_iters, or on from a checkpoint of the same config."""
    hw = resolve_hardware(cfg)
    model.to(hw.device)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), hw.device.type)
    # fp16 needs loss scaling against underflow; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(hw.device.type, enabled=hw.dtype == torch.float16)
    autocast = nullcontext() if hw.dtype == torch.float32 else torch.autocast(hw.device.type, dtype=hw.dtype)
    generator = torch.Generator(hw.device).manual_seed(cfg.seed)
    iter_num, best_val_loss, losses = 0, float("inf"), {"train": math.nan, "val": math.nan}
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        iter_num, best_val_loss = resume_from["iter_num"], resume_from["best_val_loss"]
        losses = resume_from["eval_losses"]
        rng = resume_from["rng"]
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["batches"])
        if "cuda" in rng and hw.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], hw.device)
    resumed_at = iter_num if resume_from is not None else None
    model.train()
    micro = cfg.batch_size
    t0, iters_since_log = time.perf_counter(), 0
    while True:
        # evaluate and checkpoint (the resume point was evaluated before the kill)
        if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and iter_num != resumed_at:
            losses = estimate_loss(model, batches, cfg, iter_num, autocast)
            best_val_loss = min(best_val_loss, losses["val"])
            observer.log_metrics({"train_loss": losses["train"], "val_loss": losses["val"]}, step=iter_num)
            if iter_num > 0:
                rng = _rng_state(generator, hw.device)
                observer.log_checkpoint(make_checkpoint(model, optimizer, iter_num, best_val_loss, cfg, rng, losses))
            t0, iters_since_log = time.perf_counter(), 0  # throughput excludes evaluation
        if iter_num >= cfg.max_iters:
            break

        # one optimizer step over gradient_accumulation_steps micro-batches, drawn in one gather
        lr = learning_rate(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batches.sample("train", cfg.gradient_accumulation_steps * micro, cfg.block_size, generator)
        for m in range(cfg.gradient_accumulation_steps):
            with autocast:
                _, loss = model(x[m * micro : (m + 1) * micro], y[m * micro : (m + 1) * micro])
                loss = loss / cfg.gradient_accumulation_steps  # the mean over micro-batches
            scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iters_since_log += 1

        # log: .item() is a CPU-GPU sync point, so only every log_interval
        if iter_num % cfg.log_interval == 0:
            iter_loss = loss.item() * cfg.gradient_accumulation_steps
            elapsed = time.perf_counter() - t0
            observer.log_metrics(
                {"iter_loss": iter_loss, "lr": lr, "tokens_per_sec": iters_since_log * cfg.tokens_per_iter / elapsed},
                step=iter_num,
            )
            t0, iters_since_log = time.perf_counter(), 0
        iter_num += 1
    return TrainOutcome(iter_num, losses["train"], losses["val"], best_val_loss)
