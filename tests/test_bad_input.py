"""Bad input: one line naming the value and what is allowed, a non-zero exit, and no MLflow run."""

import socket
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from nanosweep.cli import main

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--max-iters", "5", "--eval-iters", "2"]


def no_runs_created() -> bool:
    client = MlflowClient()
    return all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--n-embd", "30", "--n-head", "4"],
            "n_embd=30 is not divisible by n_head=4: each head gets n_embd/n_head channels",
        ),
        (["--dropout", "1.0"], "dropout=1.0 is not allowed: it must be in [0, 1)"),
        (["--dropout", "-0.1"], "dropout=-0.1 is not allowed: it must be in [0, 1)"),
        (["--n-layer", "0"], "n_layer=0 is not allowed: it must be a positive integer"),
        (["--batch-size", "-8"], "batch_size=-8 is not allowed: it must be a positive integer"),
        (["--block-size", "200000"], "block_size=200000 is longer than the validation split: it must be below 111540"),
        (["--device", "tpu"], "device='tpu' is not allowed: use auto, cpu, cuda, cuda:N or mps"),
        (["--dtype", "int8"], "dtype='int8' is not allowed: use one of auto, float32, bfloat16, float16"),
    ],
)
def test_config_errors_are_one_line_non_zero_and_create_no_run(store, args, message):
    result = CliRunner().invoke(main, ["train", *TINY, *args])
    assert result.exit_code == 1
    assert result.output == f"Error: {message}\n"
    assert no_runs_created()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused(store):
    result = CliRunner().invoke(main, ["train", *TINY, "--device", "cuda"])
    assert result.exit_code == 1
    assert result.output == "Error: device='cuda' is not available on this machine: use auto or cpu\n"
    assert no_runs_created()


def test_a_file_that_is_not_tiny_shakespeare_is_refused(store, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSWEEP_DATA_DIR", str(tmp_path / "fresh"))  # nothing prepared there yet
    impostor = tmp_path / "input.txt"
    impostor.write_text("To be, or not to be\n" * 100)
    result = CliRunner().invoke(main, ["train", *TINY, "--input", str(impostor)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert f"input '{impostor}' has sha256 " in result.output and "not tiny Shakespeare's 86c4e6aa9db7" in result.output
    assert not (tmp_path / "fresh" / "shakespeare_char").exists()


def test_a_missing_input_file_is_named(store, tmp_path):
    result = CliRunner().invoke(main, ["prepare", "--input", str(tmp_path / "nope.txt")])
    assert result.exit_code == 1
    missing = tmp_path / "nope.txt"
    assert result.output == f"Error: input '{missing}' does not exist: pass the tiny Shakespeare input.txt\n"


def test_an_unreachable_tracking_server_fails_fast_naming_the_uri(store):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    result = CliRunner().invoke(main, ["train", *TINY, "--tracking-uri", uri])
    assert time.monotonic() - started < 20  # not MLflow's minutes of HTTP retries
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: tracking server {uri} is unreachable (")
    assert result.output.count("\n") == 1


def test_an_unknown_executor_is_refused(store, sweeps_dir):
    argv = ["sweep", "--member", "tiny", "--sweeps-dir", str(sweeps_dir), "--executor", "k8s"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 1
    assert result.output == "Error: executor='k8s' is not allowed: choose one of local, ray\n"
    assert no_runs_created()


def test_the_ray_executor_without_ray_installed_says_how_to_install_it(store, sweeps_dir):
    hide_ray = "import sys; sys.modules['ray'] = None; from nanosweep.cli import main; main()"  # as if not installed
    argv = [sys.executable, "-c", hide_ray, "sweep", "--member", "tiny", "--sweeps-dir", str(sweeps_dir)]
    result = subprocess.run([*argv, "--executor", "ray"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: executor='ray' needs Ray, which is not installed: pip install 'nanosweep[ray]'"
    )
    assert no_runs_created()
