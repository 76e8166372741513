"""One MLflow run seen from a training process: TrackedRun, over a MetricBuffer (batched async metrics) and a
CheckpointUploader (checkpoints uploaded off the training thread).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags

from nanosweep.checkpoint import load_checkpoint, mismatch, save_checkpoint
from nanosweep.filelocks import OwnedFolder
from nanosweep.signals import stop_signals
from nanosweep.tracking.heartbeat import heartbeat_now
from nanosweep.tracking.names import (
    CHECKPOINT,
    CHECKPOINT_ITER_TAG,
    CHECKPOINT_KEYS,
    END_REASON_TAG,
    PARENT_RUN_TAG,
    PRIMARY_METRIC,
)
from nanosweep.tracking.open_runs import open_runs
from nanosweep.tracking.store import TrackingError

if TYPE_CHECKING:
    from nanosweep.config import TrainConfig
    from nanosweep.model import GPT


METRIC_BATCH = 500  # points per log_batch call; MLflow's own limit is 1000
FLUSH_SECONDS = 2.0  # a buffered metric reaches the store this soon at the latest: the UI charts runs live
# MLflow's set_terminated shuts down the process-wide queue of asynchronous logging; a sibling run of a fused
# group logging asynchronously at that moment fails ("cannot schedule new futures after shutdown"). Both hold this.
_ASYNC_LOGGING = threading.Lock()


class CheckpointUnreadable(TrackingError):
    """A cut-off run's ckpt.pt cannot be loaded: its training cannot continue in that run."""


class MetricBuffer:
    """A run's metric points on their way to the store: buffered, then handed to MLflow's asynchronous queue in
    batches of METRIC_BATCH, FLUSH_SECONDS after they came at the latest, so logging never stalls training."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        self._buffer: list[Metric] = []
        self._pending: list[Any] = []  # async logging operations to wait for
        self._lock = threading.Lock()  # the buffer is flushed by the training thread and by a timer
        self._timer: threading.Timer | None = None  # flushes what add buffered FLUSH_SECONDS ago
        self._flush_error: BaseException | None = None  # a timer flush that failed, re-raised by raise_timer_error

    def add(self, points: list[Metric]) -> None:
        """Buffer the points, in order; a full batch goes out at once, the rest within FLUSH_SECONDS."""
        with self._lock:
            self._buffer.extend(points)
            full = len(self._buffer) >= METRIC_BATCH
            if not full and self._buffer and self._timer is None:
                self._timer = threading.Timer(FLUSH_SECONDS, self._flush_on_timer)
                self._timer.daemon = True
                self._timer.start()
        if full:
            self.flush()

    def _flush_on_timer(self) -> None:
        try:
            self.flush()
        except BaseException as exc:  # re-raised in the training thread by raise_timer_error
            self._flush_error = exc

    def flush(self) -> None:
        """Hand every buffered point to MLflow's asynchronous queue, in batches."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            while self._buffer:
                batch, self._buffer = self._buffer[:METRIC_BATCH], self._buffer[METRIC_BATCH:]
                with _ASYNC_LOGGING:
                    self._pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def take_pending(self) -> list[Any]:
        """The asynchronous operations handed out and not yet waited for; from now on the caller waits for them."""
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def wait(self) -> None:
        """Flush, then block until every point handed out is in the store (raising what the store refused)."""
        self.flush()
        while self._pending:
            try:
                self._pending[0].wait()
            except Exception:  # what the store refused is raised once; a stop signal leaves the batch to wait for
                self._pending.pop(0)
                raise
            self._pending.pop(0)

    def raise_timer_error(self) -> None:
        """Raise the error of a timer flush that failed, once: that thread cannot tell the training thread."""
        if self._flush_error is not None:
            error, self._flush_error = self._flush_error, None
            raise error


