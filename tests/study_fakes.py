"""Study runs for the analysis, artifact, import and registry tests: known values logged directly, or tiny training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import tiny_config
from nanosweep.config import TrainConfig
from nanosweep.tracking.recorder import run_trial
from nanosweep.tracking.run import TrackedRun

Evals = dict[int, tuple[float, float]]  # step -> (train loss, val loss)


@contextlib.contextmanager
def shared_store(root: Path) -> Iterator[str]:
    """Like conftest's `store`, for a module-scoped fixture: a SQLite store in root, the working directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


def study_tags(
    member: str, position: int, global_id: int, profile: str = "quick", kind: str = "trial", replicate: int = 0
) -> dict:
    """The tags a sweep gives a run; replicate 0 leaves the tag out, as on imported and older runs."""
    tags = {
        "member": member,
        "profile": profile,
        "grid_position": str(position),
        "global_id": str(global_id),
        "run_kind": kind,
    }
    return {**tags, "replicate": str(replicate)} if replicate else tags


def log_known_run(
    experiment_id: str,
    member: str,
    position: int,
    global_id: int,
    cfg: TrainConfig,
    evals: Evals,
    total_params: int = 12345,
    profile: str = "quick",
    kind: str = "trial",
    status: str = "FINISHED",
    replicate: int = 0,
) -> str:
    """A run with the contract's tags, params, evaluation metrics and config artifact; values from the test."""
    tags = study_tags(member, position, global_id, profile, kind, replicate)
    run = TrackedRun.create(experiment_id, cfg.run_name, tags)
    run.log_params({**cfg.to_dict(), "total_params": total_params, "member": member, "profile": profile})
    for step, (train, val) in sorted(evals.items()):
        run.log_metrics({"train_loss": train, "val_loss": val}, step=step)
    last = max(evals)
    train, val = evals[last]
    run.log_metrics({"loss_gap": val - train, "best_val_loss": min(v for _, v in evals.values())}, step=last)
    run.log_text(cfg.nanogpt_config(out_dir=cfg.run_name), f"{cfg.run_name}.py")
    run.finish(status)
    return run.run_id


def train_study_run(experiment: str, experiment_id: str, member: str, position: int, **changes: object) -> str:
    """A tiny real training run (checkpoint, vocab, samples) tagged as grid point `position` of member."""
    cfg = tiny_config(seed=position, **changes)
    run = TrackedRun.create(experiment_id, cfg.run_name, study_tags(member, position, position))
    return run_trial(cfg, experiment, run_id=run.run_id)


def artifact_uri(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.artifact_uri
