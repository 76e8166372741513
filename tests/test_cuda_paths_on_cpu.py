"""The branches that production runs only on CUDA, run here on CPU tensors (no mock of the GPU).

PyTorch runs fp16 and bf16 autocast on CPU too, so the loop's logic for them (per-trial loss scales and their
checkpointed state, bf16 against fp32, host syncs) is tested here; tests/test_optim.py checks that a checkpoint of
PyTorch's fused AdamW kernel (CUDA's) resumes; tests/test_gpu.py runs the same paths on a real GPU where there is
one.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from conftest import Recorder, tiny_config
from nanosweep.config import TrainConfig
from nanosweep.data import Batches
from nanosweep.group import Trial, build_model
from nanosweep.hardware import Hardware
from nanosweep.train import train_fused

FP32 = Hardware(torch.device("cpu"), torch.float32)
BF16 = Hardware(torch.device("cpu"), torch.bfloat16)
FP16 = Hardware(torch.device("cpu"), torch.float16)  # with a GradScaler per trial, as on a GPU without native bf16
BF16_TOLERANCE = 0.01  # nats: bf16 autocast against fp32 on these tiny runs (measured about 1e-4)


def fused(configs: list[TrainConfig], prepared, hw: Hardware, resume: list[dict | None] | None = None):
    recorders = [Recorder() for _ in configs]
    resume = resume or [None] * len(configs)
    trials = [Trial(c, build_model(c, 65), r, ckpt) for c, r, ckpt in zip(configs, recorders, resume)]
    train_fused(trials, Batches(prepared, hw.device), hw, lambda trial, result: None)
    return recorders


def test_bf16_fused_trials_evaluate_within_bf16_noise_of_each_trial_alone_in_fp32(prepared):
    configs = [tiny_config(dropout=0.0, seed=1), tiny_config(dropout=0.0, seed=2, learning_rate=1e-3)]
    in_bf16 = fused(configs, prepared, BF16)
    for cfg, got in zip(configs, in_bf16):
        [alone] = fused([cfg], prepared, FP32)
        for step, value in alone.metrics["val_loss"].items():
            assert got.metrics["val_loss"][step] == pytest.approx(value, abs=BF16_TOLERANCE)


@pytest.mark.parametrize("hw", [FP32, BF16], ids=["fp32", "bf16"])
def test_in_a_group_of_mixed_dropout_rates_the_trial_without_dropout_trains_as_it_does_alone(prepared, hw):
    group = [tiny_config(dropout=0.0, seed=1), tiny_config(dropout=0.1, seed=2), tiny_config(dropout=0.2, seed=3)]
    recorders = fused(group, prepared, hw)
    [alone] = fused(group[:1], prepared, hw)
    tolerance = 1e-4 if hw is FP32 else BF16_TOLERANCE
    for step, value in alone.metrics["val_loss"].items():
        assert recorders[0].metrics["val_loss"][step] == pytest.approx(value, abs=tolerance)
    finals = [r.metrics["val_loss"][20] for r in recorders]
    assert all(v < 4.2 for v in finals) and len(set(finals)) == 3  # all learn, each at its own rate


def test_an_fp16_overflow_skips_only_that_trials_steps_and_its_scale_survives_the_checkpoint(prepared):
    configs = [tiny_config(dropout=0.0, seed=1, max_iters=10), tiny_config(dropout=0.0, seed=2, max_iters=10)]
    first = fused(configs, prepared, FP16)
    checkpoints = [copy.deepcopy(r.checkpoints[10]) for r in first]
    assert all(c["scaler"]["scale"] == 2.0**16 for c in checkpoints)  # GradScaler's default, checkpointed
    checkpoints[0]["scaler"]["scale"] = 2.0**40  # every fp16 gradient of trial 0 overflows from now on
    longer = [c.replace(max_iters=20) for c in configs]
    resumed = fused(longer, prepared, FP16, resume=copy.deepcopy(checkpoints))
    overflowed, healthy = resumed[0].checkpoints[20], resumed[1].checkpoints[20]
    # trial 0 skipped its 10 steps (weights and AdamW state untouched), halving its scale at each
    assert overflowed["scaler"]["scale"] == 2.0**30
    assert all(torch.equal(overflowed["model"][k], checkpoints[0]["model"][k]) for k in overflowed["model"])
    # trial 1 trained as it does alone, its scale untouched by its sibling's overflows
    assert healthy["scaler"]["scale"] == 2.0**16
    [alone] = fused(longer[1:], prepared, FP16, resume=copy.deepcopy(checkpoints[1:]))
    assert resumed[1].metrics["val_loss"][20] == pytest.approx(alone.metrics["val_loss"][20], abs=1e-3)
    assert resumed[1].metrics["val_loss"][20] < checkpoints[1]["eval_losses"]["val"]


SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


class SyncCounter:
    """Counts the host-device sync points nanosweep's own code asks for (a tensor read back to Python or copied to
    the host); on a GPU each one stalls the host until the queued kernels are done."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self.counting(name, getattr(torch.Tensor, name)))

    def counting(self, name: str, method):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("nanosweep"):
                self.calls.append(f"{caller}.{name}")
            return method(tensor, *args, **kwargs)

        return counted


def test_the_loop_syncs_with_the_device_only_to_log_and_twice_per_evaluation(prepared, monkeypatch):
    configs = [tiny_config(seed=1, max_iters=40), tiny_config(seed=2, max_iters=40)]  # log every 5, evaluate every 10
    batches = Batches(prepared, torch.device("cpu"))
    trials = [Trial(c, build_model(c, 65), Recorder()) for c in configs]
    counter = SyncCounter(monkeypatch)
    train_fused(trials, batches, BF16, lambda trial, result: None)
    steps, evaluations = 40, 5  # at 0, 10, 20, 30, 40 (both trials in one evaluation each time)
    assert len(counter.calls) <= steps / configs[0].log_interval + 2 * evaluations, counter.calls
    assert counter.calls  # the counter sees the loop's reads (at least one per evaluation)
