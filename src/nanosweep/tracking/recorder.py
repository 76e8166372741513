"""Tracked training: config -> data -> train loop -> MLflow run, ended FINISHED, FAILED or KILLED.

`nanosweep train`, the MLproject `train` entry point and every sweep trial process run this. One
process trains one run, or a fused group of runs of one architecture (train.train_fused); each run
is complete on its own: params, metric history, checkpoints, samples, loss curve.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanosweep.config import ConfigError, TrainConfig
from nanosweep.data import SOURCE_URL, Batches, PreparedData, Vocab, prepare
from nanosweep.group import Diverged, RunObserver, StoppedEarly, TrainOutcome, Trial, build_model
from nanosweep.hardware import Hardware, resolve_hardware
from nanosweep.model import GPT
from nanosweep.progress import ProgressObserver
from nanosweep.sampling import SampleSettings, format_samples, generate_texts
from nanosweep.signals import Interrupted, signal_name, stop_signals
from nanosweep.tracking.heartbeat import Heartbeat
from nanosweep.tracking.names import (
    CONFIG_HASH_TAG,
    END_REASON_TAG,
    EXECUTOR_ENV,
    EXECUTOR_TAG,
    HOST_TAG,
    NODE_ENV,
    NODE_TAG,
    PID_TAG,
    RESUMED_FROM_TAG,
    RUN_KIND_TAG,
    TRAIN_RUN,
)
from nanosweep.tracking.run import CheckpointUnreadable, TrackedRun
from nanosweep.tracking.store import TrackingError, ensure_experiment, ensure_store, existing_run
from nanosweep.tracking.system_metrics import SystemMonitor
from nanosweep.train import train_fused


def check_fits(cfg: TrainConfig, prepared: PreparedData) -> None:
    """A block needs block_size+1 consecutive characters of the (shorter) validation split."""
    val_chars = prepared.val_bin.stat().st_size // 2
    if cfg.block_size >= val_chars:
        raise ConfigError(
            f"block_size={cfg.block_size} is longer than the validation split: it must be below {val_chars}"
        )


def check_resumable(cfg: TrainConfig, run: TrackedRun) -> None:
    """An existing run may take cfg's training unless it holds another config or is FINISHED."""
    info = existing_run(run.run_id)
    recorded = info.data.tags.get(CONFIG_HASH_TAG)
    if recorded not in (None, cfg.config_hash):
        raise TrackingError(
            f"run {run.run_id} was trained with config hash {recorded}, not {cfg.run_name}'s {cfg.config_hash}: "
            "start a new run instead of resuming this one"
        )
    if info.info.status == "FINISHED":
        raise TrackingError(f"run {run.run_id} is FINISHED: a finished run is never trained again; start a new run")


def placement_tags() -> dict[str, str]:
    """The executor and node tags, from what the executor that started this process told it."""
    placed = {EXECUTOR_TAG: os.environ.get(EXECUTOR_ENV), NODE_TAG: os.environ.get(NODE_ENV)}
    return {tag: value for tag, value in placed.items() if value}


