"""Fused training: K trials of one architecture as one stacked model, each still its own training and run."""

import dataclasses
import math
import threading

import pytest
import torch
from mlflow import MlflowClient

from conftest import Recorder, tiny_config
from nanosweep.checkpoint import load_checkpoint, model_from_checkpoint
from nanosweep.config import TrainConfig
from nanosweep.data import Batches
from nanosweep.group import Diverged, RunObserver, Trial, build_model, fusion_key
from nanosweep.hardware import resolve_hardware
from nanosweep.model import GPT
from nanosweep.sampling import SampleSettings, generate_texts
from nanosweep.tracking.recorder import RunRecorder, run_group, run_trial, train_runs
from nanosweep.tracking.run import TrackedRun
from nanosweep.tracking.store import ensure_experiment
from nanosweep.train import train, train_fused


def fused(configs: list[TrainConfig], prepared) -> tuple[list[Recorder], dict]:
    """Train configs as one fused group on CPU; the recorders and what each trial ended with."""
    recorders = [Recorder() for _ in configs]
    trials = [Trial(cfg, build_model(cfg, 65), rec) for cfg, rec in zip(configs, recorders)]
    ended = {}
    batches = Batches(prepared, torch.device("cpu"))
    train_fused(trials, batches, resolve_hardware(configs[0]), lambda t, r: ended.__setitem__(t.cfg.seed, r))
    return recorders, ended


def alone(cfg: TrainConfig, prepared) -> Recorder:
    recorder = Recorder()
    train(cfg, build_model(cfg, 65), Batches(prepared, torch.device("cpu")), recorder)
    return recorder


# trials that differ in everything but the fusion key: seed, schedule, length, optimizer, clipping
GROUP = [
    tiny_config(dropout=0.0, seed=1, max_iters=20),
    tiny_config(dropout=0.0, seed=2, max_iters=10, learning_rate=1e-3, eval_interval=5),
    tiny_config(dropout=0.0, seed=3, max_iters=20, weight_decay=0.0, beta2=0.99, grad_clip=0.05, warmup_iters=0),
]


def test_fused_trials_give_the_same_evaluations_as_each_trial_trained_alone(prepared):
    recorders, ended = fused(GROUP, prepared)
    for cfg, rec in zip(GROUP, recorders):
        solo = alone(cfg, prepared)
        assert sorted(rec.metrics["val_loss"]) == sorted(solo.metrics["val_loss"])
        for key in ("train_loss", "val_loss"):
            for step, value in solo.metrics[key].items():
                assert rec.metrics[key][step] == pytest.approx(value, abs=1e-4), (cfg.seed, key, step)
        assert ended[cfg.seed].iter_num == cfg.max_iters  # each stops at its own max_iters
    # the short trial finished first, evaluated at its own max_iters, and left the group
    assert sorted(recorders[1].metrics["val_loss"]) == [0, 5, 10]


def test_a_fused_trials_initial_weights_equal_the_same_trial_built_alone():
    first, second = build_model(GROUP[0], 65), build_model(GROUP[1], 65)
    again = build_model(GROUP[1], 65)
    assert all(torch.equal(a, b) for a, b in zip(second.trial_state(0).values(), again.trial_state(0).values()))
    stack = GPT(first.config, trials=2)
    for k, model in enumerate((first, second)):
        stack.load_trial_state(k, model.trial_state(0))
    idx = torch.randint(65, (2, 3, 32))
    logits, _ = stack(idx)
    assert torch.allclose(logits[1], second(idx[1])[0], atol=1e-5)


def test_fused_training_with_dropout_is_deterministic_for_its_seeds(prepared):
    group = [tiny_config(dropout=0.1, seed=1), tiny_config(dropout=0.2, seed=2), tiny_config(dropout=0.0, seed=3)]
    first, _ = fused(group, prepared)
    second, _ = fused(group, prepared)
    for a, b in zip(first, second):
        assert [a.metrics[k] for k in ("train_loss", "val_loss", "iter_loss")] == [
            b.metrics[k] for k in ("train_loss", "val_loss", "iter_loss")
        ]
    assert first[0].metrics["val_loss"][20] != first[1].metrics["val_loss"][20]


