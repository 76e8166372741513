"""One driver per point: drivers started together into one SQLite store train every grid point (and every search
configuration) once. The claim under it is checked at a barrier of real processes (tests/integration does both
through the PostgreSQL-backed server)."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import heartbeat_stopped
from helpers import PATIENCE, ROUNDS, TWO_POINTS, assert_one_winner_each_round, claim_together, wait_for, write_space
from nanosweep.study.grid import expand, load_members
from nanosweep.tracking.names import HEARTBEAT_ENV
from nanosweep.tracking.store import ensure_experiment


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
from nanosweep.tracking.claims import Claims
from nanosweep.tracking.run import TrackedRun
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
