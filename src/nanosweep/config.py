"""The one configuration of a training run: its defaults are the study's recipe.

Every field is a CLI option of `nanosweep train` and a parameter of the MLproject
`train` entry point, so a run is fully described by these values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

DATASET = "shakespeare_char"  # nanoGPT's sampler finds the vocabulary in data/<dataset>/
VALID_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
VALID_DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names it and what is allowed."""


def _knob(default: Any, help: str, identity: bool = True) -> Any:
    """A config field with its help text; identity=False keeps it out of the config hash."""
    return field(default=default, metadata={"help": help, "identity": identity})


@dataclass(frozen=True)
class TrainConfig:
    # --- architecture (nanoGPT's GPT, bias=False) ---
    block_size: int = _knob(64, "context length in characters")
    n_layer: int = _knob(4, "transformer blocks")
    n_head: int = _knob(4, "attention heads per block")
    n_embd: int = _knob(128, "embedding width; must be divisible by n_head")
    dropout: float = _knob(0.1, "dropout on embeddings, attention and residuals, in [0, 1)")
    # --- data and batch ---
    batch_size: int = _knob(8, "sequences per micro-batch")
    gradient_accumulation_steps: int = _knob(40, "micro-batches averaged per iteration")
    # --- optimisation: AdamW with warmup then cosine decay ---
    max_iters: int = _knob(1000, "optimizer steps to train")
    learning_rate: float = _knob(3e-4, "peak learning rate")
    min_lr: float = _knob(6e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = _knob(2000, "linear warmup length; the study never leaves it")
    lr_decay_iters: int = _knob(0, "end of the cosine decay; 0 means max_iters (the study's template)")
    beta1: float = _knob(0.9, "AdamW beta1")
    beta2: float = _knob(0.95, "AdamW beta2")
    weight_decay: float = _knob(0.1, "AdamW weight decay on 2-D tensors only")
    grad_clip: float = _knob(1.0, "gradient norm clip; 0 disables")
    seed: int = _knob(1, "seeds weights, batches and dropout; the study uses the grid position")
    # --- evaluation, checkpoints and logging ---
    eval_interval: int = _knob(200, "iterations between evaluations (and checkpoints)")
    eval_iters: int = _knob(200, "batches per split in an evaluation")
    log_interval: int = _knob(10, "iterations between training-loss log points", identity=False)
    # --- hardware ---
    device: str = _knob("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:N or mps", identity=False)
    dtype: str = _knob("auto", "auto (bf16/fp16 on CUDA, fp32 on CPU), float32, bfloat16 or float16", identity=False)
    # --- text samples written at the end (nanoGPT's sample.py defaults) ---
    num_samples: int = _knob(10, "text samples generated at the end of the run", identity=False)
    max_new_tokens: int = _knob(500, "characters per sample", identity=False)
    temperature: float = _knob(0.8, "sampling temperature", identity=False)
    top_k: int = _knob(200, "sample from the top_k most likely characters", identity=False)
    sample_seed: int = _knob(1337, "seed of the sampler", identity=False)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def decay_iters(self) -> int:
        """Where the cosine decay ends: lr_decay_iters, or max_iters as in the study's template."""
        return self.lr_decay_iters or self.max_iters

    @property
    def tokens_per_iter(self) -> int:
        return self.gradient_accumulation_steps * self.batch_size * self.block_size

    @property
    def run_name(self) -> str:
        """The study's name, e.g. b64_L4_H4_E128_BS8_MI1000_D10_s1."""
        return (
            f"b{self.block_size}_L{self.n_layer}_H{self.n_head}_E{self.n_embd}"
            f"_BS{self.batch_size}_MI{self.max_iters}_D{round(self.dropout * 100)}_s{self.seed}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @property
    def config_hash(self) -> str:
        """Digest of the fields that change what is trained: equal hashes mean the same run."""
        identity = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["identity"]}
        identity["lr_decay_iters"] = self.decay_iters
        blob = json.dumps(identity, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def nanogpt_config(self, out_dir: str) -> str:
        """The run as a nanoGPT config file (the study's Config Path points at one)."""
        values = {
            "out_dir": out_dir,
            "dataset": DATASET,
            "eval_interval": self.eval_interval,
            "eval_iters": self.eval_iters,
            "log_interval": self.log_interval,
            "always_save_checkpoint": True,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "dropout": self.dropout,
            "bias": False,
            "learning_rate": self.learning_rate,
            "max_iters": self.max_iters,
            "lr_decay_iters": self.decay_iters,
            "min_lr": self.min_lr,
            "warmup_iters": self.warmup_iters,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "weight_decay": self.weight_decay,
            "grad_clip": self.grad_clip,
            "seed": self.seed,
            "compile": False,
        }
        lines = [f"# nanoGPT config of {self.run_name}, written by nanosweep"]
        lines += [f"{key} = {value!r}" for key, value in values.items()]
        return "\n".join(lines) + "\n"


def validate(cfg: TrainConfig) -> None:
    """Refuse values nanoGPT would crash on or that make no sense, naming value and range."""
    positive = (
        "block_size",
        "n_layer",
        "n_head",
        "n_embd",
        "batch_size",
        "gradient_accumulation_steps",
        "max_iters",
        "eval_interval",
        "eval_iters",
        "log_interval",
        "max_new_tokens",
        "top_k",
    )
    for name in positive:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name}={value!r} is not allowed: it must be a positive integer")
    non_negative = ("warmup_iters", "lr_decay_iters", "num_samples")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is not allowed: it must be >= 0")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(
            f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}: each head gets n_embd/n_head channels"
        )
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout={cfg.dropout!r} is not allowed: it must be in [0, 1)")
    for name in ("learning_rate", "temperature"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is not allowed: it must be > 0")
    for name in ("min_lr", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is not allowed: it must be >= 0")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is not allowed: it must be in [0, 1)")
    if not VALID_DEVICE.match(cfg.device):
        raise ConfigError(f"device={cfg.device!r} is not allowed: use auto, cpu, cuda, cuda:N or mps")
    if cfg.dtype not in VALID_DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r} is not allowed: use one of {', '.join(VALID_DTYPES)}")
