"""The device, precision and threads a training process uses, decided once from the config and passed down."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanosweep.config import ConfigError, TrainConfig


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
