"""The stages of bench/gpu_check.sh: does nanosweep work on this GPU machine, and how fast would the study run.

Each stage runs as `python bench/gpu_check.py stage NAME ...` in a process of its own (the shell script gives each
its own time limit) and adds its entry to OUT/results.json when it ends, so a stage that is killed loses only
itself: {"status": "ok" | "failed" | "skipped", "seconds": ..., "errors": [...], "figures": {...}}. The throughput
stage also writes its figures group by group as it goes. `summary` turns results.json into OUT/summary.md.

--smoke runs every stage on the CPU at tiny sizes (what CI runs); otherwise the device is CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_study import flops_per_iter, nanogpt_seconds, study_groups
from torch.nn.modules.module import register_module_forward_pre_hook

from nanosweep.checkpoint import load_checkpoint, save_checkpoint
from nanosweep.config import TrainConfig
from nanosweep.data import Batches, prepare
from nanosweep.group import FusedGroup, TrainOutcome, Trial, build_model
from nanosweep.hardware import Hardware, resolve_compile
from nanosweep.memory import PassPlan
from nanosweep.model import GPT
from nanosweep.tracking.recorder import RunRecorder
from nanosweep.tracking.run import TrackedRun
from nanosweep.tracking.store import connect, ensure_experiment
from nanosweep.train import estimate_losses, plan_passes, train_fused

STAGES = ("tests", "probes", "throughput", "sweep", "compile", "nanogpt")
VOCAB = 65
REPO = Path(__file__).resolve().parents[1]
TARGET_MINUTES = {"H100": 15.0, "H200": 12.0}  # the whole study, one GPU (issue: 15 on an H100, 12 on an H200)


class Skipped(Exception):
    """A stage (or probe) that cannot run here, with the reason."""


@dataclass(frozen=True)
class Check:
    out: Path
    input: Path
    nanogpt: Path | None
    smoke: bool
    deadline: float  # time.monotonic() by which the stage should have written its figures

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.smoke else "cuda")

    def hardware(self, dtype: torch.dtype) -> Hardware:
        return Hardware(self.device, dtype)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


# --- results.json -----------------------------------------------------------------------------------------------


def results_path(out: Path) -> Path:
    return out / "results.json"


def read_results(out: Path) -> dict[str, Any]:
    path = results_path(out)
    return json.loads(path.read_text()) if path.is_file() else {"environment": {}, "stages": {}}


def write_results(out: Path, results: dict[str, Any]) -> None:
    """Written whole and renamed into place: a stage killed mid-write leaves the previous file."""
    tmp = results_path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, results_path(out))


def record(out: Path, stage: str, entry: dict[str, Any]) -> None:
    results = read_results(out)
    results["stages"][stage] = entry
    write_results(out, results)


def environment(smoke: bool) -> dict[str, Any]:
    """What ran the check: machine, GPU, versions, nanosweep's commit."""
    import mlflow

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mlflow": mlflow.__version__,
        "smoke": smoke,
    }
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = os.environ.get("NANOSWEEP_COMMIT", "unknown")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
            cuda=torch.version.cuda,
            bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
        )
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            pass
    return env


# --- sizes ------------------------------------------------------------------------------------------------------


def tiny(device: str, **changes: Any) -> TrainConfig:
    """A correctness-sized model (2 layers, width 32): trains in a second, the recipe's structure intact."""
    recipe = dict(n_layer=2, n_head=2, n_embd=32, batch_size=4, gradient_accumulation_steps=2, eval_iters=4)
    schedule = dict(max_iters=20, eval_interval=10, log_interval=5, warmup_iters=10, dropout=0.0, seed=1)
    samples = dict(num_samples=1, max_new_tokens=20)
    return TrainConfig(block_size=32, device=device, **{**recipe, **schedule, **samples, **changes})


def smoke_sized(cfg: TrainConfig) -> TrainConfig:
    """A study configuration shrunk for the CPU smoke run (same names and grouping, tiny work)."""
    return cfg.replace(
        block_size=min(cfg.block_size, 32),
        n_embd=cfg.n_embd // 8,
        n_layer=2,
        batch_size=4,
        gradient_accumulation_steps=1,
        eval_iters=2,
        num_samples=1,
        max_new_tokens=20,
    )


def study(check: Check) -> dict[str, list[TrainConfig]]:
    """The study's 16 fusion groups on a GPU, full recipe: width and batch size -> a member's 8 trials (n_head 4/8 x
    MI1000/MI2000 x D10/D20), as train.fusion_key groups them and --fuse auto takes them on CUDA."""
    groups: dict[str, list[TrainConfig]] = {}
    for name, configs in study_groups(str(check.device)).items():
        groups.setdefault(re.sub(r"_H\d+_", "_", name), []).extend(configs)
    if check.smoke:
        names = sorted(groups, key=lambda n: flops_per_iter(groups[n][0]))
        groups = {n: [smoke_sized(c) for c in groups[n]] for n in (names[0], names[-1])}
    return groups