def test_a_diverging_trial_ends_failed_alone_and_its_siblings_finish(store):
    experiment = ensure_experiment("nanosweep")
    good, bad = tiny_config(seed=1), tiny_config(seed=2, learning_rate=1e30, grad_clip=0.0)
    runs = [(cfg, TrackedRun.create(experiment, cfg.run_name, {})) for cfg in (good, bad)]
    statuses = run_group([(cfg, run.run_id) for cfg, run in runs], {"fused_group": "g1"})
    assert list(statuses.values()) == ["FINISHED", "FAILED"]
    good_run, bad_run = (run.info() for _, run in runs)
    assert good_run.info.status == "FINISHED"
    assert bad_run.info.status == "FAILED"
    assert bad_run.data.tags["nanosweep.end_reason"].startswith("Diverged: ")
    assert good_run.data.tags["fused_group"] == bad_run.data.tags["fused_group"] == "g1"
    assert good_run.data.metrics["val_loss"] < math.log(65)


class Sibling:
    """A trial's observer that tells `went_on` once the trial logs a step past `step`."""

    def __init__(self, observer: RunObserver, step: int, went_on: threading.Event) -> None:
        self.observer, self.step, self.went_on = observer, step, went_on

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.observer.log_metrics(metrics, step)
        if step > self.step:
            self.went_on.set()

    def log_checkpoint(self, checkpoint: dict) -> None:
        self.observer.log_checkpoint(checkpoint)


@pytest.mark.parametrize("overlap", [True, False], ids=["beside-training", "cpu-default"])
def test_a_trained_runs_end_goes_on_beside_its_siblings_training_where_the_hardware_overlaps_them(
    store, prepared, overlap, monkeypatch
) -> None:
    experiment = ensure_experiment("nanosweep")
    short, long = tiny_config(seed=1, max_iters=10), tiny_config(seed=2, max_iters=40, log_interval=1)
    runs = [(cfg, TrackedRun.create(experiment, cfg.run_name, {})) for cfg in (short, long)]
    assert resolve_hardware(short).overlap_run_ends is False  # a CPU's cores are all training
    hardware = dataclasses.replace(resolve_hardware(short), overlap_run_ends=overlap)
    # the short run's end waits for its sibling to log a step past it: only a sibling training beside it can
    went_on, waited = threading.Event(), []
    finish_trained = RunRecorder.finish_trained

    def finish_once_the_sibling_went_on(recorder: RunRecorder, *args: object) -> None:
        if recorder.cfg is short:
            waited.append(went_on.wait(timeout=60 if overlap else 1))
        finish_trained(recorder, *args)

    def watch(observer: RunRecorder) -> RunObserver:
        return Sibling(observer, short.max_iters, went_on) if observer.cfg is long else observer

    monkeypatch.setattr(RunRecorder, "finish_trained", finish_once_the_sibling_went_on)
    assert list(train_runs(runs, prepared, hardware, {}, watch).values()) == ["FINISHED", "FINISHED"]
    assert waited == [overlap]
    artifacts = artifact_paths(MlflowClient(), runs[0][1].run_id)
    assert {f"samples/{short.run_name}.txt", "loss_curve.png"} <= artifacts


def test_losses_read_back_a_step_late_are_all_logged_and_a_diverged_trial_ends_at_its_own_iteration(prepared):
    good = tiny_config(seed=1, log_interval=1)
    bad = tiny_config(seed=2, log_interval=1, learning_rate=1e30, grad_clip=0.0)
    (good_log, bad_log), ended = fused([good, bad], prepared)
    assert sorted(good_log.metrics["iter_loss"]) == list(range(good.max_iters))  # every step, the last one too
    assert isinstance(ended[2], Diverged)
    last = max(bad_log.metrics["iter_loss"])  # the first non-finite loss is logged, and is where the trial ended
    assert sorted(bad_log.metrics["iter_loss"]) == list(range(last + 1))
    assert not math.isfinite(bad_log.metrics["iter_loss"][last])
    assert all(math.isfinite(bad_log.metrics["iter_loss"][step]) for step in range(last))
    assert str(ended[2]).endswith(f"at iteration {last}") and 0 < last < bad.max_iters - 1


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_a_fused_trials_run_holds_what_a_single_run_holds_and_its_checkpoint_loads_alone(store, prepared):
    client = MlflowClient()
    single = client.get_run(run_trial(tiny_config(seed=9), "nanosweep"))
    experiment = ensure_experiment("nanosweep")
    configs = [tiny_config(seed=1), tiny_config(seed=2, dropout=0.2)]
    runs = [TrackedRun.create(experiment, cfg.run_name, {}) for cfg in configs]
    statuses = run_group([(cfg, run.run_id) for cfg, run in zip(configs, runs)], {"fused_group": "g"})
    assert set(statuses.values()) == {"FINISHED"}
    for cfg, run in zip(configs, runs):
        info = client.get_run(run.run_id)
        assert info.info.status == "FINISHED"
        assert set(info.data.params) == set(single.data.params)
        assert set(info.data.metrics) == set(single.data.metrics)
        for key in ("train_loss", "val_loss", "iter_loss"):
            assert [m.step for m in client.get_metric_history(run.run_id, key)] == [
                m.step for m in client.get_metric_history(single.info.run_id, key)
            ]
        rename = {p.replace(single.info.run_name, cfg.run_name) for p in artifact_paths(client, single.info.run_id)}
        assert artifact_paths(client, run.run_id) == rename
    ckpt = load_checkpoint(client.download_artifacts(runs[1].run_id, "ckpt.pt"))
    assert ckpt["config"]["seed"] == 2 and ckpt["model_args"]["dropout"] == 0.2
    assert len(ckpt["optimizer"]["param_groups"]) == 2  # its own AdamW state, nanoGPT's layout
    assert all(t.dim() <= 2 for t in ckpt["model"].values())  # a slice of the group: no trial dimension
    model = model_from_checkpoint(ckpt)  # a fresh single GPT
    [text] = generate_texts(model, prepared.vocab(), SampleSettings(prompt="ROMEO:", num_samples=1, max_new_tokens=30))
    assert text.startswith("ROMEO:") and len(text) == 36


