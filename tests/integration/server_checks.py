"""Checks shared by the server tests: what a complete, finished trial looks like in the store."""

from __future__ import annotations

import ipaddress
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow import MlflowClient

TINY_MEMBER = """\
member: tiny
global_id_offset: 0
fixed: {block_size: 32, n_layer: 2}
grid:            # expansion order: last key varies fastest
  n_head: [2]
  n_embd: [32]
  batch_size: [4]
  max_iters: %(max_iters)s
  dropout: [0.0, 0.1]
overrides: {eval_interval: %(eval_interval)d, eval_iters: 4, gradient_accumulation_steps: 1, log_interval: 5,
            warmup_iters: 10, num_samples: 1, max_new_tokens: 20}
"""

EVAL_METRICS = ("train_loss", "val_loss")  # at every evaluation, 0 and max_iters included
LOG_METRICS = ("iter_loss", "lr", "tokens_per_sec")  # every log_interval, before max_iters
FINAL_METRICS = ("loss_gap", "best_val_loss")  # once, at max_iters


def skip_or_fail(reason: str) -> None:
    """Skip, unless this run must exercise the server (CI sets NANOSWEEP_REQUIRE_SERVER=1): then fail."""
    if os.environ.get("NANOSWEEP_REQUIRE_SERVER") == "1":
        pytest.fail(f"{reason}, and NANOSWEEP_REQUIRE_SERVER=1 forbids skipping")
    pytest.skip(reason)


def write_member(folder: Path, max_iters: list[int], eval_interval: int) -> Path:
    """The tiny member (two dropouts x the given max_iters) as folder/tiny.yaml, for --sweeps-dir."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.yaml").write_text(TINY_MEMBER % {"max_iters": max_iters, "eval_interval": eval_interval})
    return folder


def expected_steps(params: dict[str, str]) -> dict[str, list[int]]:
    """Every (metric, step) a trial with these params logs, each exactly once."""
    max_iters, eval_interval = int(params["max_iters"]), int(params["eval_interval"])
    evals = sorted(set(range(0, max_iters, eval_interval)) | {max_iters})
    logs = list(range(0, max_iters, int(params["log_interval"])))
    return {
        **{key: evals for key in EVAL_METRICS},
        **{key: logs for key in LOG_METRICS},
        **{key: [max_iters] for key in FINAL_METRICS},
    }


def missing_or_doubled(client: MlflowClient, run: Any) -> dict[str, tuple[list[int], list[int]]]:
    """{metric: (expected steps, logged steps)} for every metric whose history is not exactly as expected."""
    wrong = {}
    for key, steps in expected_steps(run.data.params).items():
        logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        if logged != steps:
            wrong[key] = (steps, logged)
    return wrong


def not_finished(runs: list[Any]) -> dict[str, str]:
    return {r.info.run_name: r.info.status for r in runs if r.info.status != "FINISHED"}


def running(client: MlflowClient, experiment_id: str) -> list[str]:
    runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    return [r.info.run_name for r in runs]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, process: Any = None) -> Any:
    """Poll condition until it returns something truthy; fail after timeout, or when process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended before {what}:\n{process.stdout.read()}")
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def sigterm_when_all_have_a_checkpoint(driver: Any, trial_runs: Callable[[], list[Any]], count: int) -> str:
    """Wait until `count` trial runs have a checkpoint, send the driver SIGTERM and let it end: its output."""

    def all_with_a_checkpoint() -> bool:
        return sum("nanosweep.checkpoint_iter" in r.data.tags for r in trial_runs()) == count

    try:
        wait_until(all_with_a_checkpoint, 300, f"{count} trials with a checkpoint", driver)
        driver.send_signal(signal.SIGTERM)
        output, _ = driver.communicate(timeout=300)
    finally:
        driver.kill()
    return output


def sweep_command(sweeps_dir: Path, experiment: str) -> list[str]:
    return ["sweep", "--member", "tiny", "--sweeps-dir", str(sweeps_dir), "--workers", "2", "--experiment", experiment]


def unique_experiment(prefix: str) -> str:
    """The server outlives a test session: every session works in experiments of its own."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def sweep_runs(client: MlflowClient, experiment_id: str) -> tuple[list[Any], list[Any]]:
    """(parents, children in grid order) of an experiment."""
    runs = client.search_runs([experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("run_kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    return parents, sorted(children, key=lambda r: int(r.data.tags["grid_position"]))


class OffLoopbackWatch:
    """Samples the machine's TCP connections while a test runs; collects every remote address off loopback."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for conn in psutil.net_connections(kind="inet"):
                if conn.raddr and not ipaddress.ip_address(conn.raddr.ip.removeprefix("::ffff:")).is_loopback:
                    self.seen.add(f"{conn.raddr.ip}:{conn.raddr.port} ({conn.status})")

    def __enter__(self) -> OffLoopbackWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
