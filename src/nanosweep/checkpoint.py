"""ckpt.pt in nanoGPT's format, plus the RNG state nanosweep needs to resume bit-for-bit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nanosweep.config import DATASET, TRAIN_FIELDS, ConfigError, TrainConfig
from nanosweep.model import GPT, GPTConfig


def make_checkpoint(
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    config: GPTConfig,
    iter_num: int,
    best_val_loss: float,
    cfg: TrainConfig,
    rng: dict[str, torch.Tensor],
    eval_losses: dict[str, float],
) -> dict[str, Any]:
    """nanoGPT's checkpoint dict from a model's and an AdamW's state dicts; `rng` and `eval_losses` are extra, for
    resuming, and nanoGPT ignores them."""
    return {
        "model": model,
        "optimizer": optimizer,
        "model_args": config.to_model_args(),
        "iter_num": iter_num,
        "best_val_loss": float(best_val_loss),
        "config": {**cfg.to_dict(), "dataset": DATASET},
        "rng": rng,
        "eval_losses": eval_losses,
    }


def save_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    """torch.save then rename, so a kill mid-write never leaves a truncated ckpt.pt behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True: a checkpoint from a shared store must not run code."""
    return torch.load(path, map_location=device, weights_only=True)


def mismatch(checkpoint: dict[str, Any], cfg: TrainConfig, model: GPT) -> str | None:
    """How a checkpoint differs from the run it would resume (cfg, built as model), or None when it is the run's
    own: its architecture, every weight's shape, an iteration within max_iters, and the config it was trained with."""
    expected_args = model.config.to_model_args()
    if checkpoint["model_args"] != expected_args:
        return f"model_args {checkpoint['model_args']}, the run's {expected_args}"
    expected = {name: tuple(weight.shape) for name, weight in model.trial_state(0).items()}  # nanoGPT's layout
    found = {name.removeprefix("_orig_mod."): tuple(weight.shape) for name, weight in checkpoint["model"].items()}
    if found != expected:
        name = min(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        return f"weight {name} of shape {found.get(name)}, the run's {expected.get(name)}"
    iter_num = checkpoint["iter_num"]
    if not isinstance(iter_num, int) or not 0 <= iter_num <= cfg.max_iters:
        return f"iter_num={iter_num!r}, outside the run's 0..max_iters={cfg.max_iters}"
    try:
        trained = TrainConfig(**{k: v for k, v in checkpoint["config"].items() if k in TRAIN_FIELDS})
    except (ConfigError, TypeError) as exc:
        return f"its config is not a valid one ({exc})"
    if trained.config_hash != cfg.config_hash:
        return f"trained with config hash {trained.config_hash}, the run's is {cfg.config_hash}"
    return None


def model_from_checkpoint(checkpoint: dict[str, Any], device: str | torch.device = "cpu") -> GPT:
    """Rebuild the GPT from model_args and load its weights, as nanoGPT's sample.py does."""
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_trial_state(0, checkpoint["model"])
    return model.to(device).eval()