def test_a_fused_trials_checkpoint_resumes_alone_or_in_a_group_of_another_size(prepared):
    """A slice of the stack saved is a trial's whole state: it goes on alone, or beside new siblings, as fused."""
    configs = [tiny_config(dropout=0.0, seed=s) for s in (1, 2, 3)]
    uninterrupted, _ = fused(configs, prepared)
    halfway, _ = fused([c.replace(max_iters=10) for c in configs], prepared)
    checkpoint = halfway[1].checkpoints[10]
    recorder = Recorder()
    train(configs[1], build_model(configs[1], 65), Batches(prepared, torch.device("cpu")), recorder, checkpoint)
    assert recorder.metrics["val_loss"][20] == pytest.approx(uninterrupted[1].metrics["val_loss"][20], abs=1e-4)
    pair = [Recorder(), Recorder()]
    trials = [Trial(configs[1], build_model(configs[1], 65), pair[0], halfway[1].checkpoints[10]),
              Trial(configs[0], build_model(configs[0], 65), pair[1])]  # fmt: skip
    train_fused(trials, Batches(prepared, torch.device("cpu")), resolve_hardware(configs[0]), lambda t, r: None)
    assert pair[0].metrics["val_loss"][20] == pytest.approx(uninterrupted[1].metrics["val_loss"][20], abs=1e-4)
    assert pair[1].metrics["val_loss"][20] == pytest.approx(uninterrupted[0].metrics["val_loss"][20], abs=1e-4)


def test_trials_with_different_head_counts_fuse_and_each_trains_as_it_does_alone(prepared):
    group = [tiny_config(dropout=0.0, seed=1, n_head=2), tiny_config(dropout=0.0, seed=2, n_head=4),
             tiny_config(dropout=0.1, seed=3, n_head=4)]  # fmt: skip
    assert len({fusion_key(c) for c in group}) == 1  # the weights' shapes do not depend on the heads
    recorders, _ = fused(group, prepared)
    for cfg, rec in zip(group[:2], recorders):
        solo = alone(cfg, prepared)
        for step, value in solo.metrics["val_loss"].items():
            assert rec.metrics["val_loss"][step] == pytest.approx(value, abs=1e-4), (cfg.n_head, step)


def test_a_compiled_group_trains_as_the_eager_one(prepared):
    """compile=on (torch.compile of the passes; CUDA's default, here on the CPU's Inductor): the same losses as eager
    in float32, through a trial leaving the stack (K 4 -> 3: Dynamo compiles again) and the evaluations, which run
    without dropout compiled too (a trial with dropout: its draws differ once compiled, its first evaluation not)."""
    from torch._dynamo.utils import counters

    group = [*GROUP, tiny_config(dropout=0.2, seed=4)]
    eager, _ = fused(group, prepared)
    counters.clear()
    compiled, ended = fused([cfg.replace(compile="on") for cfg in group], prepared)
    assert counters["stats"]["unique_graphs"] >= 3  # a training and an evaluation graph, again for K=3
    for cfg, a, b in zip(GROUP, eager, compiled):
        assert sorted(a.metrics["val_loss"]) == sorted(b.metrics["val_loss"])
        for key in ("train_loss", "val_loss", "iter_loss"):
            for step, value in a.metrics[key].items():
                assert b.metrics[key][step] == pytest.approx(value, abs=1e-4), (cfg.seed, key, step)
        assert ended[cfg.seed].iter_num == cfg.max_iters
    assert compiled[3].metrics["val_loss"][0] == pytest.approx(eager[3].metrics["val_loss"][0], abs=1e-5)
