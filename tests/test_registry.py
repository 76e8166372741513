"""register: the best run as a registered pyfunc text generator, served by `mlflow models serve` over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import tiny_config
from nanosweep.cli.main import main
from nanosweep.models.download import load_run_model
from nanosweep.sampling import SampleSettings, generate_texts
from nanosweep.tracking.store import ensure_experiment
from study_fakes import log_known_run, train_study_run

SERVE_TIMEOUT = 45  # seconds for the scoring server to answer /ping


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_for(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT
    while time.monotonic() < deadline:
        assert server.poll() is None, f"mlflow models serve exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url} after {SERVE_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def test_register_serves_the_best_run_as_a_text_generator(store, tmp_path):
    experiment_id = ensure_experiment("nanosweep")
    best = train_study_run("nanosweep", experiment_id, "m1", 2)
    log_known_run(experiment_id, "m1", 1, 1, tiny_config(seed=1), {20: (9.0, 9.5)})  # worse, and has no checkpoint

    result = CliRunner().invoke(main, ["register", "--member", "m1"])
    assert result.exit_code == 0, result.output
    assert f"registered models:/nanosweep-m1/1 from {tiny_config(seed=2).run_name}" in result.output
    version = MlflowClient().get_model_version("nanosweep-m1", "1")
    assert version.run_id == best

    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # uvicorn
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/nanosweep-m1/1"]
    with log.open("w") as sink:
        server = subprocess.Popen(
            [*command, "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: the server and its workers end together
        )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, log)
        answer = post(f"http://127.0.0.1:{port}/invocations", {"inputs": ["ROMEO:"], "params": {"max_new_tokens": 100}})
        two = post(
            f"http://127.0.0.1:{port}/invocations",
            {"inputs": ["ROMEO:", "JULIET:"], "params": {"max_new_tokens": 5, "top_k": 3, "temperature": 1.5}},
        )
        default = post(f"http://127.0.0.1:{port}/invocations", {"inputs": ["JULIET:"]})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    [text] = answer["predictions"]
    model, vocab = load_run_model(best)
    settings = SampleSettings(prompt="ROMEO:", num_samples=1, max_new_tokens=100)
    assert text == generate_texts(model, vocab, settings)[0]  # nanoGPT's sampler, seed 1337: the same text
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 100
    # one generated string per prompt, sampling settings from the request, nanoGPT's defaults otherwise
    assert [(t[:-5], len(t)) for t in two["predictions"]] == [("ROMEO:", 11), ("JULIET:", 12)]
    assert [len(t) for t in default["predictions"]] == [len("JULIET:") + 500]

    result = CliRunner().invoke(main, ["register", "--member", "nobody"])
    assert result.exit_code == 1 and "member='nobody' has no finished quick runs" in result.output
