"""The two parts of a TrackedRun that work in the background: its MetricBuffer and its CheckpointUploader."""

import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from nanosweep.checkpoint import load_checkpoint
from nanosweep.tracking.run import FLUSH_SECONDS, METRIC_BATCH, CheckpointUploader, MetricBuffer, TrackedRun
from nanosweep.tracking.store import ensure_experiment


@pytest.fixture
def run_id(store: str) -> str:
    """A fresh RUNNING run in the test's store."""
    return MlflowClient().create_run(ensure_experiment("parts")).info.run_id


def points(steps: range) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric("iter_loss", 1.0 / (step + 1), now, step) for step in steps]


def history(run_id: str) -> list[tuple[int, float]]:
    """(step, value) of iter_loss, in the order the store received them."""
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, "iter_loss")]


CHECKPOINT = {"iter_num": 10, "model": {"w": torch.arange(4.0)}}


def checkpoint_path(tmp_path: Path) -> Path:
    """Where a run's checkpoint of iteration 10 is saved on its way to the store."""
    path = tmp_path / "iter10" / "ckpt.pt"
    path.parent.mkdir()
    return path


def test_points_added_to_a_buffer_reach_the_store_within_a_flush_interval_in_order(run_id):
    buffer = MetricBuffer(MlflowClient(), run_id)
    added = time.monotonic()
    buffer.add(points(range(3)))
    buffer.add(points(range(3, 10)))
    assert history(run_id) == []  # buffered, not sent point by point
    while not history(run_id):
        assert time.monotonic() - added < FLUSH_SECONDS + 3, "nothing reached the store after a flush interval"
        time.sleep(0.1)
    assert history(run_id) == [(step, 1.0 / (step + 1)) for step in range(10)]  # one batch: all of it at once


def test_more_points_than_a_batch_go_out_at_once_in_several_batches_and_all_arrive(run_id):
    buffer = MetricBuffer(MlflowClient(), run_id)
    buffer.add(points(range(2 * METRIC_BATCH + 1)))
    operations = buffer.take_pending()  # handed to MLflow already: a full buffer does not wait for the timer
    assert len(operations) == 3
    for operation in operations:
        operation.wait()
    assert history(run_id) == [(step, 1.0 / (step + 1)) for step in range(2 * METRIC_BATCH + 1)]


def test_flush_and_wait_raises_what_the_store_refused_once(run_id):
    run = TrackedRun(run_id)
    run.log_metrics({"iter_loss": 2.0}, step=0)
    MlflowClient().delete_run(run_id)  # a deleted run takes no more metrics
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        run.flush_and_wait()
    run.flush_and_wait()  # reported: nothing left to raise


def test_a_timer_flush_that_fails_is_kept_and_raised_once_in_the_training_thread(run_id):
    buffer = MetricBuffer(MlflowClient(), run_id)
    buffer.add([Metric("iter_loss", [1.0], 0, 0)])  # MLflow's client turns values to floats before queueing them
    time.sleep(FLUSH_SECONDS + 1)  # the timer has flushed, and failed, on its own thread
    with pytest.raises(TypeError):
        buffer.raise_timer_error()
    buffer.raise_timer_error()  # reported: nothing left to raise


def test_a_checkpoint_is_saved_and_arrives_as_the_runs_tagged_with_its_iteration_and_its_local_file_goes(
    run_id, tmp_path
):
    path = checkpoint_path(tmp_path)
    uploader = CheckpointUploader(MlflowClient(), run_id)
    uploader.start(CHECKPOINT, path, after=[])
    uploader.wait()
    back = tmp_path / "back"
    back.mkdir()
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="ckpt.pt", dst_path=str(back))
    assert torch.equal(load_checkpoint(local)["model"]["w"], CHECKPOINT["model"]["w"])
    assert MlflowClient().get_run(run_id).data.tags["nanosweep.checkpoint_iter"] == "10"
    assert not path.exists()


def test_an_upload_waits_for_the_metrics_before_it_and_fails_when_they_fail_storing_no_checkpoint(run_id, tmp_path):
    buffer = MetricBuffer(MlflowClient(), run_id)
    MlflowClient().delete_run(run_id)  # its metrics are refused; an artifact would still be written
    buffer.add(points(range(3)))
    buffer.flush()
    uploader = CheckpointUploader(MlflowClient(), run_id)
    uploader.start(CHECKPOINT, checkpoint_path(tmp_path), after=buffer.take_pending())
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        uploader.wait()
    assert MlflowClient().list_artifacts(run_id) == []  # a resume never finds a checkpoint newer than its metrics


def test_an_upload_that_fails_is_raised_once_at_wait_and_its_local_file_goes(run_id, tmp_path):
    artifacts = Path(urlparse(MlflowClient().get_run(run_id).info.artifact_uri).path)
    artifacts.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_text("a file where the artifact folder should be")  # the upload's destination is unusable
    path = checkpoint_path(tmp_path)
    uploader = CheckpointUploader(MlflowClient(), run_id)
    uploader.start(CHECKPOINT, path, after=[])
    with pytest.raises(OSError):
        uploader.wait()
    uploader.wait()  # reported: nothing left to raise
    assert "nanosweep.checkpoint_iter" not in MlflowClient().get_run(run_id).data.tags
    assert not path.exists()


def test_a_checkpoint_that_cannot_be_saved_is_raised_at_wait_and_nothing_is_uploaded(run_id, tmp_path):
    uploader = CheckpointUploader(MlflowClient(), run_id)
    uploader.start(CHECKPOINT, tmp_path / "no-such-folder" / "ckpt.pt", after=[])  # torch.save cannot write there
    with pytest.raises(RuntimeError, match="no-such-folder"):
        uploader.wait()
    assert MlflowClient().list_artifacts(run_id) == []
