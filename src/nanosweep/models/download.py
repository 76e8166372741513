"""Checkpoints and samples out of the tracking server's artifact store: the study's folder layout, or one model.

Files come through MLflow's artifact API (whatever the store: local, S3, mlflow-artifacts proxy), never
from a folder the tracking store does not know about.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from nanosweep.analysis.layout import results_csv, study_folder
from nanosweep.checkpoint import load_checkpoint, model_from_checkpoint
from nanosweep.config import TrainConfig
from nanosweep.data import Vocab
from nanosweep.hardware import resolve_hardware
from nanosweep.model import GPT
from nanosweep.tracking.names import CHECKPOINT
from nanosweep.tracking.query import SelectionError

VOCAB = "vocab.json"
SAMPLES_FOLDER = "samples"  # a run's generated texts, as artifacts and in the study folder


@dataclass(frozen=True)
class Transfer:
    """One artifact to bring into the study layout."""

    run_id: str
    artifact_path: str  # ckpt.pt or samples/<run name>.txt
    dest: Path
    size: int | None  # bytes, as the artifact store reports it

    def present(self) -> bool:
        """Already downloaded: a file of the same size is there (unknown sizes are fetched again)."""
        return self.size is not None and self.dest.is_file() and self.dest.stat().st_size == self.size


def plan_transfers(runs: pd.DataFrame, out: Path) -> list[Transfer]:
    """Every checkpoint and sample file of the runs, placed as the study did: {folder}/{run}/ckpt.pt, samples/."""
    return [t for run in runs.itertuples() for t in run_transfers(run.run_id, run.name, out / study_folder(run.member))]


def run_transfers(run_id: str, name: str, folder: Path) -> list[Transfer]:
    """One run's checkpoint and sample files, placed as the study did: {folder}/{name}/ckpt.pt, {folder}/samples/."""
    client = MlflowClient()
    transfers = []
    for info in client.list_artifacts(run_id):
        if info.path == CHECKPOINT:
            transfers.append(Transfer(run_id, info.path, folder / name / CHECKPOINT, info.file_size))
    for info in client.list_artifacts(run_id, SAMPLES_FOLDER):
        if not info.is_dir:
            local = folder / SAMPLES_FOLDER / Path(info.path).name
            transfers.append(Transfer(run_id, info.path, local, info.file_size))
    return transfers


def fetch(transfer: Transfer) -> None:
    """Download one artifact beside its destination, then rename: an interrupted download leaves no partial file."""
    transfer.dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=transfer.dest.parent) as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=transfer.run_id, artifact_path=transfer.artifact_path, dst_path=tmp
        )
        os.replace(local, transfer.dest)


def write_text_atomically(path: Path, text: str) -> None:
    """Write a temp file beside path, then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def download(
    runs: pd.DataFrame,
    out: Path,
    progress: Callable[[list[Transfer]], AbstractContextManager[Iterable[Transfer]]] = nullcontext,
) -> tuple[int, int]:
    """Bring the runs' checkpoints and samples into out with each member's results.csv; (fetched, skipped).

    progress wraps the list of files still to fetch (a progress bar on the command line).
    """
    fetched, skipped = fetch_missing(plan_transfers(runs, out), progress)
    for member, group in runs.groupby("member", sort=False):
        write_text_atomically(out / study_folder(member) / "results.csv", results_csv(group))
    return fetched, skipped


def fetch_missing(
    transfers: list[Transfer],
    progress: Callable[[list[Transfer]], AbstractContextManager[Iterable[Transfer]]] = nullcontext,
) -> tuple[int, int]:
    """Fetch the transfers not already present; (fetched, skipped)."""
    todo = [t for t in transfers if not t.present()]
    with progress(todo) as items:
        for transfer in items:
            fetch(transfer)
    return len(todo), len(transfers) - len(todo)


def model_files(run_id: str, dst: str) -> dict[str, str]:
    """A run's ckpt.pt and vocab.json downloaded into dst, by name; refused when the run lacks them."""
    names = {info.path for info in MlflowClient().list_artifacts(run_id)}
    missing = [name for name in (CHECKPOINT, VOCAB) if name not in names]
    if missing:
        raise SelectionError(
            f"run {run_id} has no {' or '.join(missing)} artifact: only finished training runs hold a model"
        )
    return {
        name: mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=dst)
        for name in (CHECKPOINT, VOCAB)
    }


def load_run_model(run_id: str, device: str = "auto") -> tuple[GPT, Vocab]:
    """A run's model and vocabulary, downloaded through MLflow (checkpoints load with weights_only=True)."""
    device = resolve_hardware(TrainConfig(device=device)).device  # the training's rules: auto, cpu, cuda:N, mps
    with tempfile.TemporaryDirectory(prefix="nanosweep-model-") as tmp:
        local = model_files(run_id, tmp)
        checkpoint = load_checkpoint(local[CHECKPOINT])
        vocab = Vocab.from_json(Path(local[VOCAB]).read_text(encoding="utf-8"))
    return model_from_checkpoint(checkpoint, device), vocab
