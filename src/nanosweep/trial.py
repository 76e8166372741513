"""One tracked training: config -> data -> train loop -> MLflow run, ended FINISHED, FAILED or KILLED.

`nanosweep train`, the MLproject `train` entry point and every sweep trial process run this.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from pathlib import Path
from types import FrameType

from nanosweep import plots
from nanosweep.config import ConfigError, TrainConfig
from nanosweep.data import SOURCE_URL, Batches, PreparedData, prepare
from nanosweep.progress import ProgressObserver
from nanosweep.sampling import SampleSettings, format_samples, generate_texts
from nanosweep.tracking import (
    CONFIG_HASH_TAG,
    HOST_TAG,
    PID_TAG,
    RUN_KIND_TAG,
    TrackedRun,
    TrackingError,
    ensure_experiment,
)
from nanosweep.train import Hardware, build_model, resolve_hardware, train


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) reached a trial: the run ends KILLED, its last checkpoint kept for resuming."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def interrupt_once(signum: int, _frame: FrameType | None) -> None:
    """The first SIGINT or SIGTERM interrupts; later ones are ignored so they cannot cut the run's ending short."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def check_fits(cfg: TrainConfig, prepared: PreparedData) -> None:
    """A block needs block_size+1 consecutive characters of the (shorter) validation split."""
    val_chars = prepared.val_bin.stat().st_size // 2
    if cfg.block_size >= val_chars:
        raise ConfigError(
            f"block_size={cfg.block_size} is longer than the validation split: it must be below {val_chars}"
        )


def run_trial(
    cfg: TrainConfig,
    experiment: str,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    input_path: str | None = None,
) -> str:
    """Train cfg into run_id (or MLFLOW_RUN_ID, or a new run), resuming from its checkpoint; return the run id."""
    # everything that can be refused is refused before a run exists
    prepared = prepare(input_path)
    check_fits(cfg, prepared)
    hardware = resolve_hardware(cfg)
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        run = TrackedRun(run_id)
        info = run.info()
        recorded = info.data.tags.get(CONFIG_HASH_TAG)
        if recorded not in (None, cfg.config_hash):
            raise TrackingError(
                f"run {run_id} was trained with config hash {recorded}, not {cfg.run_name}'s {cfg.config_hash}: "
                "start a new run instead of resuming this one"
            )
        if info.info.status == "FINISHED":
            raise TrackingError(f"run {run_id} is FINISHED: a finished run is never trained again; start a new run")
        run.mark_running()
        if RUN_KIND_TAG not in info.data.tags:  # the run `mlflow run . -e train` made
            run.set_tags({RUN_KIND_TAG: "train"})
    else:
        run = TrackedRun.create(
            ensure_experiment(experiment), cfg.run_name, {RUN_KIND_TAG: "train", **(tags or {})}, parent_run_id
        )

    previous = {stop: signal.signal(stop, interrupt_once) for stop in STOP_SIGNALS}
    try:
        _train_into(run, cfg, prepared, hardware)
        _end(run, "FINISHED")
    except (Interrupted, KeyboardInterrupt) as exc:
        _end(run, "KILLED", f"interrupted by {exc.args[0] if exc.args else 'SIGINT'}")
        raise
    except BaseException as exc:
        _end(run, "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
    return run.run_id


def _end(run: TrackedRun, status: str, reason: str | None = None) -> None:
    """End the run; a stop signal arriving now (Ctrl-C, then the sweep's SIGTERM) must not cut the ending short."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    if run.ended:
        return  # a failed final flush already ended it FAILED
    run.finish(status, reason)


def _train_into(run: TrackedRun, cfg: TrainConfig, prepared: PreparedData, hardware: Hardware) -> None:
    vocab = prepared.vocab()
    model = build_model(cfg, vocab.size)
    # host and pid let a later sweep tell a live RUNNING run from one whose process was killed
    run.set_tags(
        {
            "mlflow.runName": cfg.run_name,
            CONFIG_HASH_TAG: cfg.config_hash,
            HOST_TAG: socket.gethostname(),
            PID_TAG: os.getpid(),
        }
    )
    run.log_params(
        {
            **cfg.to_dict(),
            "total_params": model.total_params(),
            "tokens_per_iter": cfg.tokens_per_iter,
            "train_device": str(hardware.device),
            "train_dtype": hardware.dtype_name,
        }
    )
    batches = Batches(prepared, hardware.device)
    split_sizes = {f"{split}_tokens": len(ids) for split, ids in batches.splits.items()}
    run.log_dataset("tinyshakespeare", prepared.digest, SOURCE_URL, {**split_sizes, "vocab_size": vocab.size})
    run.log_text(vocab.to_json(), "vocab.json")
    run.log_text(cfg.nanogpt_config(out_dir=cfg.run_name), f"{cfg.run_name}.py")

    checkpoint = run.download_checkpoint()
    progress = ProgressObserver(run, cfg, start_iter=checkpoint["iter_num"] if checkpoint else 0)
    outcome = train(cfg, model, batches, progress, resume_from=checkpoint)

    run.log_metrics(
        {"loss_gap": outcome.val_loss - outcome.train_loss, "best_val_loss": outcome.best_val_loss},
        step=outcome.iter_num,
    )
    sample_settings = SampleSettings(
        num_samples=cfg.num_samples,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        seed=cfg.sample_seed,
    )
    if cfg.num_samples:
        run.log_text(format_samples(generate_texts(model, vocab, sample_settings)), f"samples/{cfg.run_name}.txt")
    run.flush_and_wait()
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "loss_curve.png"
        plots.loss_curve(
            cfg.run_name,
            run.metric_history("iter_loss"),
            run.metric_history("train_loss"),
            run.metric_history("val_loss"),
            png,
        )
        run.log_file(png)
