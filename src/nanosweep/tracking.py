"""Everything nanosweep writes to MLflow goes through here: connection, experiments, one run's log."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags

from nanosweep.checkpoint import load_checkpoint, save_checkpoint

DEFAULT_EXPERIMENT = "nanosweep"
PARENT_RUN_TAG = "mlflow.parentRunId"
CHECKPOINT = "ckpt.pt"
METRIC_BATCH = 500  # points per log_batch call; MLflow's own limit is 1000

# Tags that place a run in the study; analysis filters on them (`tags.member = 'deep_large'`).
MEMBER_TAG = "member"  # shallow_small, deep_small, ... (a file in sweeps/)
PROFILE_TAG = "profile"  # full (the study's recipe) or quick (CPU-sized); never mixed in analysis
GRID_POSITION_TAG = "grid_position"  # 1-based position in the member's grid, also the seed
GLOBAL_ID_TAG = "global_id"  # the study's id across members (1-128)
REPLICATE_TAG = "replicate"  # 1-based seed replicate of the grid point; runs without it are replicate 1
CONFIG_HASH_TAG = "config_hash"  # TrainConfig.config_hash: equal hashes train the same thing
RUN_KIND_TAG = "run_kind"  # trial, sweep, analysis or imported
HOST_TAG = "nanosweep.host"  # machine of the process training the run
PID_TAG = "nanosweep.pid"  # its process id: a RUNNING run whose process is gone was killed


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or holds something we refuse to touch."""


