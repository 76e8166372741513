"""The CUDA path: bf16/fp16 training, fused training, resume across devices, system metrics. Skipped without CUDA."""

import math

import pytest
import torch
from mlflow import MlflowClient

from conftest import Recorder, tiny_config
from nanosweep.checkpoint import load_checkpoint, save_checkpoint
from nanosweep.data import Batches
from nanosweep.group import FusedGroup, Trial, build_model
from nanosweep.hardware import resolve_hardware
from nanosweep.tracking.recorder import run_group
from nanosweep.tracking.run import TrackedRun
from nanosweep.tracking.store import ensure_experiment
from nanosweep.train import plan_passes, train, train_fused

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def run(cfg, prepared, resume_from=None):
    recorder = Recorder()
    hw = resolve_hardware(cfg)
    outcome = train(cfg, build_model(cfg, 65), Batches(prepared, hw.device), recorder, resume_from)
    return outcome, recorder


def test_auto_dtype_is_native_bf16_or_fp16_and_training_learns_like_cpu(prepared):
    cfg = tiny_config(device="cuda", max_iters=40)
    hw = resolve_hardware(cfg)
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert hw.dtype == (torch.bfloat16 if native else torch.float16)
    on_gpu, _ = run(cfg, prepared)
    on_cpu, _ = run(cfg.replace(device="cpu"), prepared)
    assert math.isfinite(on_gpu.val_loss) and on_gpu.val_loss < math.log(65)
    assert on_gpu.val_loss == pytest.approx(on_cpu.val_loss, abs=0.05)  # same batches: the stream is on the CPU


def test_fp16_training_scales_its_loss_and_checkpoints_the_scaler(prepared):
    outcome, rec = run(tiny_config(device="cuda", dtype="float16"), prepared)
    assert math.isfinite(outcome.val_loss)
    assert "scaler" in rec.checkpoints[20] and rec.checkpoints[20]["scaler"]["scale"] > 0
    assert "cuda" in rec.checkpoints[20]["rng"]


def test_fused_trials_on_cuda_evaluate_like_each_trial_alone(prepared):
    configs = [tiny_config(device="cuda", dtype="float32", dropout=0.0, seed=s, max_iters=10 * s) for s in (1, 2)]
    recorders = [Recorder() for _ in configs]
    hw = resolve_hardware(configs[0])
    trials = [Trial(c, build_model(c, 65), r) for c, r in zip(configs, recorders)]
    train_fused(trials, Batches(prepared, hw.device), hw, lambda trial, result: None)
    for cfg, rec in zip(configs, recorders):
        _, solo = run(cfg, prepared)
        for step, value in solo.metrics["val_loss"].items():
            assert rec.metrics["val_loss"][step] == pytest.approx(value, abs=1e-3)


def test_a_cpu_checkpoint_resumes_on_cuda_and_a_cuda_checkpoint_on_cpu(prepared, tmp_path):
    cfg = tiny_config(device="cpu")
    _, rec = run(cfg, prepared)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(rec.checkpoints[10], path)
    on_gpu, gpu_rec = run(cfg.replace(device="cuda"), prepared, resume_from=load_checkpoint(path))
    assert sorted(gpu_rec.metrics["val_loss"]) == [20] and math.isfinite(on_gpu.val_loss)
    save_checkpoint(gpu_rec.checkpoints[20], path)
    back, _ = run(cfg.replace(max_iters=30), prepared, resume_from=load_checkpoint(path))
    assert back.iter_num == 30 and math.isfinite(back.val_loss)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_cpu_checkpoint_resumes_on_cuda_in_bf16_and_fp16(prepared, tmp_path, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no native bf16 on this GPU")
    cfg = tiny_config(device="cpu")
    _, rec = run(cfg, prepared)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(rec.checkpoints[10], path)
    on_gpu, gpu_rec = run(cfg.replace(device="cuda", dtype=dtype), prepared, resume_from=load_checkpoint(path))
    assert math.isfinite(on_gpu.val_loss) and on_gpu.iter_num == 20
    assert gpu_rec.checkpoints[20]["optimizer"]["state"][0]["step"] == 20  # the CPU run's AdamW state went on


class Discard:
    """A RunObserver that keeps nothing (Recorder's copies of checkpoints would sit in GPU memory)."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_checkpoint(self, checkpoint: dict) -> None:
        pass


def test_a_gpu_plans_its_passes_from_measured_memory_and_a_step_stays_within_the_plan(prepared):
    configs = [tiny_config(device="cuda", seed=s, n_embd=64, block_size=64, batch_size=8) for s in (1, 2)]
    hw = resolve_hardware(configs[0])
    batches = Batches(prepared, hw.device)
    group = FusedGroup([Trial(c, build_model(c, 65), Discard()) for c in configs], hw)
    autocast = torch.autocast("cuda", dtype=hw.dtype)
    plan = plan_passes(group, batches, autocast)
    total = configs[0].gradient_accumulation_steps * configs[0].batch_size
    assert plan.bytes_per_sequence > 0 and plan.capacity >= total * len(configs)  # a tiny model fits whole
    assert plan.train_pass(total, len(configs)) == total  # the recipe's whole batch in one pass
    x, y = batches.sample_trials("train", total, configs[0].block_size, [r.generator for r in group.runs])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    group.accumulate(x, y, total, autocast)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 1.25 * plan.predicted_bytes(total, len(configs))


def test_a_fused_group_on_cuda_logs_one_processs_system_metrics_of_its_own_gpu_to_each_run(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # the runs last a few seconds
    configs = [tiny_config(device="cuda", max_iters=200, eval_interval=100, seed=s) for s in (1, 2)]
    runs = [TrackedRun.create(ensure_experiment("nanosweep"), c.run_name, {}) for c in configs]
    statuses = run_group([(c, r.run_id) for c, r in zip(configs, runs)], {})
    assert set(statuses.values()) == {"FINISHED"}
    for run_ in runs:
        metrics = MlflowClient().get_run(run_.run_id).data.metrics
        gpu = {key for key in metrics if key.startswith("system/gpu_")}
        assert "system/gpu_0_utilization_percentage" in gpu, sorted(metrics)
        assert all(key.startswith("system/gpu_0_") for key in gpu)  # this process's cuda:0 alone