class CheckpointUploader:
    """Saves and uploads a run's checkpoints on a background thread, so training goes on meanwhile (a checkpoint
    holds CPU copies, which training does not touch again); wait raises what failed."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        # set when the upload in flight is over, so its end is waited for on an Event and not by Thread.join:
        # Python 3.11's join, cut by a stop signal's exception, marks a thread still running as stopped
        self._done = threading.Event()
        self._done.set()
        self._error: BaseException | None = None

    def start(self, checkpoint: dict[str, Any], path: Path, after: list[Any]) -> None:
        """Save checkpoint to path and upload it as the run's once the async operations `after` are done, then
        delete the file. One upload at a time: the caller waits for the last one first."""

        def upload() -> None:
            try:
                save_checkpoint(checkpoint, path)
                for operation in after:
                    operation.wait()
                self.client.log_artifact(self.run_id, str(path))
                self.client.log_batch(self.run_id, tags=[RunTag(CHECKPOINT_ITER_TAG, str(checkpoint["iter_num"]))])
            except BaseException as exc:  # re-raised in the training thread by wait
                self._error = exc
            finally:
                path.unlink(missing_ok=True)
                self._done.set()

        with stop_signals.deferred():  # the upload starts with its Event cleared, or not at all: never a wait forever
            self._done.clear()
            threading.Thread(target=upload, name="ckpt-upload", daemon=True).start()

    def wait(self) -> None:
        """Block until the upload in flight is done; raise its error, once."""
        self._done.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class TrackedRun:
    """One MLflow run seen from a training process: params, batched async metrics, artifacts, end status."""

    def __init__(self, run_id: str):
        self.client = MlflowClient()
        self.run_id = run_id
        self._metrics = MetricBuffer(self.client, run_id)
        self._uploads = CheckpointUploader(self.client, run_id)
        self._scratch: OwnedFolder | None = None  # made when a checkpoint passes through, removed at the end
        self._last_step: dict[str, int] | None = None  # read on the first metric logged
        self.ended = False  # finish() has set the run's final status

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
        tags = resolve_tags({"mlflow.source.name": "nanosweep", **tags, **heartbeat_now()})  # alive from birth
        if parent_run_id:
            tags[PARENT_RUN_TAG] = parent_run_id  # nests the run under its sweep in the UI
        with stop_signals.deferred():  # created and ended by this process if it stops: one step, never half
            run = cls(MlflowClient().create_run(experiment_id, run_name=run_name, tags=tags).info.run_id)
            open_runs.add(run)
        return run

    def info(self) -> Any:
        return self.client.get_run(self.run_id)

    def next_step(self, prefix: str) -> int:
        """One past the last step of the run's metrics named prefix...: where a resumed run's series of them goes on."""
        return max((step for key, step in self._steps_logged().items() if key.startswith(prefix)), default=-1) + 1

    @property
    def scratch(self) -> Path:
        """This process's folder for the run's checkpoints on their way to and from the store."""
        if self._scratch is None:
            self._scratch = OwnedFolder("nanosweep-run-")
        return self._scratch.path

    def take_over(self) -> None:
        """This process continues the run (it was KILLED, or left RUNNING by a killed process): RUNNING again, the
        end reason of its last process gone, and ended by this process if it stops."""
        if END_REASON_TAG in self.info().data.tags:
            self.client.delete_tag(self.run_id, END_REASON_TAG)
        with stop_signals.deferred():
            self.client.update_run(self.run_id, status="RUNNING")
            open_runs.add(self)

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
        points = [
            Metric(key, float(metrics[key]), now, step)
            for key in sorted(metrics, key=lambda k: k != PRIMARY_METRIC)
            if step > last_step.get(key, -1)
        ]
        self._metrics.add(points)
        last_step.update((point.key, step) for point in points)

    def flush(self) -> None:
        """Hand every buffered point to MLflow's asynchronous queue, in batches."""
        self._metrics.flush()

    def log_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save ckpt.pt and upload it in the background; at most one upload is in flight."""
        self.flush()
        self.wait_for_upload()
        folder = self.scratch / f"iter{checkpoint['iter_num']}"
        folder.mkdir()
        # metrics up to this iteration reach the store before the checkpoint does: a resume never leaves a gap
        self._uploads.start(checkpoint, folder / CHECKPOINT, after=self._metrics.take_pending())

    def wait_for_upload(self) -> None:
        self._uploads.wait()

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

    def download_checkpoint(self, cfg: TrainConfig, model: GPT) -> dict[str, Any] | None:
        """The run's last ckpt.pt, or None when it has none. One that cannot be read, or that is not the checkpoint
        of cfg's training (built as model: checkpoint.mismatch), is refused, never skipped."""
        names = {a.path for a in self.client.list_artifacts(self.run_id)}
        if CHECKPOINT not in names:
            return None
        local = mlflow.artifacts.download_artifacts(
            run_id=self.run_id, artifact_path=CHECKPOINT, dst_path=str(self.scratch)
        )
        try:
            checkpoint = load_checkpoint(local)
            missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}")
            foreign = mismatch(checkpoint, cfg, model)
        except Exception as exc:
            problem = f"cannot be read ({(str(exc).splitlines() or [type(exc).__name__])[0][:300]})"
        else:
            problem = f"is another training's ({foreign})" if foreign else ""
        finally:
            os.unlink(local)
        if problem:  # starting over inside this run would mix two trainings in one metric history
            raise CheckpointUnreadable(
                f"{CHECKPOINT} of run {self.run_id} {problem}: its training cannot continue in this run"
            )
        return checkpoint

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of one metric, in step order."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def flush_and_wait(self) -> None:
        """Block until every buffered metric and the last checkpoint are in the store."""
        self._metrics.wait()
        self.wait_for_upload()
        self._metrics.raise_timer_error()  # last: the upload in flight is waited for first

    def finish(self, status: str, reason: str | None = None) -> None:
        """Flush everything, then end the run FINISHED, FAILED or KILLED (with the reason as a tag).

        When the flush or the last upload fails, the run ends FAILED with that reason (never FINISHED with
        metrics or a checkpoint missing) and the error is raised. A stop signal waits until the run has ended; one
        that came before (still waiting to be raised) ends it KILLED, as the command was stopped before it ended.
        """
        with stop_signals.deferred():
            if status == "FINISHED" and stop_signals.stopping:
                status, reason = "KILLED", f"interrupted by {stop_signals.stopping}"
            try:
                self.flush_and_wait()
            except BaseException as exc:
                status = "FAILED"
                reason = f"final metric flush or upload failed: {type(exc).__name__}: {exc}" + (
                    f" (after: {reason})" if reason else ""
                )
                raise
            finally:
                if reason:
                    self.set_tags({END_REASON_TAG: reason[:5000]})
                with _ASYNC_LOGGING:  # it shuts down the async queue that sibling runs log through
                    self.client.set_terminated(self.run_id, RunStatus.to_string(getattr(RunStatus, status)))
                self.ended = True
                open_runs.discard(self.run_id)
                if self._scratch is not None:
                    self._scratch.remove()
