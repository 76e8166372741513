"""How a step's sequences are split into passes: one pass, micro-batches, and out-of-memory retries, on CPU tensors.

An out-of-memory error is injected the way a GPU raises it (a real torch.OutOfMemoryError from inside the forward
pass, after earlier passes left partial gradients); the plan is the memory budget the loop takes as a parameter.
"""

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from conftest import tiny_config
from nanosweep.data import Batches
from nanosweep.group import Trial, build_model
from nanosweep.hardware import Hardware
from nanosweep.memory import CPU_PASS_TOKENS, DoesNotFit, PassPlan, device_share, plan_from_peaks
from nanosweep.model import GPT
from nanosweep.train import train_fused

CPU = Hardware(torch.device("cpu"), torch.float32)
TOTAL = 8  # tiny_config: 2 micro-batches of 4 sequences per step


def micro_batches() -> PassPlan:
    """The recipe's micro-batches of 4 sequences per trial (a CPU's own plan would take the whole batch at once)."""
    return PassPlan(preferred=4)


class StepLog:
    """A RunObserver that keeps every call in order: a repeated evaluation or checkpoint shows up twice."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.values: dict[tuple[str, int], float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            if key != "tokens_per_sec":  # a wall-clock figure
                self.calls.append((key, step))
                self.values[key, step] = value

    def log_checkpoint(self, checkpoint: dict) -> None:
        self.calls.append(("checkpoint", checkpoint["iter_num"]))


class Device:
    """Runs out of memory like a GPU: a training (or evaluation) forward pass of more than `limit` trial-sequences
    raises torch.OutOfMemoryError, and so does the `fail_at`-th training pass once. `passes` records every pass."""

    def __init__(self, limit: int | None = None, fail_at: int | None = None, in_eval: bool = False) -> None:
        self.limit, self.fail_at, self.in_eval = limit, fail_at, in_eval
        self.passes: list[tuple[bool, int]] = []  # (training, trial-sequences)

    def __call__(self, model: torch.nn.Module, args: tuple) -> None:
        sequences = args[0].shape[0] * args[0].shape[1]  # (K, per_pass, T)
        self.passes.append((model.training, sequences))
        if model.training != self.in_eval:
            if self.limit is not None and sequences > self.limit:
                raise torch.OutOfMemoryError(f"a pass of {sequences} trial-sequences does not fit")
            training_passes = sum(training == (not self.in_eval) for training, _ in self.passes)
            if training_passes == self.fail_at:
                raise torch.OutOfMemoryError("the allocator ran out once")


def train(configs, prepared, plan: PassPlan | None = None, device=None) -> list[StepLog]:
    """Train the configs fused on the CPU through `device`, in `plan`'s passes (None: the CPU's own plan)."""
    logs = [StepLog() for _ in configs]
    trials = [Trial(cfg, build_model(cfg, 65), log) for cfg, log in zip(configs, logs)]
    device = device or Device()

    def through_device(module: torch.nn.Module, args: tuple) -> None:  # every pass of the group's stacked model
        if isinstance(module, GPT):
            device(module, args)

    hook = register_module_forward_pre_hook(through_device)
    try:
        train_fused(trials, Batches(prepared, torch.device("cpu")), CPU, lambda trial, result: None, plan)
    finally:
        hook.remove()
    return logs


def assert_same_training(got: StepLog, want: StepLog, tolerance: float) -> None:
    assert got.calls == want.calls  # every evaluation, log point and checkpoint once, in the same order
    for key, value in want.values.items():
        assert got.values[key] == pytest.approx(value, abs=tolerance), key


CONFIGS = [tiny_config(dropout=0.0, seed=1), tiny_config(dropout=0.0, seed=2, learning_rate=1e-3)]


@pytest.mark.parametrize("fail_at", [1, 22], ids=["iteration 0", "checkpoint iteration 10, second pass"])
def test_an_out_of_memory_step_is_retried_in_smaller_passes_and_trains_what_it_would_have(prepared, fail_at):
    without = train(CONFIGS, prepared, micro_batches())
    device = Device(fail_at=fail_at)
    with_oom = train(CONFIGS, prepared, micro_batches(), device)
    for got, want in zip(with_oom, without):
        assert_same_training(got, want, tolerance=1e-5)  # only the passes' summation order differs
    sizes = [n for training, n in device.passes if training]
    assert sizes[fail_at - 1] == 2 * 4 and sizes[fail_at] == 2 * 2  # the same batch again, in halved passes
    assert set(sizes[fail_at:]) == {2 * 2}


def test_an_evaluation_that_runs_out_of_memory_is_retried_on_the_same_batches(prepared):
    without = train(CONFIGS, prepared, micro_batches())
    device = Device(fail_at=1, in_eval=True)
    with_oom = train(CONFIGS, prepared, micro_batches(), device)
    for got, want in zip(with_oom, without):
        assert_same_training(got, want, tolerance=1e-5)  # both passes shrink


def test_the_whole_recipe_batch_in_one_pass_trains_like_the_micro_batches(prepared):
    micro = train(CONFIGS, prepared, micro_batches())
    device = Device()
    one_pass = train(CONFIGS, prepared, plan=PassPlan(preferred=TOTAL), device=device)
    assert {n for training, n in device.passes if training} == {2 * TOTAL}  # two trials, all 8 sequences each
    for got, want in zip(one_pass, micro):
        assert_same_training(got, want, tolerance=1e-5)


def test_passes_halve_on_each_out_of_memory_error_until_they_fit_and_grow_back_when_the_group_shrinks(prepared):
    short = [CONFIGS[0].replace(max_iters=10), CONFIGS[1]]  # the first trial leaves the group at iteration 10
    device = Device(limit=4 * 2)  # a pass of more than 4 sequences for each of 2 trials does not fit
    plan = PassPlan(preferred=TOTAL)
    train(short, prepared, plan=plan, device=device)
    sizes = [n for training, n in device.passes if training]
    assert sizes[:3] == [2 * 8, 2 * 4, 2 * 4]  # 8 per trial fails, 4 per trial fits (two passes)
    assert sizes[-1] == 1 * 8  # alone, the second trial's passes grow back to the 8 trial-sequences that fit
    assert plan.capacity == 8


def test_a_cpu_pass_holds_cpu_pass_tokens_of_all_its_trials_and_grows_back_when_the_group_shrinks(prepared):
    # block 32: a pass of 4096 tokens is 128 trial-sequences; each trial's batch is 4 micro-batches of 64
    big = dict(dropout=0.0, batch_size=64, gradient_accumulation_steps=4, eval_iters=2)
    configs = [tiny_config(seed=1, max_iters=10, **big), tiny_config(seed=2, **big)]  # the first leaves at 10
    assert CPU_PASS_TOKENS // configs[0].block_size == 128
    shapes: list[tuple[bool, int, int]] = []  # (training, trials, sequences per trial) of every pass

    def record(module: torch.nn.Module, args: tuple) -> None:
        shapes.append((module.training, *args[0].shape[:2]))

    train(configs, prepared, device=record)
    training = [(k, n) for is_training, k, n in shapes if is_training]
    assert training == [(2, 64)] * 4 * 10 + [(1, 128)] * 2 * 10  # 4 passes a step fused, 2 alone
    assert {(k, n) for is_training, k, n in shapes if not is_training} == {(2, 64), (1, 128)}  # 2 x 64 per split


def test_a_pass_of_one_sequence_that_does_not_fit_fails_the_group_with_a_one_line_reason(prepared):
    with pytest.raises(DoesNotFit) as refused:
        train(CONFIGS, prepared, device=Device(limit=1))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("a training step of 2 trial(s) ran out of device memory")


def test_a_gpu_plan_comes_from_two_measured_peaks_and_this_process_share_of_the_device():
    # two probe passes of 4 and 8 sequences for each of 2 trials: 100 bytes a trial-sequence over 1000 of its own
    plan = plan_from_peaks((1000 + 100 * 4 * 2, 1000 + 100 * 8 * 2), 4, 2, preferred=TOTAL, available=11_000)
    assert (plan.bytes_per_sequence, plan.fixed_bytes, plan.capacity) == (100, 1000, 100)
    assert plan.predicted_bytes(8, 2) == 2600
    gib = 2**30
    assert device_share(total=80 * gib, free=80 * gib, held=0, sharers=4) == 20 * gib  # four processes share it
    assert device_share(total=80 * gib, free=10 * gib, held=2 * gib, sharers=1) == 12 * gib  # another program's use
