"""One driver per point: drivers started together into one SQLite store train every grid point (and every search
configuration) once. The claim under it is checked at a barrier of real processes (tests/integration does both
through the PostgreSQL-backed server)."""

import multiprocessing
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import heartbeat_stopped
from nanosweep.grid import expand, load_members
from nanosweep.tracking import HEARTBEAT_ENV, Claims, ensure_experiment
from test_search import PATIENCE, write_space
from test_sweep import wait_for

TWO_POINTS = """\
member: tiny
global_id_offset: 200
fixed: {block_size: 32, n_layer: 2, n_head: 2, n_embd: 32, batch_size: 8, max_iters: 5}
grid:
  dropout: [0.0, 0.1]
overrides: {device: cpu, eval_interval: 5, eval_iters: 1, gradient_accumulation_steps: 1, log_interval: 5,
            warmup_iters: 2, num_samples: 1, max_new_tokens: 10}
"""
ROUNDS = 5


def _take_at_barrier(uri: str, experiment_id: str, driver: str, barrier, results) -> None:
    """One racer: every round, read the claims, wait for the others, take claim 1 of that round's point."""
    mlflow.set_tracking_uri(uri)
    for round in range(ROUNDS):
        try:
            claims = Claims()  # every racer read the claims before any took one: all try claim number 1
            barrier.wait(timeout=120)
            results.put((round, driver, claims.take(experiment_id, "full", f"hash{round}", driver)))
        except Exception as exc:
            results.put((round, driver, f"{type(exc).__name__}: {exc}"))


def claim_together(uri: str, experiment_id: str, racers: int) -> dict[int, dict[str, str]]:
    """racers processes take the same claim at once, ROUNDS times: round -> {driver: the winner it was told}."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(racers), context.Queue()
    procs = [
        context.Process(target=_take_at_barrier, args=(uri, experiment_id, f"d{i}", barrier, results))
        for i in range(racers)
    ]
    for proc in procs:
        proc.start()
    told: dict[int, dict[str, str]] = {}
    for _ in range(ROUNDS * racers):
        round, driver, winner = results.get(timeout=300)
        told.setdefault(round, {})[driver] = winner
    for proc in procs:
        proc.join(timeout=60)
    return told


def assert_one_winner_each_round(told: dict[int, dict[str, str]]) -> None:
    assert sorted(told) == list(range(ROUNDS))
    for round in told.values():
        assert len(set(round.values())) == 1, round  # every racer names the same winner ...
        assert sum(driver == winner for driver, winner in round.items()) == 1, round  # ... and it is one of them


def test_of_processes_taking_one_claim_at_a_barrier_exactly_one_wins(store):
    assert_one_winner_each_round(claim_together(store, ensure_experiment("nanosweep"), racers=4))


def start_sweeps(count: int, uri: str, sweeps_dir: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    argv = [sys.executable, "-m", "nanosweep", "sweep", "--member", "tiny", "--sweeps-dir", str(sweeps_dir)]
    return [
        subprocess.Popen([*argv, "--fuse", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(count)
    ]


@pytest.mark.parametrize("drivers", [2, 3])
def test_sweeps_of_one_member_started_together_train_every_point_exactly_once(store, tmp_path, drivers):
    sweeps_dir = tmp_path / "two-points"
    sweeps_dir.mkdir()
    (sweeps_dir / "tiny.yaml").write_text(TWO_POINTS)
    for round in range(ROUNDS):
        uri = f"sqlite:///{tmp_path / f'round{round}.db'}"
        MlflowClient(uri).search_experiments()  # the store exists: the sweeps race on the points alone
        procs = start_sweeps(drivers, uri, sweeps_dir)
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
        assert [proc.returncode for proc in procs] == [0] * drivers, outputs
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
        trials = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
        finished = Counter(r.data.tags["config_hash"] for r in trials if r.info.status == "FINISHED")
        assert sorted(finished.values()) == [1, 1], (round, outputs)  # both points, each trained once
        assert len(trials) == 2 and not [r for r in runs if r.info.status == "RUNNING"], (round, outputs)


def test_two_searches_of_one_study_started_together_never_train_a_configuration_twice(store, tmp_path):
    space = write_space(tmp_path, iters=10, every=5, lr="{choices: [0.001, 0.003]}")  # 4 configurations
    # the same sampler seed: both searches propose the same configurations in the same order
    argv = [sys.executable, "-m", "nanosweep", "search", "--space", str(space), "--trials", "4"]
    argv += ["--sampler", "random", "--sampler-seed", "0", "--pruner", "none"]
    MlflowClient().search_experiments()  # the store exists: the searches race on the configurations alone
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=PATIENCE)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    client = MlflowClient()
    trials = client.search_runs([ensure_experiment("nanosweep")], "tags.run_kind = 'search_trial'")
    trained = Counter(r.data.tags["config_hash"] for r in trials)
    assert len(trained) == 4 and set(trained.values()) == {1}, outputs  # every configuration, each once
    assert {r.info.status for r in trials} == {"FINISHED"}


CLAIM_AND_DIE = """\
import os, sys
import mlflow
from nanosweep.tracking import Claims, TrackedRun
mlflow.set_tracking_uri(sys.argv[1])
parent = TrackedRun.create(sys.argv[2], "sweep-tiny-full", {"run_kind": "sweep"})
Claims().take(sys.argv[2], "full", sys.argv[3], parent.run_id)
print(parent.run_id, flush=True)
os.kill(os.getpid(), 9)  # a driver killed right after it claimed, before it made a run
"""


def test_a_driver_killed_right_after_claiming_a_point_blocks_it_only_while_its_heartbeat_is_fresh(
    store, tmp_path, monkeypatch
):
    sweeps_dir = tmp_path / "two-points"
    sweeps_dir.mkdir()
    (sweeps_dir / "tiny.yaml").write_text(TWO_POINTS)
    claimed, other = expand(load_members(sweeps_dir, "tiny")[0], "full")
    monkeypatch.setenv(HEARTBEAT_ENV, "5")  # stale after 20 s here and in every process: fresh at first
    argv = [sys.executable, "-c", CLAIM_AND_DIE, store, ensure_experiment("nanosweep"), claimed.config.config_hash]
    driver = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    sweep = [sys.executable, "-m", "nanosweep", "sweep", "--member", "tiny", "--sweeps-dir", str(sweeps_dir)]
    planned = subprocess.run([*sweep, "--dry-run"], capture_output=True, text=True)
    assert f"{claimed.config.run_name:<40} busy    claimed by the driver of run {driver}" in planned.stderr
    wait_for(lambda: heartbeat_stopped(driver))  # now it is dead wherever it ran
    swept = subprocess.run(sweep, capture_output=True, text=True)
    assert swept.returncode == 0, swept.stderr
    runs = MlflowClient().search_runs([ensure_experiment("nanosweep")], max_results=100)
    trials = Counter(r.data.tags["config_hash"] for r in runs if r.data.tags.get("run_kind") == "trial")
    assert trials == {claimed.config.config_hash: 1, other.config.config_hash: 1}  # each trained once
    assert {r.info.status for r in runs} == {"FINISHED", "KILLED"}  # the dead driver's parent: KILLED
