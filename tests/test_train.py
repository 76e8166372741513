"""The recipe: LR schedule, seeded determinism, exact resume, checkpoints nanoGPT can load."""

import math

import pytest
import torch

from conftest import Recorder, tiny_config
from nanosweep.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from nanosweep.config import TrainConfig
from nanosweep.data import Batches
from nanosweep.group import build_model, learning_rate
from nanosweep.hardware import resolve_hardware
from nanosweep.sampling import SampleSettings, generate_texts
from nanosweep.train import train


def run(cfg: TrainConfig, prepared, resume_from=None):
    recorder = Recorder()
    model = build_model(cfg, 65)
    outcome = train(cfg, model, Batches(prepared, torch.device("cpu")), recorder, resume_from)
    return model, outcome, recorder


def test_lr_schedule_is_warmup_then_cosine_without_nanogpts_division_by_zero():
    cfg = TrainConfig(max_iters=2000)
    assert learning_rate(0, cfg) == pytest.approx(3e-4 * 1 / 2001)
    assert learning_rate(999, cfg) == pytest.approx(3e-4 * 1000 / 2001)
    assert learning_rate(1999, cfg) == pytest.approx(3e-4 * 2000 / 2001)
    assert learning_rate(2000, cfg) == pytest.approx(3e-4)  # warmup_iters == lr_decay_iters: nanoGPT's 0/0
    long = TrainConfig(max_iters=4000)
    assert learning_rate(3000, long) == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi * 0.5)) * (3e-4 - 6e-5))
    assert learning_rate(4000, long) == pytest.approx(6e-5)
    assert learning_rate(4500, long) == pytest.approx(6e-5)


def test_same_config_and_seed_gives_the_same_losses_and_another_seed_does_not(prepared):
    _, first, rec1 = run(tiny_config(), prepared)
    _, second, rec2 = run(tiny_config(), prepared)
    _, other, _ = run(tiny_config(seed=2), prepared)
    assert rec1.metrics["iter_loss"] == rec2.metrics["iter_loss"]
    assert (first.train_loss, first.val_loss) == (second.train_loss, second.val_loss)
    assert other.val_loss != first.val_loss


def test_evaluations_and_checkpoints_happen_at_zero_every_interval_and_max_iters(prepared):
    _, outcome, rec = run(tiny_config(max_iters=25), prepared)
    assert sorted(rec.metrics["val_loss"]) == [0, 10, 20, 25]
    assert sorted(rec.checkpoints) == [10, 20, 25]
    assert sorted(rec.metrics["iter_loss"]) == [0, 5, 10, 15, 20]
    assert outcome.iter_num == 25 and outcome.val_loss == rec.metrics["val_loss"][25]
    assert outcome.best_val_loss == min(rec.metrics["val_loss"].values())


def test_resuming_from_a_checkpoint_reproduces_the_uninterrupted_run(prepared, tmp_path):
    cfg = tiny_config(max_iters=20, dropout=0.1)
    _, straight, rec = run(cfg, prepared)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(rec.checkpoints[10], path)  # as if killed after the checkpoint at iteration 10
    _, resumed, rec2 = run(cfg, prepared, resume_from=load_checkpoint(path))
    assert sorted(rec2.metrics["val_loss"]) == [20]  # the evaluation at 10 is not repeated
    assert (resumed.train_loss, resumed.val_loss) == (straight.train_loss, straight.val_loss)
    assert rec2.metrics["iter_loss"][15] == rec.metrics["iter_loss"][15]


def test_checkpoint_is_nanogpts_format_and_a_reloaded_model_generates_text(prepared, tmp_path):
    cfg = tiny_config()
    _, _, rec = run(cfg, prepared)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(rec.checkpoints[20], path)
    ckpt = load_checkpoint(path)  # weights_only=True
    assert {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"} <= set(ckpt)
    assert ckpt["model_args"] == {
        "block_size": 32,
        "vocab_size": 65,
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "dropout": 0.1,
        "bias": False,
    }
    assert ckpt["config"]["dataset"] == "shakespeare_char" and ckpt["iter_num"] == 20
    assert len(ckpt["optimizer"]["param_groups"]) == 2
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())
    model = model_from_checkpoint(ckpt)
    vocab = prepared.vocab()
    texts = generate_texts(model, vocab, SampleSettings(prompt="ROMEO:", num_samples=3, max_new_tokens=50))
    assert len(texts) == 3 and all(t.startswith("ROMEO:") and len(t) == 56 for t in texts)
    assert set("".join(texts)) <= set(vocab.chars)
    assert texts == generate_texts(model, vocab, SampleSettings(prompt="ROMEO:", num_samples=3, max_new_tokens=50))


def test_auto_trains_a_cpu_eager_in_fp32_or_the_study_s_widths_in_bf16_where_the_cpu_has_it():
    narrow = resolve_hardware(TrainConfig(device="cpu", n_embd=64))
    assert (narrow.dtype, narrow.compile) == (torch.float32, False)  # the tests' widths: exact comparisons in fp32
    native = torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32
    for width in (128, 256):
        assert resolve_hardware(TrainConfig(device="cpu", n_embd=width)).dtype == native
    told = resolve_hardware(TrainConfig(device="cpu", n_embd=256, dtype="float32", compile="on"))
    assert (told.dtype, told.compile) == (torch.float32, True)
    told = resolve_hardware(TrainConfig(device="cpu", dtype="bfloat16"))
    assert told.dtype == torch.bfloat16