# --- measuring ---------------------------------------------------------------------------------------------------


class Clock:
    """A RunObserver that notes when each training-loss log point arrives (each one is a host-device sync)."""

    def __init__(self) -> None:
        self.stamps: dict[int, float] = {}
        self.metrics: dict[str, dict[int, float]] = {}
        self.checkpoints: dict[int, dict] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "iter_loss" in metrics:
            self.stamps[step] = time.perf_counter()
        for key, value in metrics.items():
            self.metrics.setdefault(key, {})[step] = value

    def log_checkpoint(self, checkpoint: dict) -> None:
        # kept on the CPU, as a run's saved checkpoint is: a copy on the GPU would count in its memory
        self.checkpoints[checkpoint["iter_num"]] = on_cpu(checkpoint)


def on_cpu(value: Any) -> Any:
    """A copy of a checkpoint (nested dicts and lists of tensors) on the CPU."""
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return copy.deepcopy(value)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_group(configs: list[TrainConfig], batches: Batches, hw: Hardware, resume=None, plan=None) -> list[Clock]:
    clocks = [Clock() for _ in configs]
    resume = resume or [None] * len(configs)
    trials = [Trial(c, build_model(c, VOCAB), clock, r) for c, clock, r in zip(configs, clocks, resume)]
    train_fused(trials, batches, hw, lambda trial, result: None, plan)
    return clocks


def autocast_for(hw: Hardware) -> Any:
    return nullcontext() if hw.dtype == torch.float32 else torch.autocast(hw.device.type, dtype=hw.dtype)


def max_difference(a: Clock, b: Clock, key: str = "val_loss") -> float:
    return max(abs(a.metrics[key][step] - b.metrics[key][step]) for step in b.metrics[key])


# --- stage 1: the gpu-marked tests ---------------------------------------------------------------------------------


def stage_tests(check: Check) -> dict[str, Any]:
    import xml.etree.ElementTree as ElementTree

    junit = check.out / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    done = subprocess.run([*cmd, f"--junitxml={junit}"], cwd=REPO, capture_output=True, text=True)
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('name')}: {(case.find('failure') or case.find('error')).get('message', '')[:300]}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    if counts["tests"] and counts["skipped"] == counts["tests"]:
        raise Skipped(f"all {counts['tests']} gpu tests skipped (no CUDA here)")
    return {"figures": counts, "errors": failed}


# --- stage 2: correctness probes --------------------------------------------------------------------------------