@dataclass
class RunRecorder:
    """One trial's MLflow run as the training loop's observer, and what is logged at its start and end."""

    cfg: TrainConfig
    run: TrackedRun
    monitor: SystemMonitor | None = None  # the process's system metrics (runs on a GPU), logged to this run too
    final_status: str = ""  # FINISHED, FAILED or KILLED once the run is ended

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log_metrics(metrics, step)

    def log_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run.log_checkpoint(checkpoint)

    def start(
        self, model: GPT, hardware: Hardware, prepared: PreparedData, batches: Batches, tags: dict[str, str]
    ) -> None:
        """Tags, params, dataset, vocabulary and nanoGPT config file: everything known before training."""
        cfg, vocab = self.cfg, prepared.vocab()
        # where it trains, for people; whether it still does is the heartbeat's to say (tracking.alive)
        self.run.set_tags(
            {
                "mlflow.runName": cfg.run_name,
                CONFIG_HASH_TAG: cfg.config_hash,
                HOST_TAG: socket.gethostname(),
                PID_TAG: os.getpid(),
                **placement_tags(),
                **tags,
            }
        )
        self.run.log_params(
            {
                **cfg.to_dict(),
                "total_params": model.total_params(),
                "tokens_per_iter": cfg.tokens_per_iter,
                "train_device": str(hardware.device),
                "train_dtype": hardware.dtype_name,
                "train_compiled": hardware.compile,
            }
        )
        split_sizes = {f"{split}_tokens": len(ids) for split, ids in batches.splits.items()}
        self.run.log_dataset("tinyshakespeare", prepared.digest, SOURCE_URL, {**split_sizes, "vocab_size": vocab.size})
        self.run.log_text(vocab.to_json(), "vocab.json")
        self.run.log_text(cfg.nanogpt_config(out_dir=cfg.run_name), f"{cfg.run_name}.py")
        if self.monitor is not None:
            self.monitor.attach(self.run)

    def finish_trained(self, outcome: TrainOutcome, model: GPT, vocab: Vocab) -> None:
        """Final metrics, samples and loss curve, then FINISHED (FAILED if any of it cannot be stored)."""
        from nanosweep.loss_curve import save_loss_curve  # matplotlib only once a run has trained, never at start-up

        cfg, run = self.cfg, self.run
        run.log_metrics(
            {"loss_gap": outcome.val_loss - outcome.train_loss, "best_val_loss": outcome.best_val_loss},
            step=outcome.iter_num,
        )
        settings = SampleSettings(
            num_samples=cfg.num_samples,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            seed=cfg.sample_seed,
        )
        if cfg.num_samples:
            run.log_text(format_samples(generate_texts(model, vocab, settings)), f"samples/{cfg.run_name}.txt")
        run.flush_and_wait()
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "loss_curve.png"
            history = [run.metric_history(key) for key in ("iter_loss", "train_loss", "val_loss")]
            save_loss_curve(cfg.run_name, *history, png)
            run.log_file(png)
        self.end("FINISHED")

    def end(self, status: str, reason: str | None = None) -> None:
        """End the run once; one whose final flush failed was already ended FAILED by TrackedRun.finish."""
        if not self.final_status and not self.run.ended:
            self.final_status = status
            if self.monitor is not None:
                self.monitor.detach(self.run)
            self.run.finish(status, reason)
        self.final_status = self.final_status or "FAILED"


def train_runs(
    specs: list[tuple[TrainConfig, TrackedRun]],
    prepared: PreparedData,
    hardware: Hardware,
    tags: dict[str, str],
    watch: Callable[[RunObserver], RunObserver] | None = None,
) -> dict[str, str]:
    """Train runs of one architecture fused in this process; each run ends on its own. Returns run id -> status.

    watch wraps each run's observer (a search's pruner, which may stop it early: FINISHED with its tags).
    SIGTERM/SIGINT (Interrupted, under the command's stopping.stop_signals) end every unfinished run KILLED (then
    re-raise); any other error ends them FAILED.
    """
    vocab = prepared.vocab()
    batches = Batches(prepared, hardware.device)
    # where the hardware overlaps them, trained runs end (samples, final flush, loss curve) one at a time on a thread
    # beside their siblings' training (started at the first end). It computes on one CPU thread: a second OpenMP team
    # in the process made every later parallel region of the training's 2x slower (libgomp stops spinning once it
    # manages more threads than there are cores)
    run_ends = ThreadPoolExecutor(1, "run-end", initializer=torch.set_num_threads, initargs=(1,))
    ending: list[Future] = []
    # one system-metrics monitor for the process, on its own GPU, logging to each of its runs
    monitor = SystemMonitor([hardware.device.index or 0]) if hardware.device.type == "cuda" else None
    recorders = [RunRecorder(cfg, run, monitor) for cfg, run in specs]
    recorder_of: dict[int, RunRecorder] = {}  # id(Trial) -> its run
    # the heartbeat goes on until every run has ended
    with Heartbeat(run.run_id for _, run in specs), monitor or contextlib.nullcontext():
        try:
            trials = []
            for recorder in recorders:
                model = build_model(recorder.cfg, vocab.size)
                recorder.start(model, hardware, prepared, batches, tags)
                try:
                    checkpoint = recorder.run.download_checkpoint(recorder.cfg, model)
                except CheckpointUnreadable as exc:  # this run fails (the sweep retrains it); its siblings go on
                    recorder.end("FAILED", f"{type(exc).__name__}: {exc}")
                    continue
                start = checkpoint["iter_num"] if checkpoint else 0
                if checkpoint:  # each resume is recorded: where this process took the run over
                    recorder.run.set_tags({RESUMED_FROM_TAG: start})
                observer = ProgressObserver(recorder, recorder.cfg, start_iter=start)
                trials.append(Trial(recorder.cfg, model, watch(observer) if watch else observer, checkpoint))
                recorder_of[id(trials[-1])] = recorder

            def finish(recorder: RunRecorder, outcome: TrainOutcome, model: GPT) -> None:
                try:
                    recorder.finish_trained(outcome, model, vocab)
                except Exception as exc:  # its siblings go on; this run's end says why
                    recorder.end("FAILED", f"{type(exc).__name__}: {exc}")

            def on_end(trial: Trial, result: TrainOutcome | Diverged | StoppedEarly) -> None:
                recorder = recorder_of[id(trial)]
                if isinstance(result, TrainOutcome) and hardware.overlap_run_ends:
                    ending.append(run_ends.submit(finish, recorder, result, trial.model))  # the model is its own now
                    return
                with stop_signals.deferred():
                    if isinstance(result, TrainOutcome):  # a CPU's cores are all training's: the siblings wait
                        finish(recorder, result, trial.model)
                    elif isinstance(result, Diverged):
                        recorder.end("FAILED", f"Diverged: {result}")
                    else:
                        recorder.run.set_tags(result.tags)
                        recorder.end("FINISHED", str(result))

            if trials:
                train_fused(trials, batches, hardware, on_end)
            # run ends are waited for as Futures, not by joining the thread: Python 3.11's Thread.join, cut by a
            # stop signal, takes a running thread for stopped
            for end in ending:
                end.result()  # what escaped a run's end (not an Exception) fails the runs below
        except (Interrupted, KeyboardInterrupt) as exc:
            # the run end under way completes; those not begun end KILLED, to be finished from their last checkpoint
            run_ends.shutdown(wait=False, cancel_futures=True)
            wait(ending)
            # Ctrl-C reaches the sweep too, whose SIGTERM follows: stop_signals ignores it now
            for recorder in recorders:
                recorder.end("KILLED", f"interrupted by {signal_name(exc)}")
            raise
        except BaseException as exc:
            with stop_signals.deferred():
                wait(ending)  # trained runs still end as they would have
                for recorder in recorders:
                    recorder.end("FAILED", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            run_ends.shutdown()
    return {recorder.run.run_id: recorder.final_status for recorder in recorders}


def trial_spec(cfg: TrainConfig, run_id: str) -> str:
    """One run of a group as the JSON argument of `nanosweep train-group --trial`."""
    return json.dumps({"run_id": run_id, "config": cfg.to_dict()}, sort_keys=True)


def parse_trial_spec(text: str) -> tuple[TrainConfig, str]:
    """The (config, run id) of a --trial argument; a malformed one is a ConfigError naming it."""
    try:
        spec = json.loads(text)
        return TrainConfig(**spec["config"]), str(spec["run_id"])
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f'--trial {text[:80]!r} is not allowed: give JSON {{"run_id": ..., "config": {{TrainConfig fields}}}}'
        ) from None


