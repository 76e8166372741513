"""Shared fixtures: the real text (prepared once), a fresh SQLite MLflow store per test, tiny configs."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import mlflow
import pytest

from nanosweep.config import TrainConfig
from nanosweep.data import PreparedData, find_input, prepare
from nanosweep.tracking.heartbeat import alive
from nanosweep.tracking.names import HEARTBEAT_ENV

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# a beat every 2 s (stale after 8 s) in the tests and the processes they start, instead of every 15 s
os.environ[HEARTBEAT_ENV] = "2"


def heartbeat_stopped(run_id: str, client: mlflow.MlflowClient | None = None) -> bool:
    """The run's heartbeat is stale: a sweep now takes it for dead (wherever it ran)."""
    return not alive((client or mlflow.MlflowClient()).get_run(run_id).data.tags)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """tiny Shakespeare found the user's way (NANOSWEEP_INPUT, else ~/.cache/nanosweep, downloaded there once),
    prepared into a session folder; tests and the processes they start read that copy (NANOSWEEP_INPUT)."""
    os.environ["NANOSWEEP_INPUT"] = str(find_input())  # before the data dir moves: the user's cache, not a new one
    os.environ["NANOSWEEP_DATA_DIR"] = str(tmp_path_factory.mktemp("data"))  # inherited by CLI subprocesses too
    return prepare()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prepared: PreparedData) -> str:
    """A brand-new SQLite tracking store in tmp_path, the working directory of the test."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def tiny_config(**changes: object) -> TrainConfig:
    """A model that trains in about a second on a 2-core CPU, with the recipe's structure intact."""
    base = dict(
        block_size=32,
        n_layer=2,
        n_head=2,
        n_embd=32,
        batch_size=4,
        gradient_accumulation_steps=2,
        max_iters=20,
        eval_interval=10,
        eval_iters=4,
        log_interval=5,
        warmup_iters=10,
        num_samples=2,
        max_new_tokens=40,
        seed=1,
        device="cpu",  # the tests compare against CPU results; tests marked gpu ask for cuda
        compile="off",  # eager on CUDA too: compiling is gpu_check's stage `compile` (and one CPU test's)
    )
    base.update(changes)
    return TrainConfig(**base)


TINY_MEMBER = """\
member: tiny
global_id_offset: 200
fixed: {block_size: 32, n_layer: 2, n_head: 2, n_embd: 32, batch_size: 8}
grid:
  max_iters: [%s, 20]
  dropout: [0.0, 0.1]
overrides: {device: cpu, eval_interval: %s, eval_iters: 2, gradient_accumulation_steps: 1, log_interval: 5,
            warmup_iters: 10, num_samples: 1, max_new_tokens: 20}
"""


@pytest.fixture
def sweeps_dir(tmp_path: Path) -> Path:
    """A sweeps folder holding the tiny member: 2 x 2 grid points that train in seconds."""
    folder = tmp_path / "sweeps"
    folder.mkdir()
    (folder / "tiny.yaml").write_text(TINY_MEMBER % (10, 10))
    return folder


@pytest.fixture
def user_env(store: str, tmp_path: Path) -> dict[str, str]:
    """A user's shell: the tiny member in a sweeps folder, the venv on PATH, no experiment named anywhere, and the
    store made (tests poll it beside the processes they start)."""
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir(exist_ok=True)
    (sweeps / "tiny.yaml").write_text(TINY_MEMBER % (10, 10))
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "NANOSWEEP_SWEEPS_DIR": str(sweeps), "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        env.pop(name, None)
    mlflow.MlflowClient().search_experiments()
    return env


class Recorder:
    """A RunObserver that keeps what the loop reports, in memory."""

    def __init__(self) -> None:
        self.metrics: dict[str, dict[int, float]] = {}
        self.checkpoints: dict[int, dict] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, {})[step] = value

    def log_checkpoint(self, checkpoint: dict) -> None:
        self.checkpoints[checkpoint["iter_num"]] = copy.deepcopy(checkpoint)  # state_dict tensors are live
