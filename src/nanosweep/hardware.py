"""The device, precision and compilation a training process uses, decided once from the config and passed down."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanosweep.config import ConfigError, TrainConfig

# On a CPU with native bf16 (AVX-512 BF16, there with AMX) the recipe's step was 1.4-1.5x as fast in bf16 at width 256
# and 1.3x at width 128, once attention ran as matmuls (model.GPT.attention) and passes held 4096 tokens
# (memory.CPU_PASS_TOKENS); the study has no narrower model (bench/README, "A CPU step").
CPU_BF16_MIN_WIDTH = 128


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    dtype: torch.dtype
    compile: bool = False  # torch.compile the passes: on CUDA they are launch-bound, and compiling fuses launches
    # a trained run's end (samples, final flush, loss curve) beside its siblings' training: on a GPU the host is free
    # for it; a CPU's cores are all training, and sharing them made the quick grid slower (bench/README)
    overlap_run_ends: bool = False

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_hardware(cfg: TrainConfig) -> Hardware:
    """cuda when present (bf16 where native, else fp16 with a grad scaler; compiled where Triton is), else cpu
    (bf16 for models of the study's widths on a CPU with native bf16, else fp32), eager; refuse what isn't here."""
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} is not available on this machine: use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={cfg.device!r} is not available on this machine: use auto or cpu")
    device = torch.device(name)
    dtype = auto_dtype(device, cfg.n_embd) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("dtype='float16' is not allowed on cpu: use float32 or bfloat16")
    return Hardware(device, dtype, resolve_compile(cfg.compile, device), overlap_run_ends=device.type == "cuda")


def auto_dtype(device: torch.device, n_embd: int) -> torch.dtype:
    """CUDA: bf16 where native, else fp16 with loss scaling (emulated bf16, before Ampere, is slower). CPU: bf16 where
    it is native and the model is wide enough to gain from it (CPU_BF16_MIN_WIDTH); emulated, without AVX-512 BF16,
    a bf16 step took 14x as long (bench/README). Elsewhere fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and n_embd >= CPU_BF16_MIN_WIDTH and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 instructions, which oneDNN's bf16 kernels need to beat fp32; torch's own test of them."""
    return torch.cpu._is_avx512_bf16_supported()


def resolve_compile(choice: str, device: torch.device) -> bool:
    """auto compiles on CUDA, where Inductor's kernels come from Triton and fuse the small model's many launches. A
    CPU trains eager unless told `on`: on the 2-core CPU compiling took 84 s and gained 1-6 % a step (bench/README)."""
    if choice != "auto":
        return choice == "on"
    if device.type != "cuda":
        return False
    from torch.utils._triton import has_triton  # torch's own test of a working Triton; imported only for CUDA

    return has_triton()