def run_group(
    specs: list[tuple[TrainConfig, str]], tags: dict[str, str], input_path: str | None = None
) -> dict[str, str]:
    """Train existing runs (a sweep's fused group) in this process; run id -> FINISHED, FAILED or KILLED."""
    prepared = prepare(input_path)
    for cfg, _ in specs:
        check_fits(cfg, prepared)
    hardware = resolve_hardware(specs[0][0])  # one device and dtype for the group: part of its fusion key
    runs = [(cfg, TrackedRun(run_id)) for cfg, run_id in specs]
    for cfg, run in runs:  # every run is checked before any is touched
        check_resumable(cfg, run)
    for _, run in runs:
        run.take_over()
    return train_runs(runs, prepared, hardware, tags)


def run_trial(
    cfg: TrainConfig,
    experiment: str,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    input_path: str | None = None,
    watch: Callable[[RunObserver], RunObserver] | None = None,
) -> str:
    """Train cfg into run_id (or MLFLOW_RUN_ID, or a new run), resuming from its checkpoint; return the run id.

    watch wraps the run's observer (a search's pruner); it may end training early with StoppedEarly.
    """
    # everything that can be refused is refused before a run exists
    prepared = prepare(input_path)
    check_fits(cfg, prepared)
    hardware = resolve_hardware(cfg)
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        run = TrackedRun(run_id)
        check_resumable(cfg, run)
        run.take_over()
        if RUN_KIND_TAG not in run.info().data.tags:  # the run `mlflow run . -e train` made
            run.set_tags({RUN_KIND_TAG: TRAIN_RUN})
    else:
        if parent_run_id:
            existing_run(parent_run_id, "parent run")
        ensure_store()
        tags = {RUN_KIND_TAG: TRAIN_RUN, **(tags or {})}
        run = TrackedRun.create(ensure_experiment(experiment), cfg.run_name, tags, parent_run_id)
    status = train_runs([(cfg, run)], prepared, hardware, {}, watch)[run.run_id]
    if status != "FINISHED":
        reason = run.info().data.tags.get(END_REASON_TAG, "")
        raise TrackingError(f"run {run.run_id} ({cfg.run_name}) ended {status}: {reason}")
    return run.run_id
