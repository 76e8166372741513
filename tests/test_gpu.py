"""The CUDA path: bf16/fp16 training, fused training, resume across devices, system metrics. Skipped without CUDA."""

import math

import pytest
import torch
from mlflow import MlflowClient

from conftest import Recorder, tiny_config
from nanosweep.checkpoint import load_checkpoint, save_checkpoint
from nanosweep.data import Batches
from nanosweep.tracking import TrackedRun, ensure_experiment
from nanosweep.train import Trial, build_model, resolve_hardware, train, train_fused
from nanosweep.trial import run_group

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


def test_trial_runs_on_cuda_log_system_metrics(store, prepared, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # the run lasts a few seconds
    cfg = tiny_config(device="cuda", max_iters=200, eval_interval=100)
    run_ = TrackedRun.create(ensure_experiment("nanosweep"), cfg.run_name, {})
    assert run_group([(cfg, run_.run_id)], {}) == {run_.run_id: "FINISHED"}
    metrics = MlflowClient().get_run(run_.run_id).data.metrics
    assert any(key.startswith("system/gpu_") for key in metrics), sorted(metrics)
