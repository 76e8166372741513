"""A training run as MLflow holds it: params, metric steps, artifacts, inputs, and how it ends."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import tiny_config
from helpers import REPO
from nanosweep.checkpoint import load_checkpoint
from nanosweep.cli.main import main
from nanosweep.config import TrainConfig
from nanosweep.data import SHA256
from nanosweep.signals import Interrupted, stop_signals
from nanosweep.tracking.names import CHECKPOINT, CHECKPOINT_ITER_TAG
from nanosweep.tracking.recorder import run_trial, trial_spec
from nanosweep.tracking.run import TrackedRun
from nanosweep.tracking.store import ensure_experiment


def cli_args(cfg: TrainConfig) -> list[str]:
    return [arg for key, value in cfg.to_dict().items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_train_command_logs_params_metric_history_artifacts_and_dataset(store):
    cfg = tiny_config()
    result = CliRunner().invoke(main, ["train", *cli_args(cfg)])
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("nanosweep").experiment_id])
    name = "b32_L2_H2_E32_BS4_MI20_D10_s1"
    assert run.info.run_name == name and run.info.status == "FINISHED"

    params = run.data.params
    assert {k: params[k] for k in cfg.to_dict()} == {k: str(v) for k, v in cfg.to_dict().items()}
    assert params["total_params"] == str(12 * 2 * 32**2 + 5 * 32 + 65 * 32)
    assert params["tokens_per_iter"] == str(2 * 4 * 32)
    assert (params["train_device"], params["train_dtype"], params["train_compiled"]) == ("cpu", "float32", "False")

    def steps(key):
        return [m.step for m in client.get_metric_history(run.info.run_id, key)]

    assert sorted(steps("val_loss")) == sorted(steps("train_loss")) == [0, 10, 20]
    assert sorted(steps("iter_loss")) == sorted(steps("lr")) == sorted(steps("tokens_per_sec")) == [0, 5, 10, 15]
    final = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
    train_final = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert run.data.metrics["loss_gap"] == final[20] - train_final[20]
    assert run.data.metrics["best_val_loss"] == min(final.values())

    assert artifact_paths(client, run.info.run_id) == {
        "ckpt.pt",
        "vocab.json",
        f"{name}.py",
        f"samples/{name}.txt",
        "loss_curve.png",
    }
    ckpt = load_checkpoint(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="ckpt.pt"))
    assert ckpt["iter_num"] == 20 and ckpt["model_args"]["n_layer"] == 2
    config_text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{name}.py")
    assert "n_layer = 2" in config_text and "dataset = 'shakespeare_char'" in config_text
    samples = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/samples/{name}.txt")
    assert samples.count("---------------") == 2

    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "tinyshakespeare" and dataset_input.dataset.digest == SHA256[:16]


def test_sigterm_ends_the_run_killed_with_its_reason_and_checkpoint(store):
    cfg = tiny_config(max_iters=100000, eval_interval=5)
    proc = subprocess.Popen([sys.executable, "-m", "nanosweep", "train", *cli_args(cfg)], stderr=subprocess.PIPE)
    client = MlflowClient()
    deadline = time.monotonic() + 60
    run = None
    while time.monotonic() < deadline:  # wait until the first checkpoint is in the store
        if os.path.exists("mlflow.db"):
            experiment = client.get_experiment_by_name("nanosweep")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and "nanosweep.checkpoint_iter" in runs[0].data.tags:
                run = runs[0]
                break
        time.sleep(0.5)
    assert run is not None, "no checkpoint within 60 s"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert b"run ended KILLED" in stderr
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["nanosweep.end_reason"] == "interrupted by SIGTERM"
    assert "ckpt.pt" in artifact_paths(client, run.info.run_id)


def test_a_checkpoint_that_is_not_the_runs_fails_that_run_alone_and_its_fused_siblings_finish(store, tmp_path):
    experiment_id = ensure_experiment("nanosweep")
    group = [tiny_config(max_iters=10, eval_interval=5, seed=seed) for seed in (1, 2, 3, 4)]  # one fusion key
    others = {  # loadable checkpoints of other trainings, for the first three runs
        0: (tiny_config(n_embd=16, max_iters=5, eval_interval=5), "model_args {"),  # another shape
        1: (tiny_config(max_iters=20, eval_interval=20, seed=2), "iter_num=20, outside the run's 0..max_iters=10"),
        2: (tiny_config(max_iters=10, eval_interval=5, seed=3, learning_rate=1e-3), "trained with config hash"),
    }
    runs = [TrackedRun.create(experiment_id, cfg.run_name, {}) for cfg in group]
    for index, (cfg, _) in others.items():
        donor = run_trial(cfg, "others")
        local = mlflow.artifacts.download_artifacts(run_id=donor, artifact_path="ckpt.pt", dst_path=str(tmp_path))
        runs[index].log_file(Path(local))
    argv = [sys.executable, "-m", "nanosweep", "train-group"]
    for cfg, run in zip(group, runs):
        argv += ["--trial", trial_spec(cfg, run.run_id)]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    client = MlflowClient()
    sibling = client.get_run(runs[3].run_id)
    assert sibling.info.status == "FINISHED", sibling.data.tags.get("nanosweep.end_reason")
    assert sorted(m.step for m in client.get_metric_history(runs[3].run_id, "val_loss")) == [0, 5, 10]
    for index, (_, why) in others.items():
        refused = client.get_run(runs[index].run_id)
        reason = refused.data.tags["nanosweep.end_reason"]
        assert refused.info.status == "FAILED", reason
        assert reason.startswith(f"CheckpointUnreadable: ckpt.pt of run {runs[index].run_id} is another training's (")
        assert why in reason and reason.endswith("): its training cannot continue in this run")
        assert "val_loss" not in refused.data.metrics  # nothing trained into it


def test_a_finished_run_is_never_trained_again(store):
    run_id = run_trial(tiny_config(max_iters=10), "nanosweep")
    result = CliRunner().invoke(main, ["train", *cli_args(tiny_config(max_iters=10)), "--run-id", run_id])
    assert result.exit_code == 1
    expected = f"Error: run {run_id} is FINISHED: a finished run is never trained again; start a new run"
    assert result.output.strip() == expected
    assert len(MlflowClient().get_metric_history(run_id, "val_loss")) == 2


def test_mlproject_train_parameters_mirror_train_config():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    params = project["entry_points"]["train"]["parameters"]
    defaults = TrainConfig().to_dict()
    assert list(params) == list(defaults)
    # `mlflow run` logs these strings as params first: they must equal what nanosweep would log
    assert {k: str(v["default"]) for k, v in params.items()} == {k: str(v) for k, v in defaults.items()}
    command = project["entry_points"]["train"]["command"]
    assert all(f"--{k.replace('_', '-')} {{{k}}}" in command for k in defaults)


def test_mlflow_run_train_entry_point_trains_into_the_run_it_created(store):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    overrides = {
        "block_size": 32,
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "batch_size": 4,
        "max_iters": 10,
        "eval_interval": 5,
        "eval_iters": 2,
        "gradient_accumulation_steps": 1,
        "num_samples": 1,
        "max_new_tokens": 20,
    }
    args = [a for k, v in overrides.items() for a in ("-P", f"{k}={v}")]
    subprocess.run(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "run",
            str(REPO),
            "-e",
            "train",
            "--env-manager",
            "local",
            "--experiment-name",
            "projects",
            *args,
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("projects").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "b32_L2_H2_E32_BS4_MI10_D10_s1"
    assert run.data.params["learning_rate"] == "0.0003" and run.data.params["total_params"] == "26816"
    assert "ckpt.pt" in artifact_paths(client, run.info.run_id)


def _log_dataset_at_once(uri: str, experiment_id: str, barrier, results) -> None:
    try:
        mlflow.set_tracking_uri(uri)
        run = TrackedRun.create(experiment_id, "racer", {})
        barrier.wait(
            timeout=120
        )  # every trial logs the dataset at the same moment, as sweep workers starting together do
        run.log_dataset("tinyshakespeare", SHA256[:16], "https://example.org/input.txt", {})
        results.put("ok")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_trials_starting_together_on_a_new_experiment_all_log_the_dataset(store):
    # MLflow looks a dataset up, then inserts it: simultaneous first inserts collide on its unique key
    experiment_id = ensure_experiment("race")
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    racers = [
        context.Process(target=_log_dataset_at_once, args=(store, experiment_id, barrier, results)) for _ in range(4)
    ]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=300) for _ in racers]
    for racer in racers:
        racer.join(timeout=30)
        if racer.is_alive():
            racer.terminate()
    assert outcomes == ["ok"] * 4


def test_a_run_ending_while_a_sibling_logs_asynchronously_does_not_break_the_sibling(store):
    """In a fused group one run ends (MLflow's set_terminated shuts the process's async logging queue down) while
    its siblings go on logging through that queue: none of their points may fail or be lost."""
    experiment_id = ensure_experiment("race")
    sibling = TrackedRun.create(experiment_id, "sibling", {})
    errors: list[BaseException] = []

    def log_steadily() -> None:
        try:
            for step in range(300):
                sibling.log_metrics({"iter_loss": 1.0 / (step + 1)}, step)
                sibling.flush()  # one async batch per step, as often as the race needs
        except BaseException as exc:
            errors.append(exc)

    logger = threading.Thread(target=log_steadily)
    logger.start()
    while logger.is_alive():
        TrackedRun.create(experiment_id, "short", {}).finish("FINISHED")
    logger.join()
    assert errors == []
    sibling.finish("FINISHED")
    assert [step for step, _ in sibling.metric_history("iter_loss")] == list(range(300))


def test_a_stop_signal_in_the_wait_for_a_checkpoint_upload_still_leaves_the_upload_to_be_waited_for(store):
    """A run ends only once its last checkpoint is in the store. Python 3.11's Thread.join, cut by the exception
    a stop signal raises, takes a thread still running for stopped; the end after it must wait all the same."""
    run = TrackedRun.create(ensure_experiment("nanosweep"), "upload", {})
    metrics_in = threading.Event()

    class MetricsOnTheirWay:  # the metric batches a checkpoint upload waits for, let through by the test
        def wait(self) -> None:
            metrics_in.wait()

    with stop_signals.installed():
        run._uploads.start({"iter_num": 5}, run.scratch / CHECKPOINT, after=[MetricsOnTheirWay()])
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(Interrupted):
            run.wait_for_upload()
    threading.Timer(0.5, metrics_in.set).start()
    run.finish("KILLED", "interrupted by SIGTERM")
    assert metrics_in.is_set()  # the end waited for the upload
    assert run.info().data.tags[CHECKPOINT_ITER_TAG] == "5"
    assert CHECKPOINT in {a.path for a in MlflowClient().list_artifacts(run.run_id)}
