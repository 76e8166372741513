"""ckpt.pt in nanoGPT's format, plus the RNG state nanosweep needs to resume bit-for-bit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nanosweep.config import DATASET, TrainConfig
from nanosweep.model import GPT, GPTConfig


def make_checkpoint(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    iter_num: int,
    best_val_loss: float,
    cfg: TrainConfig,
    rng: dict[str, torch.Tensor],
    eval_losses: dict[str, float],
) -> dict[str, Any]:
    """nanoGPT's checkpoint dict; `rng` and `eval_losses` are extra, for resuming, and nanoGPT ignores them."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_args": model.config.to_model_args(),
        "iter_num": iter_num,
        "best_val_loss": float(best_val_loss),
        "config": {**cfg.to_dict(), "dataset": DATASET},
        "rng": rng,
        "eval_losses": eval_losses,
    }


# how an optimizer runs (its kernel), never what it has learnt: these stay as the loading optimizer was built
OPTIMIZER_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state into an optimizer built for this device, keeping its kernel settings.

    load_state_dict alone restores the saver's settings: a CPU checkpoint would leave CUDA's fused AdamW (and with
    fp16 a GradScaler's fused step then fails). The moments move to the parameters' device; `step` goes where this
    kernel wants it (the fused and capturable kernels on the device, the others on the CPU).
    """
    groups = [
        {**saved, **{key: own[key] for key in OPTIMIZER_IMPLEMENTATION if key in own}}
        for saved, own in zip(state["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            for param in group["params"]:
                step = optimizer.state.get(param, {}).get("step")
                if torch.is_tensor(step) and step.device.type != "cpu":
                    optimizer.state[param]["step"] = step.cpu()


def save_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    """torch.save then rename, so a kill mid-write never leaves a truncated ckpt.pt behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True: a checkpoint from a shared store must not run code."""
    return torch.load(path, map_location=device, weights_only=True)


def model_from_checkpoint(checkpoint: dict[str, Any], device: str | torch.device = "cpu") -> GPT:
    """Rebuild the GPT from model_args and load its weights, as nanoGPT's sample.py does."""
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    state = checkpoint["model"]
    # checkpoints of torch.compile'd nanoGPT models carry this prefix
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    model.load_state_dict(state)
    return model.to(device).eval()
