"""The one configuration of a training run: its defaults are the study's recipe.

Every field is a CLI option of `nanosweep train` and a parameter of the MLproject
`train` entry point, so a run is fully described by these values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

DATASET = "shakespeare_char"  # nanoGPT's sampler finds the vocabulary in data/<dataset>/
VALID_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
VALID_DTYPES = ("auto", "float32", "bfloat16", "float16")
VALID_COMPILE = ("auto", "on", "off")
MAX_SAMPLES = 1000  # text samples are generated as one batch: more do not fit in memory
MIN_TEMPERATURE = 1e-6  # logits / temperature must stay finite in float32; below this sampling is greedy anyway


class ConfigError(ValueError):
    """A configuration value is out of range; the message names it and what is allowed."""


class Allowed(NamedTuple):
    """A field's own rule beyond its type: the test, and the words that tell a refused value what is allowed."""

    test: Callable[[Any], bool]
    words: str


POSITIVE = Allowed(lambda v: v > 0, "it must be a positive integer")
NON_NEGATIVE = Allowed(lambda v: v >= 0, "it must be an integer >= 0")
ANY_INTEGER = Allowed(lambda v: True, "it must be an integer")
FRACTION = Allowed(lambda v: 0 <= v < 1, "it must be in [0, 1)")
POSITIVE_NUMBER = Allowed(lambda v: v > 0, "it must be a finite number > 0")
NON_NEGATIVE_NUMBER = Allowed(lambda v: v >= 0, "it must be a finite number >= 0")
DEVICE = Allowed(lambda v: bool(VALID_DEVICE.match(v)), "use auto, cpu, cuda, cuda:N or mps")
DTYPE = Allowed(lambda v: v in VALID_DTYPES, f"use one of {', '.join(VALID_DTYPES)}")
COMPILE = Allowed(lambda v: v in VALID_COMPILE, f"use one of {', '.join(VALID_COMPILE)}")
SAMPLES = Allowed(lambda v: 0 <= v <= MAX_SAMPLES, f"it must be an integer in [0, {MAX_SAMPLES}]")
TEMPERATURE = Allowed(lambda v: v >= MIN_TEMPERATURE, f"it must be a finite number >= {MIN_TEMPERATURE:g}")


def _knob(default: Any, help: str, allowed: Allowed, identity: bool = True) -> Any:
    """A config field with its help text and rule; identity=False keeps it out of the config hash."""
    return field(default=default, metadata={"help": help, "allowed": allowed, "identity": identity})


@dataclass(frozen=True)
class TrainConfig:
    # --- architecture (nanoGPT's GPT, bias=False) ---
    block_size: int = _knob(64, "context length in characters", POSITIVE)
    n_layer: int = _knob(4, "transformer blocks", POSITIVE)
    n_head: int = _knob(4, "attention heads per block", POSITIVE)
    n_embd: int = _knob(128, "embedding width; must be divisible by n_head", POSITIVE)
    dropout: float = _knob(0.1, "dropout on embeddings, attention and residuals, in [0, 1)", FRACTION)
    # --- data and batch ---
    batch_size: int = _knob(8, "sequences per micro-batch", POSITIVE)
    gradient_accumulation_steps: int = _knob(40, "micro-batches averaged per iteration", POSITIVE)
    # --- optimisation: AdamW with warmup then cosine decay ---
    max_iters: int = _knob(1000, "optimizer steps to train", POSITIVE)
    learning_rate: float = _knob(3e-4, "peak learning rate", POSITIVE_NUMBER)
    min_lr: float = _knob(6e-5, "learning rate at the end of the cosine decay", NON_NEGATIVE_NUMBER)
    warmup_iters: int = _knob(2000, "linear warmup length; the study never leaves it", NON_NEGATIVE)
    lr_decay_iters: int = _knob(0, "end of the cosine decay; 0 means max_iters (the study's template)", NON_NEGATIVE)
    beta1: float = _knob(0.9, "AdamW beta1", FRACTION)
    beta2: float = _knob(0.95, "AdamW beta2", FRACTION)
    weight_decay: float = _knob(0.1, "AdamW weight decay on 2-D tensors only", NON_NEGATIVE_NUMBER)
    grad_clip: float = _knob(1.0, "gradient norm clip; 0 disables", NON_NEGATIVE_NUMBER)
    seed: int = _knob(1, "seeds weights, batches and dropout; the study uses the grid position", ANY_INTEGER)
    # --- evaluation, checkpoints and logging ---
    eval_interval: int = _knob(200, "iterations between evaluations (and checkpoints)", POSITIVE)
    eval_iters: int = _knob(200, "batches per split in an evaluation", POSITIVE)
    log_interval: int = _knob(10, "iterations between training-loss log points", POSITIVE, identity=False)
    # --- hardware ---
    device: str = _knob("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:N or mps", DEVICE, identity=False)
    dtype: str = _knob(
        "auto", "auto (CUDA: bf16 where native, else fp16; CPU: bf16 from n_embd 128 where native, else fp32), "
        "float32, bfloat16 or float16",
        DTYPE, identity=False,
    )  # fmt: skip
    compile: str = _knob(
        "auto", "torch.compile the training and evaluation passes: auto (on with CUDA and Triton), on or off",
        COMPILE, identity=False,
    )  # fmt: skip
    # --- text samples written at the end (nanoGPT's sample.py defaults) ---
    num_samples: int = _knob(10, "text samples generated at the end of the run", SAMPLES, identity=False)
    max_new_tokens: int = _knob(500, "characters per sample", POSITIVE, identity=False)
    temperature: float = _knob(0.8, "sampling temperature", TEMPERATURE, identity=False)
    top_k: int = _knob(200, "sample from the top_k most likely characters", POSITIVE, identity=False)
    sample_seed: int = _knob(1337, "seed of the sampler", ANY_INTEGER, identity=False)

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


TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES = {name: type(f.default) for name, f in TRAIN_FIELDS.items()}  # int, float or str


def check_value(name: str, value: Any) -> None:
    """One field's own rule, naming the value and the rule: its type (an int field takes no 2.5, a float field no
    nan or inf) and its range. TrainConfig checks every field so; search spaces and sample settings reuse it."""
    kind = FIELD_TYPES[name]
    if kind is float:
        typed = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        typed = isinstance(value, kind) and not isinstance(value, bool)
    allowed = TRAIN_FIELDS[name].metadata["allowed"]
    if not (typed and allowed.test(value)):
        raise ConfigError(f"{name}={value!r} is not allowed: {allowed.words}")


def validate(cfg: TrainConfig) -> None:
    """Refuse values nanoGPT would crash on or that make no sense, naming value and range."""
    for name in FIELD_TYPES:
        check_value(name, getattr(cfg, name))
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(
            f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}: each head gets n_embd/n_head channels"
        )