def stage_probes(check: Check) -> dict[str, Any]:
    """Each probe returns its figures and whether it holds; one failing does not stop the others."""
    dev = str(check.device)
    batches = Batches(prepare(check.input), check.device)
    cpu_batches = Batches(prepare(check.input), torch.device("cpu"))
    bf16, fp32, fp16 = (check.hardware(t) for t in (torch.bfloat16, torch.float32, torch.float16))
    cpu32 = Hardware(torch.device("cpu"), torch.float32)
    pair = [tiny(dev, seed=1), tiny(dev, seed=2, learning_rate=1e-3)]

    def bf16_fused_vs_cpu_fp32_alone() -> dict[str, Any]:
        fused = train_group(pair, batches, bf16)
        worst = max(
            max_difference(f, train_group([c.replace(device="cpu")], cpu_batches, cpu32)[0])
            for f, c in zip(fused, pair)
        )
        return {"max_val_loss_difference": worst, "ok": worst < 0.05}

    def fp32_fused_vs_alone() -> dict[str, Any]:
        fused = train_group(pair, batches, fp32)
        worst = max(max_difference(f, train_group([c], batches, fp32)[0]) for f, c in zip(fused, pair))
        return {"max_val_loss_difference": worst, "ok": worst < 1e-4}

    def mixed_dropout() -> dict[str, Any]:
        group = [tiny(dev, seed=1), tiny(dev, seed=2, dropout=0.1), tiny(dev, seed=3, dropout=0.2)]
        fused = train_group(group, batches, bf16)
        worst = max_difference(fused[0], train_group(group[:1], batches, bf16)[0])
        finals = [c.metrics["val_loss"][20] for c in fused]
        return {
            "no_dropout_trial_difference": worst,
            "final_val_losses": finals,
            "ok": worst < 0.01 and all(math.isfinite(v) for v in finals) and len(set(finals)) == 3,
        }

    def fp16_scaler_isolation() -> dict[str, Any]:
        short = [c.replace(max_iters=10) for c in pair]
        first = train_group(short, batches, fp16)
        ckpts = [copy.deepcopy(c.checkpoints[10]) for c in first]
        ckpts[0]["scaler"]["scale"] = 2.0**40
        resumed = train_group(pair, batches, fp16, resume=copy.deepcopy(ckpts))
        over, healthy = resumed[0].checkpoints[20], resumed[1].checkpoints[20]
        frozen = all(torch.equal(over["model"][k].cpu(), ckpts[0]["model"][k].cpu()) for k in over["model"])
        return {
            "overflowed_scale": over["scaler"]["scale"],
            "healthy_scale": healthy["scaler"]["scale"],
            "overflowed_weights_unchanged": frozen,
            "ok": over["scaler"]["scale"] == 2.0**30 and healthy["scaler"]["scale"] == 2.0**16 and frozen,
        }

    def resume_across_devices() -> dict[str, Any]:
        cfg = tiny(dev)
        path = Path(tempfile.mkdtemp()) / "ckpt.pt"
        on_cpu = train_group([cfg.replace(device="cpu", max_iters=10)], cpu_batches, cpu32)[0]
        save_checkpoint(on_cpu.checkpoints[10], path)
        figures: dict[str, Any] = {}
        for name, hw in (("cpu_to_device_bf16", bf16), ("cpu_to_device_fp16", fp16)):
            done = train_group([cfg], batches, hw, resume=[load_checkpoint(path)])[0]
            figures[name] = done.metrics["val_loss"][20]
        straight = train_group([cfg], batches, bf16)[0]
        save_checkpoint(straight.checkpoints[10], path)
        again = train_group([cfg], batches, bf16, resume=[load_checkpoint(path)])[0]
        figures["device_to_device_difference"] = abs(again.metrics["val_loss"][20] - straight.metrics["val_loss"][20])
        finite = all(math.isfinite(figures[k]) for k in ("cpu_to_device_bf16", "cpu_to_device_fp16"))
        return {**figures, "ok": finite and figures["device_to_device_difference"] < 0.01}

    def real_out_of_memory() -> dict[str, Any]:
        if check.smoke:
            raise Skipped("needs CUDA (torch.cuda.set_per_process_memory_fraction)")
        cmd = [sys.executable, str(Path(__file__)), "oom-child", "--input", str(check.input)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(check.time_left() - 5, 10))
        if done.returncode:
            raise RuntimeError(f"oom-child exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def peak_against_plan() -> dict[str, Any]:
        if check.smoke:
            raise Skipped("needs CUDA (torch.cuda.max_memory_allocated)")
        return measured_peak(largest_group(check), batches, bf16)

    probes: dict[str, Callable[[], dict[str, Any]]] = {
        "bf16_fused_vs_cpu_fp32_alone": bf16_fused_vs_cpu_fp32_alone,
        "fp32_fused_vs_alone": fp32_fused_vs_alone,
        "mixed_dropout": mixed_dropout,
        "fp16_scaler_isolation": fp16_scaler_isolation,
        "resume_across_devices": resume_across_devices,
        "real_out_of_memory": real_out_of_memory,
        "peak_against_plan": peak_against_plan,
    }
    figures: dict[str, Any] = {}
    errors = []
    for name, probe in probes.items():
        started = time.monotonic()
        try:
            figures[name] = probe()
            if not figures[name].get("ok", True):
                errors.append(f"{name}: does not hold: {figures[name]}")
        except Skipped as skip:
            figures[name] = {"skipped": str(skip)}
        except Exception as exc:
            figures[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            errors.append(f"{name}: {type(exc).__name__}: {exc}"[:500])
            traceback.print_exc()
        figures[name]["seconds"] = round(time.monotonic() - started, 2)
    return {"figures": figures, "errors": errors}


def largest_group(check: Check) -> list[TrainConfig]:
    groups = study(check)
    name = max(groups, key=lambda n: flops_per_iter(groups[n][0]))
    return groups[name]


def measured_peak(configs: list[TrainConfig], batches: Batches, hw: Hardware) -> dict[str, Any]:
    """A step of a group with its measured plan: the memory peak of its passes against what the plan predicted."""
    group = FusedGroup([Trial(c, build_model(c, VOCAB), Clock()) for c in configs], hw)
    autocast = autocast_for(hw)
    plan = plan_passes(group, batches, autocast)
    total = configs[0].gradient_accumulation_steps * configs[0].batch_size
    per_pass = plan.train_pass(total, len(configs))
    x, y = batches.sample_trials("train", total, configs[0].block_size, [r.generator for r in group.runs])
    synchronize(hw.device)
    torch.cuda.reset_peak_memory_stats(hw.device)
    before = torch.cuda.memory_allocated(hw.device)
    group.accumulate(x, y, per_pass, autocast)
    synchronize(hw.device)
    peak = torch.cuda.max_memory_allocated(hw.device) - before
    group.step()
    synchronize(hw.device)
    step_peak = torch.cuda.max_memory_allocated(hw.device) - before
    predicted = plan.predicted_bytes(per_pass, len(configs))
    return {
        "group": configs[0].run_name,
        "trials": len(configs),
        "sequences_per_pass": per_pass,
        "recipe_batch": total,
        "capacity_trial_sequences": plan.capacity,
        "mib_per_trial_sequence": plan.bytes_per_sequence / 2**20,
        "passes_peak_mib": peak / 2**20,
        "predicted_mib": predicted / 2**20,
        "peak_over_predicted": peak / predicted,
        "optimizer_step_peak_mib": step_peak / 2**20,
        "ok": peak <= 1.25 * predicted,
    }


def oom_child(input_path: Path) -> None:
    """In a subprocess: a real out-of-memory error, from a per-process memory fraction the plan cannot see."""
    check = Check(Path("."), input_path, None, False, time.monotonic() + 600)
    hw = check.hardware(torch.bfloat16)
    batches = Batches(prepare(input_path), hw.device)
    configs = [c.replace(max_iters=3, eval_iters=1, eval_interval=1000, log_interval=1) for c in largest_group(check)]
    passes: list[int] = []
    limit = 3 * 2**30  # of which the models and data take little: the recipe's whole batch cannot fit in one pass
    torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory)
    clocks = [Clock() for _ in configs]
    trials = [Trial(c, build_model(c, VOCAB), clock) for c, clock in zip(configs, clocks)]

    def note_pass(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, GPT) and module.training:
            passes.append(args[0].shape[1])

    hook = register_module_forward_pre_hook(note_pass)
    plan = PassPlan(preferred=configs[0].gradient_accumulation_steps * configs[0].batch_size)  # the whole batch
    train_fused(trials, batches, hw, lambda trial, result: None, plan)
    hook.remove()
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()
    free_run = train_group(configs, batches, hw)
    difference = max(
        abs(a.metrics["iter_loss"][s] - b.metrics["iter_loss"][s])
        for a, b in zip(clocks, free_run)
        for s in b.metrics["iter_loss"]
    )
    retries = sum(1 for a, b in zip(passes, passes[1:]) if b < a)
    print(
        json.dumps(
            {
                "limit_gib": limit / 2**30,
                "group": configs[0].run_name,
                "pass_sizes_tried": sorted(set(passes), reverse=True),
                "halvings": retries,
                "final_capacity": plan.capacity,
                "max_iter_loss_difference_vs_unlimited": difference,
                "ok": retries > 0 and difference < 0.02,
            }
        )
    )


# --- stage 3: throughput of the study's fusion groups, and the study's time extrapolated -------------------------


def group_events(configs: list[TrainConfig]) -> dict[str, Any]:
    """What a fused group does over its whole training, counted: steps and evaluations by how many trials take part,
    checkpoints and run ends. The loop's own rules (train.train_fused), replayed on the configs."""
    steps: Counter[int] = Counter()
    evaluations: Counter[int] = Counter()
    checkpoints = 0
    for it in range(max(c.max_iters for c in configs) + 1):
        due = [c for c in configs if it <= c.max_iters and (it % c.eval_interval == 0 or it == c.max_iters)]
        if due:
            evaluations[len(due)] += 1
            checkpoints += len(due) if it > 0 else 0
        stepping = sum(1 for c in configs if it < c.max_iters)
        if stepping:
            steps[stepping] += 1
    return {"steps": dict(steps), "evaluations": dict(evaluations), "checkpoints": checkpoints, "runs": len(configs)}


def by_trials(times: dict[str, float], k: int) -> float:
    """A per-event time for k trials from the k measured (linear between and beyond the measured group sizes)."""
    measured = sorted((int(n), t) for n, t in times.items())
    if len(measured) == 1:
        return measured[0][1] * k / measured[0][0]
    (k1, t1), (k2, t2) = measured[0], measured[-1]
    return t1 + (t2 - t1) * (k - k1) / (k2 - k1)


def predicted_seconds(events: dict[str, Any], timing: dict[str, Any], process_start: float) -> float:
    """A group's wall time: each measured per-event time multiplied by how often the group has the event."""
    seconds = process_start
    seconds += sum(n * by_trials(timing["step_seconds"], int(k)) for k, n in events["steps"].items())
    seconds += sum(n * by_trials(timing["evaluation_seconds"], int(k)) for k, n in events["evaluations"].items())
    seconds += events["checkpoints"] * timing["checkpoint_seconds"]
    seconds += events["runs"] * (timing["run_start_seconds"] + timing["run_end_seconds"])
    return seconds


def time_group(
    configs: list[TrainConfig], batches: Batches, hw: Hardware, experiment_id: str, timed_iters: int
) -> dict[str, Any]:
    """Step time with the whole group and with its longer half, one evaluation of each, a run's start, checkpoint
    and end.

    The loop logs every timed_iters iterations (a sync, as a real run's log points are): the whole group trains
    3 x timed_iters iterations (the first interval warms up, the second is timed), then the longer half alone as many.
    """
    configs = sorted(configs, key=lambda c: (c.max_iters, c.dropout))
    half, t = len(configs) // 2, timed_iters
    loop = [
        c.replace(
            max_iters=3 * t if i < half else 6 * t, log_interval=t, eval_iters=1, eval_interval=10**6, num_samples=0
        )
        for i, c in enumerate(configs)
    ]
    stamps = train_group(loop, batches, hw)[-1].stamps  # the longest trial logs in both phases
    step_seconds = {
        str(len(configs)): (stamps[2 * t] - stamps[t]) / t,
        str(len(configs) - half): (stamps[5 * t] - stamps[4 * t]) / t,
    }
    evaluation_seconds = {}
    for k in sorted({len(configs), len(configs) - half}):
        group = FusedGroup([Trial(c, build_model(c, VOCAB), Clock()) for c in configs[-k:]], hw)
        plan = plan_passes(group, batches, autocast_for(hw))
        synchronize(hw.device)
        t0 = time.perf_counter()
        estimate_losses(group, batches, autocast_for(hw), plan)
        evaluation_seconds[str(k)] = time.perf_counter() - t0
    bookkeeping = time_run_bookkeeping(group, batches, experiment_id)
    return {
        "step_seconds": step_seconds,
        "evaluation_seconds": evaluation_seconds,
        **bookkeeping,
        "tokens_per_iter": configs[0].tokens_per_iter,
        "flops_per_iter": flops_per_iter(configs[0]),
    }


def time_run_bookkeeping(group: FusedGroup, batches: Batches, experiment_id: str) -> dict[str, float]:
    """One run's own costs in a real tracking store, as a trial pays them: its start (params, dataset, vocabulary,
    config), one checkpoint (the copy off the device and the save; its upload overlaps training) and its end
    (samples, loss curve, final flush, FINISHED)."""
    run, hw, prepared = group.runs[0], group.hw, prepare()
    model = run.trial.model
    recorder = RunRecorder(run.cfg, TrackedRun.create(experiment_id, run.cfg.run_name, {}))
    t0 = time.perf_counter()
    recorder.start(model, hw, prepared, batches, {})
    start = time.perf_counter() - t0
    synchronize(hw.device)
    t0 = time.perf_counter()
    recorder.log_checkpoint(group.checkpoint(0))
    checkpoint = time.perf_counter() - t0
    t0 = time.perf_counter()
    recorder.finish_trained(TrainOutcome(run.cfg.max_iters, 1.0, 1.0, 1.0), model, prepared.vocab())
    return {"run_start_seconds": start, "checkpoint_seconds": checkpoint, "run_end_seconds": time.perf_counter() - t0}


def process_start_seconds() -> float:
    """A trial process's start before its first step: Python, torch, mlflow and nanosweep imports, device init."""
    device = "'cuda' if torch.cuda.is_available() else None"
    code = f"import torch, mlflow, nanosweep.tracking.recorder; torch.zeros(1, device={device})"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def stage_throughput(check: Check) -> dict[str, Any]:
    hw = check.hardware(torch.bfloat16)
    batches = Batches(prepare(check.input), check.device)
    groups = study(check)
    connect(f"sqlite:///{tempfile.mkdtemp(prefix='gpucheck-store-')}/mlflow.db")  # the runs' bookkeeping is timed
    experiment_id = ensure_experiment("gpucheck")
    timed_iters = 3 if check.smoke else 8
    figures: dict[str, Any] = {"process_start_seconds": process_start_seconds(), "groups": {}}
    order = sorted(groups, key=lambda n: flops_per_iter(groups[n][0]))
    order = order[::2] + order[1::2]  # every other size first: a stage cut short still spans the sizes
    for name in order:
        if figures["groups"] and check.time_left() < 12:
            break  # what is left is scaled from the measured groups nearest in FLOPs
        figures["groups"][name] = time_group(groups[name], batches, hw, experiment_id, timed_iters)
        partial = {"status": "running", "figures": figures, "errors": []}
        record(check.out, "throughput", partial)  # a stage cut short keeps what it measured
        print(name, json.dumps(figures["groups"][name]), flush=True)
    figures["study"] = extrapolate_study(groups, figures)
    return {"figures": figures, "errors": []}


def extrapolate_study(groups: dict[str, list[TrainConfig]], figures: dict[str, Any]) -> dict[str, Any]:
    """The whole study on this device: one group after another (--workers 0 on one GPU), each group predicted from
    its own measured times, or a group's nearest in FLOPs scaled by FLOPs when it was not measured."""
    measured = figures["groups"]
    total = 0.0
    per_group = {}
    for name, configs in groups.items():
        flops = flops_per_iter(configs[0])
        ref = measured.get(name) or measured[min(measured, key=lambda n: abs(measured[n]["flops_per_iter"] - flops))]
        scale = 1.0 if name in measured else flops / ref["flops_per_iter"]
        timing = {
            "step_seconds": {k: v * scale for k, v in ref["step_seconds"].items()},
            "evaluation_seconds": {k: v * scale for k, v in ref["evaluation_seconds"].items()},
            **{k: ref[k] for k in ("run_start_seconds", "checkpoint_seconds", "run_end_seconds")},
        }
        per_group[name] = predicted_seconds(group_events(configs), timing, figures["process_start_seconds"])
        total += per_group[name]
    return {"minutes": total / 60, "groups_measured": len(measured), "groups": len(groups), "group_seconds": per_group}


# --- stage 4: one real fused group through `nanosweep sweep` ----------------------------------------------------


CHECK_MEMBER = """\
member: gpucheck
global_id_offset: 900
fixed: {block_size: %(block)d, n_layer: %(layers)d, n_head: %(heads)d, n_embd: %(embd)d, batch_size: %(batch)d}
grid:
  max_iters: [%(short)d, %(long)d]
  dropout: [0.1, 0.2]
overrides: %(overrides)s
"""


def sweep_group(check: Check) -> tuple[str, list[TrainConfig], dict[str, Any]]:
    """The group stage 4 trains: the study's smallest architecture and its recipe at 1/5 of the iterations (smoke:
    tiny); its name among the study's groups, its configs and the member file's overrides."""
    groups = study(check)
    name = min(groups, key=lambda n: flops_per_iter(groups[n][0]))
    # eager, as the throughput stage measures it: the extrapolation's error compares like with like (the compile
    # stage measures what compiling changes)
    overrides: dict[str, Any] = {"device": str(check.device), "compile": "off"}
    if check.smoke:
        overrides.update(
            gradient_accumulation_steps=1,
            eval_iters=2,
            eval_interval=10,
            num_samples=1,
            max_new_tokens=20,
            warmup_iters=10,
        )
    iters = (10, 20) if check.smoke else (200, 400)
    grid = [(iters[0], 0.1), (iters[0], 0.2), (iters[1], 0.1), (iters[1], 0.2)]  # the member file's order
    configs = [groups[name][0].replace(max_iters=i, dropout=d, seed=s, **overrides) for s, (i, d) in enumerate(grid, 1)]
    return name, configs, overrides


def stage_sweep(check: Check) -> dict[str, Any]:
    from mlflow import MlflowClient

    name, configs, overrides = sweep_group(check)
    cfg = configs[0]
    work = Path(tempfile.mkdtemp(prefix="gpucheck-sweep-"))
    (work / "sweeps").mkdir()
    (work / "sweeps" / "gpucheck.yaml").write_text(
        CHECK_MEMBER
        % dict(
            block=cfg.block_size,
            layers=cfg.n_layer,
            heads=cfg.n_head,
            embd=cfg.n_embd,
            batch=cfg.batch_size,
            short=configs[0].max_iters,
            long=configs[-1].max_iters,
            overrides=json.dumps(overrides),
        )
    )
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    if not check.smoke:
        env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "2"  # a few samples in a run of seconds
    cmd = [sys.executable, "-m", "nanosweep", "sweep", "--member", "gpucheck", "--sweeps-dir", str(work / "sweeps")]
    t0 = time.perf_counter()  # the driver's own start: imports, a new store's schema, planning
    subprocess.run([*cmd, "--dry-run"], cwd=work, env=env, capture_output=True, check=True)
    driver = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(done.stdout[-3000:], done.stderr[-5000:], sep="\n")
    errors = [] if done.returncode == 0 else [f"sweep exited {done.returncode}: {done.stderr.strip()[-500:]}"]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.run_kind = 'trial'")
    wanted = {"ckpt.pt", "vocab.json", "loss_curve.png", "samples", "logs"}
    for run in runs:
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        missing = sorted(wanted - names)
        gpu_metrics = [k for k in run.data.metrics if k.startswith("system/gpu_")]
        if run.info.status != "FINISHED" or missing or (not check.smoke and not gpu_metrics):
            errors.append(f"{run.info.run_name}: {run.info.status}, missing {missing}, gpu metrics {gpu_metrics}")
    if len(runs) != len(configs):
        errors.append(f"{len(runs)} trial runs, not {len(configs)}")
    figures = {"group": name, "runs": len(runs), "wall_seconds": wall, "driver_seconds": driver}
    figures["events"] = group_events(configs)
    throughput = read_results(check.out)["stages"].get("throughput", {}).get("figures", {})
    timing = throughput.get("groups", {}).get(name)
    if timing:  # the extrapolation's rule, applied to this group: how far off is it?
        predicted = driver + predicted_seconds(group_events(configs), timing, throughput["process_start_seconds"])
        figures.update(predicted_seconds=predicted, extrapolation_error=(predicted - wall) / wall)
    return {"figures": figures, "errors": errors}


# --- stage 5: compiling, compile=auto's choice on CUDA ----------------------------------------------------------


def stage_compile(check: Check) -> dict[str, Any]:
    """The study's smallest group (its 8 trials, full recipe) for 40 iterations, eager and compiled, in bf16: the
    losses' difference (dropout draws differ, but 40 iterations of warmup hardly move the weights), the step time
    after compiling and the time compiling cost. Half the trials leave at 20, so Dynamo compiles again for the
    rest, as in a real group."""
    from torch._dynamo.utils import counters

    if check.smoke:  # measured on the 2-core CPU: 136 s to compile even 2 tiny trials
        raise Skipped("compiling takes a CPU minutes: tests/test_fused.py checks compiled against eager there")
    smallest = min(study(check).values(), key=lambda configs: flops_per_iter(configs[0]))
    group = [c.replace(max_iters=20 if k < len(smallest) // 2 else 40, eval_interval=20, eval_iters=2, log_interval=5)
             for k, c in enumerate(smallest)]  # fmt: skip
    batches = Batches(prepare(check.input), check.device)
    figures: dict[str, Any] = {"compile_by_default": resolve_compile("auto", check.device), "trials": len(group)}
    clocks = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        counters.clear()
        synchronize(check.device)
        t0 = time.perf_counter()
        clocks[name] = train_group(group, batches, Hardware(check.device, torch.bfloat16, compiled))
        figures[f"{name}_seconds"] = time.perf_counter() - t0  # compiling included
        stamps = clocks[name][-1].stamps  # log points before the step of 25 and of 35: half the group
        figures[f"{name}_step_seconds"] = (stamps[35] - stamps[25]) / 10
        figures[f"{name}_graphs"] = counters["stats"]["unique_graphs"]
        record(check.out, "compile", {"status": "running", "figures": figures, "errors": []})  # if cut short
    worst = max(max_difference(a, b, key) for a, b in zip(clocks["eager"], clocks["compiled"])
                for key in ("iter_loss", "val_loss"))  # fmt: skip
    figures["max_loss_difference"] = worst
    figures["step_speedup"] = figures["eager_step_seconds"] / figures["compiled_step_seconds"]
    errors = [] if worst < 0.05 else [f"compiled losses differ from eager by {worst:.4f} (> 0.05, bf16 noise)"]
    if not figures["compiled_graphs"]:
        errors.append("nothing was compiled")
    return {"figures": figures, "errors": errors}


# --- stage 6: nanoGPT's own train.py, one run after another --------------------------------------------------------


def stage_nanogpt(check: Check) -> dict[str, Any]:
    if check.nanogpt is None:
        raise Skipped("no --nanogpt checkout given")
    groups = study(check)
    names = sorted(groups, key=lambda n: flops_per_iter(groups[n][0]))
    iters = 8 if check.smoke else 160
    figures: dict[str, Any] = {"iterations": iters, "measured": {}}
    for name in (names[0], names[-1]):
        cfg = groups[name][0]
        step, evaluation = nanogpt_seconds(check.nanogpt, cfg, str(check.device), iters)
        figures["measured"][name] = {
            "step_seconds": step,
            "evaluation_seconds": evaluation,
            "flops_per_iter": flops_per_iter(cfg),
        }
        record(check.out, "nanogpt", {"status": "running", "figures": figures, "errors": []})
    total = 0.0
    for configs in groups.values():
        flops = flops_per_iter(configs[0])
        ref = min(figures["measured"].values(), key=lambda m: abs(m["flops_per_iter"] - flops))
        scale = flops / ref["flops_per_iter"]
        for c in configs:
            evaluations = c.max_iters // c.eval_interval + 1 + (c.max_iters % c.eval_interval != 0)
            total += scale * (c.max_iters * ref["step_seconds"] + evaluations * ref["evaluation_seconds"])
    figures["study_hours_one_after_another"] = total / 3600
    return {"figures": figures, "errors": []}


# --- summary.md ----------------------------------------------------------------------------------------------


def summary(out: Path) -> str:
    results = read_results(out)
    env, stages = results["environment"], results["stages"]
    device = env.get("gpu", "CPU (smoke)" if env.get("smoke") else "CPU")
    lines = [f"# nanosweep GPU check: {device}", ""]
    lines.append(", ".join(f"{k} {v}" for k, v in env.items()))
    lines += ["", "| stage | status | seconds | what it says |", "|---|---|---|---|"]
    for name in STAGES:
        entry = stages.get(name, {"status": "not run"})
        lines.append(f"| {name} | {entry['status']} | {entry.get('seconds', '-')} | {headline(name, entry)} |")
    for name in STAGES:
        for error in stages.get(name, {}).get("errors", []):
            lines.append(f"- {name}: {error}")
    study_figures = stages.get("throughput", {}).get("figures", {}).get("study")
    if study_figures:
        target = next((m for gpu, m in TARGET_MINUTES.items() if gpu in device), None)
        verdict = f" against a target of {target:g} min" if target else ""
        lines += [
            "",
            f"The study extrapolated: **{study_figures['minutes']:.1f} min**{verdict} "
            f"({study_figures['groups_measured']} of {study_figures['groups']} groups measured).",
        ]
    return "\n".join(lines) + "\n"


def headline(name: str, entry: dict[str, Any]) -> str:
    figures = entry.get("figures", {})
    if entry.get("status") == "skipped":
        return entry.get("reason", "")
    if name == "tests":
        return ", ".join(f"{k} {v}" for k, v in figures.items())
    if name == "probes":
        return ", ".join(f"{k}: {'ok' if v.get('ok') else v.get('skipped') or 'FAILED'}" for k, v in figures.items())
    if name == "throughput" and "study" in figures:
        return f"study {figures['study']['minutes']:.1f} min; process start {figures['process_start_seconds']:.1f} s"
    if name == "sweep" and "wall_seconds" in figures:
        error = figures.get("extrapolation_error")
        return f"{figures['runs']} runs in {figures['wall_seconds']:.1f} s" + (
            f", extrapolation off by {error:+.0%}" if error is not None else ""
        )
    if name == "compile" and "step_speedup" in figures:
        cost = figures["compiled_seconds"] - figures["eager_seconds"]
        speedup, difference = figures["step_speedup"], figures["max_loss_difference"]
        return f"compiled step {speedup:.2f}x as fast as eager, {cost:.0f} s to compile; losses within {difference:.4f}"
    if name == "nanogpt" and "study_hours_one_after_another" in figures:
        return f"nanoGPT one run after another: {figures['study_hours_one_after_another']:.2f} h for the study"
    return ""


# --- command line ----------------------------------------------------------------------------------------------


STAGE_FUNCTIONS = {
    "tests": stage_tests,
    "probes": stage_probes,
    "throughput": stage_throughput,
    "sweep": stage_sweep,
    "compile": stage_compile,
    "nanogpt": stage_nanogpt,
}


def run_stage(name: str, check: Check) -> int:
    started = time.monotonic()
    try:
        if not check.smoke and not torch.cuda.is_available():
            raise Skipped("no CUDA device here (run with --smoke on a CPU)")
        outcome = STAGE_FUNCTIONS[name](check)
        entry = {"status": "failed" if outcome["errors"] else "ok", **outcome}
    except Skipped as skip:
        entry = {"status": "skipped", "reason": str(skip), "errors": [], "figures": {}}
    except Exception as exc:
        traceback.print_exc()
        entry = {"status": "failed", "errors": [f"{type(exc).__name__}: {exc}"[:1000]], "figures": {}}
    entry["seconds"] = round(time.monotonic() - started, 1)
    record(check.out, name, entry)
    print(f"gpu_check: {name} {entry['status']} in {entry['seconds']} s", flush=True)
    return 0 if entry["status"] != "failed" else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["env", "stage", "record", "summary", "oom-child"])
    parser.add_argument("name", nargs="?")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--input", type=Path)
    parser.add_argument("--nanogpt", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seconds", type=float, default=120.0, help="the stage's time limit")
    parser.add_argument("--message", default="")
    args = parser.parse_args()
    if args.command == "env":
        results = read_results(args.out)
        results["environment"] = environment(args.smoke)
        write_results(args.out, results)
    elif args.command == "record":  # the shell's word on a stage it had to kill: what it wrote so far stays
        entry = read_results(args.out)["stages"].get(args.name, {"figures": {}})
        entry.update(status="failed", errors=[*entry.get("errors", []), args.message])
        record(args.out, args.name, entry)
    elif args.command == "summary":
        (args.out / "summary.md").write_text(summary(args.out))
        print(summary(args.out))
    elif args.command == "oom-child":
        oom_child(args.input)
    else:
        check = Check(args.out, args.input, args.nanogpt, args.smoke, time.monotonic() + args.seconds - 10)
        sys.exit(run_stage(args.name, check))


if __name__ == "__main__":
    main()