def connect(tracking_uri: str | None = None) -> str:
    """Use tracking_uri (else MLFLOW_TRACKING_URI, else MLflow's sqlite:///mlflow.db); fail fast if a server is down."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # also exported to the environment, for trial processes
    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=5).close()
        except OSError as exc:
            raise TrackingError(
                f"tracking server {uri} is unreachable ({exc.strerror or exc}): start it or point "
                "--tracking-uri / MLFLOW_TRACKING_URI at a running one"
            ) from None
        try:  # a server with basic auth refuses every request without credentials
            MlflowClient(uri).search_experiments(max_results=1)
        except MlflowException as exc:
            if exc.get_http_status_code() not in (401, 403):
                raise
            raise TrackingError(
                f"tracking server {uri} refused the request (HTTP {exc.get_http_status_code()}): "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
    return uri


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it once (do this in the parent before trials start: SQLite races)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment {name!r} is deleted: restore it in the MLflow UI or choose another name")
    return experiment.experiment_id


def search_runs(experiment_ids: list[str], filter_string: str) -> list[Any]:
    """Every run matching filter_string (MLflow search syntax), across all result pages."""
    client = MlflowClient()
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def run_experiment_id(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.experiment_id


class TrackedRun:
    """One MLflow run seen from a training process: params, batched async metrics, artifacts, end status."""

    def __init__(self, run_id: str):
        self.client = MlflowClient()
        self.run_id = run_id
        self._buffer: list[Metric] = []
        self._pending: list[Any] = []  # async logging operations to wait for
        self._upload: threading.Thread | None = None
        self._upload_error: BaseException | None = None
        self._scratch = tempfile.TemporaryDirectory(prefix="nanosweep-")
        self._last_step: dict[str, int] | None = None  # read on the first metric logged

    def _steps_logged(self) -> dict[str, int]:
        """The last step of each metric already in the run (a resumed run): no step is logged twice."""
        if self._last_step is None:
            metrics = self.info().data.metrics
            self._last_step = {
                key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in metrics
            }
        return self._last_step

    @classmethod
    def create(
        cls, experiment_id: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None
    ) -> TrackedRun:
        # mlflow.user and git commit, as mlflow.start_run adds them (the UI's "Created by" and "Source");
        # the source is nanosweep, not the __main__.py of `python -m nanosweep`
        tags = resolve_tags({"mlflow.source.name": "nanosweep", **tags})
        if parent_run_id:
            tags[PARENT_RUN_TAG] = parent_run_id  # nests the run under its sweep in the UI
        run = MlflowClient().create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(run.info.run_id)

    def info(self) -> Any:
        return self.client.get_run(self.run_id)

    def mark_running(self) -> None:
        """A resumed run is RUNNING again (it was KILLED, or left RUNNING by a killed process)."""
        self.client.update_run(self.run_id, status="RUNNING")

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params not yet on the run (`mlflow run` logs its own first; a resumed run has them)."""
        existing = self.info().data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):  # MLflow accepts 100 params per batch
            self.client.log_batch(self.run_id, params=fresh[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer the points; they go out asynchronously in batches, so logging never stalls training."""
        now = int(time.time() * 1000)
        last_step = self._steps_logged()
        for key, value in metrics.items():
            if step > last_step.get(key, -1):
                self._buffer.append(Metric(key, float(value), now, step))
                last_step[key] = step
        if len(self._buffer) >= METRIC_BATCH:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            batch, self._buffer = self._buffer[:METRIC_BATCH], self._buffer[METRIC_BATCH:]
            self._pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def log_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save ckpt.pt and upload it in the background; at most one upload is in flight."""
        self.flush()
        self.wait_for_upload()
        folder = Path(self._scratch.name) / f"iter{checkpoint['iter_num']}"
        folder.mkdir()
        path = folder / CHECKPOINT
        save_checkpoint(checkpoint, path)

        # metrics up to this iteration reach the store before the checkpoint does: a resume never leaves a gap
        logged_before, self._pending = self._pending, []

        def upload() -> None:
            try:
                for operation in logged_before:
                    operation.wait()
                self.client.log_artifact(self.run_id, str(path))
                self.set_tags({"nanosweep.checkpoint_iter": checkpoint["iter_num"]})
            except BaseException as exc:  # re-raised in the training thread by wait_for_upload
                self._upload_error = exc
            finally:
                path.unlink(missing_ok=True)

        self._upload = threading.Thread(target=upload, name="ckpt-upload", daemon=True)
        self._upload.start()

    def wait_for_upload(self) -> None:
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._upload_error is not None:
            error, self._upload_error = self._upload_error, None
            raise error

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, Any]) -> None:
        dataset = Dataset(name, digest, "http", json.dumps({"url": source}), profile=json.dumps(profile))
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
        try:
            self.client.log_inputs(self.run_id, inputs)
        except MlflowException:
            # MLflow looks the dataset up, then inserts it: two trials starting together on a new experiment
            # can both insert, and the loser hits the unique key. The second attempt finds the winner's row.
            time.sleep(0.5)
            self.client.log_inputs(self.run_id, inputs)

    def download_checkpoint(self) -> dict[str, Any] | None:
        """The run's last ckpt.pt, or None when it has none (or an unreadable one: start over)."""
        names = {a.path for a in self.client.list_artifacts(self.run_id)}
        if CHECKPOINT not in names:
            return None
        local = mlflow.artifacts.download_artifacts(
            run_id=self.run_id, artifact_path=CHECKPOINT, dst_path=self._scratch.name
        )
        try:
            return load_checkpoint(local)
        except Exception:
            return None
        finally:
            os.unlink(local)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of one metric, in step order."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def flush_and_wait(self) -> None:
        """Block until every buffered metric and the last checkpoint are in the store."""
        self.flush()
        while self._pending:
            self._pending.pop(0).wait()
        self.wait_for_upload()

    def finish(self, status: str, reason: str | None = None) -> None:
        """Flush everything, then end the run FINISHED, FAILED or KILLED (with the reason as a tag)."""
        try:
            self.flush_and_wait()
        finally:
            if reason:
                self.set_tags({"nanosweep.end_reason": reason[:5000]})
            self.client.set_terminated(self.run_id, RunStatus.to_string(getattr(RunStatus, status)))
            self._scratch.cleanup()
