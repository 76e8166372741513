"""Sweeps on a real two-node Ray cluster (conftest.ray_cluster) logging to the PostgreSQL-backed tracking server;
a worker node killed mid-trial. A thread watching the machine's TCP connections checks that every packet stays
on loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow import MlflowClient

from .conftest import RayCluster, Server
from .server_checks import (
    OffLoopbackWatch,
    missing_or_doubled,
    sigterm_when_all_have_a_checkpoint,
    sweep_runs,
    unique_experiment,
    write_member,
)

pytestmark = pytest.mark.server

def ray_sweep(server: Server, cluster: RayCluster, sweeps_dir: Path, experiment: str, *extra: str) -> list[str]:
    return [
        "sweep",
        "--member",
        "tiny",
        "--sweeps-dir",
        str(sweeps_dir),
        "--experiment",
        experiment,
        "--executor",
        "ray",
        "--ray-address",
        cluster.address,
        "--fuse",
        "1",
        *extra,
    ]


def trial_runs(client: MlflowClient, experiment: str) -> list[Any]:
    """The trial runs of an experiment a sweep is filling (none before it exists)."""
    found = client.get_experiment_by_name(experiment)
    return sweep_runs(client, found.experiment_id)[1] if found else []


def test_a_sweep_over_two_nodes_finishes_every_run_once_tagged_with_its_node(
    server: Server, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    sweeps_dir = write_member(tmp_path / "sweeps", max_iters=[20, 40], eval_interval=10)
    name = unique_experiment("it-ray")
    with OffLoopbackWatch() as watch:
        done = server.cli(*ray_sweep(server, ray_cluster, sweeps_dir, name))
    assert done.returncode == 0, done.stdout
    assert "2 at a time on Ray cluster at 127.0.0.1" in done.stdout
    assert watch.seen == set(), "connections off loopback"

    client = server.client()
    parents, children = sweep_runs(client, client.get_experiment_by_name(name).experiment_id)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    for run in children:
        assert missing_or_doubled(client, run) == {}, run.info.run_name
        assert run.data.tags["executor"] == "ray"
        assert "ckpt.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}  # uploaded through the server
    assert {r.data.tags["node"] for r in children} == {ray_cluster.head_id, ray_cluster.worker_id}
    assert (ray_cluster.worker_data_dir / "input.txt").is_file()  # the worker node got the driver's copy


def refused_sqlite_sweep(cluster: RayCluster, tmp_path: Path, **env_changes: str) -> str:
    """A tiny sweep onto the cluster with a SQLite store here, which must be refused before it writes a run:
    its one-line error. env_changes replace variables of this environment (MLflow's are left out)."""
    sweeps_dir = write_member(tmp_path / "sweeps", max_iters=[20], eval_interval=10)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [sys.executable, "-m", "nanosweep", "sweep", "--member", "tiny", "--sweeps-dir", str(sweeps_dir)]
    argv += ["--executor", "ray", "--ray-address", cluster.address, "--tracking-uri", uri]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(argv, env={**env, **env_changes}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []  # no parent, no trial run
    return done.stderr.strip().splitlines()[-1]


def test_a_sqlite_store_is_refused_for_a_cluster_of_two_nodes_before_anything_is_written(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    error = refused_sqlite_sweep(ray_cluster, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert error.startswith(f"Error: tracking URI {uri} is a file on this machine and the Ray cluster has 2 nodes")


def test_a_sweep_without_the_clusters_token_is_refused_in_one_line_before_anything_is_written(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    # no RAY_AUTH_TOKEN_PATH, and a home without ~/.ray/auth_token
    error = refused_sqlite_sweep(ray_cluster, tmp_path, RAY_AUTH_TOKEN_PATH=str(tmp_path / "none"), HOME=str(tmp_path))
    assert error.startswith(f"Error: cannot reach a Ray cluster at '{ray_cluster.address}'")
    assert error.endswith("also needs its token here (~/.ray/auth_token or RAY_AUTH_TOKEN)")


def test_sigterm_of_the_sweep_cancels_its_tasks_on_the_cluster_and_the_trials_end_their_runs_killed(
    server: Server, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    # trials far longer than the test: at ~4 ms an iteration, 400 iterations ended before the SIGTERM on a busy CI
    sweeps_dir = write_member(tmp_path / "sweeps", max_iters=[10**6], eval_interval=50)
    name = unique_experiment("it-ray-stop")
    client = server.client()
    sweep = server.popen(*ray_sweep(server, ray_cluster, sweeps_dir, name))
    output = sigterm_when_all_have_a_checkpoint(sweep, lambda: trial_runs(client, name), 2)
    assert sweep.returncode == 130, output
    parents, children = sweep_runs(client, client.get_experiment_by_name(name).experiment_id)
    assert parents[0].info.status == "KILLED" and len(children) == 2
    for run in children:
        logs = [a.path for a in client.list_artifacts(run.info.run_id, "logs")]  # the trial's output, kept
        assert len(logs) == 1, logs
        log = client.download_artifacts(run.info.run_id, logs[0], str(tmp_path))
        reason = run.data.tags.get("nanosweep.end_reason")
        assert (run.info.status, reason) == ("KILLED", "interrupted by SIGTERM"), Path(log).read_text()[-3000:]
    commands = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    assert not [c for c in commands for r in children if r.info.run_id in c], "trial processes outlived the sweep"


def test_a_worker_node_killed_mid_trial_is_resumed_on_the_other_node_from_its_checkpoint(
    server: Server, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    # the first checkpoint comes at 1/12 of the trial: the node is killed with most of it still to train
    sweeps_dir = write_member(tmp_path / "sweeps", max_iters=[3000], eval_interval=250)
    name = unique_experiment("it-ray-kill")
    client = server.client()
    sweep = server.popen(*ray_sweep(server, ray_cluster, sweeps_dir, name))
    victim, output = ray_cluster.kill_the_worker_mid_trial(lambda: trial_runs(client, name), sweep)
    assert sweep.returncode == 0, output

    parents, children = sweep_runs(client, client.get_experiment_by_name(name).experiment_id)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}  # no run duplicated
    resumed = client.get_run(victim.info.run_id)
    assert resumed.data.tags["node"] == ray_cluster.head_id  # where Ray ran it again
    assert int(resumed.data.tags["nanosweep.resumed_from"]) >= int(victim.data.tags["nanosweep.checkpoint_iter"])
    for run in children:
        assert missing_or_doubled(client, run) == {}, run.info.run_name
