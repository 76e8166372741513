"""One tracked training: config -> data -> train loop -> MLflow run, ended FINISHED, FAILED or KILLED.

`nanosweep train`, the MLproject `train` entry point and every sweep trial process run this.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from nanosweep import plots
from nanosweep.config import ConfigError, TrainConfig
from nanosweep.data import SOURCE_URL, Batches, PreparedData, prepare
from nanosweep.sampling import SampleSettings, format_samples, generate_texts
from nanosweep.tracking import CONFIG_HASH_TAG, HOST_TAG, PID_TAG, TrackedRun, TrackingError, ensure_experiment
from nanosweep.train import Hardware, RunObserver, build_model, resolve_hardware, train


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) reached a trial: the run ends KILLED, its last checkpoint kept for resuming."""


class StoppedEarly(Exception):
    """An observer stopped training on purpose (a search's pruner): the run ends FINISHED with these tags."""

    def __init__(self, reason: str, tags: dict[str, str]):
        super().__init__(reason)
        self.tags = tags


def _interrupt(signum: int, _frame: FrameType | None) -> None:
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
    else:
        run = TrackedRun.create(ensure_experiment(experiment), cfg.run_name, tags or {}, parent_run_id)

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _train_into(run, cfg, prepared, hardware, watch)
    except StoppedEarly as stop:
        run.set_tags(stop.tags)
        run.finish("FINISHED", str(stop))
        return run.run_id
    except (Interrupted, KeyboardInterrupt) as exc:
        run.finish("KILLED", f"interrupted by {exc.args[0] if exc.args else 'SIGINT'}")
        raise
    except BaseException as exc:
        run.finish("FAILED", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    run.finish("FINISHED")
    return run.run_id


def _train_into(
    run: TrackedRun,
    cfg: TrainConfig,
    prepared: PreparedData,
    hardware: Hardware,
    watch: Callable[[RunObserver], RunObserver] | None,
) -> None:
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

    observer = watch(run) if watch else run
    outcome = train(cfg, model, batches, observer, resume_from=run.download_checkpoint())

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
