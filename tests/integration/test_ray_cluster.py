"""Sweeps on a real two-node Ray cluster (ray.cluster_utils.Cluster: a head and a worker node, each with its own
raylet and one CPU) logging to the PostgreSQL-backed tracking server; a worker node killed mid-trial.

Every packet stays on loopback: the nodes bind 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray use the
loopback address for its nodes, as it does on a laptop, instead of this machine's network address), and what Ray
would send elsewhere at start-up (cloud metadata probes) goes to a closed loopback proxy port. A thread watching
the machine's TCP connections during the sweep checks it.

The cluster uses Ray's token authentication, its token in a file that RAY_AUTH_TOKEN_PATH names; the sweeps run
with RAY_AUTH_MODE unset, so they must send the token they find by themselves, as after `ray start --head`.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow import MlflowClient

from nanosweep.data import PreparedData

from .conftest import Server
from .server_checks import missing_or_doubled, sweep_runs, unique_experiment, wait_until, write_member

pytestmark = pytest.mark.server

LOOPBACK_ONLY = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # read when ray is imported: nodes on 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",
    **{proxy: "http://127.0.0.1:9" for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    **{no_proxy: "127.0.0.1,localhost,::1" for no_proxy in ("NO_PROXY", "no_proxy")},
}


@dataclass
class RayCluster:
    cluster: Any  # ray.cluster_utils.Cluster
    head_id: str
    worker: Any  # the worker node, for killing it
    worker_id: str
    worker_data_dir: Path  # the worker node's own data dir: it starts without tiny Shakespeare

    @property
    def address(self) -> str:
        return self.cluster.address


@pytest.fixture(scope="module")
def ray_cluster(prepared: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    saved = dict(os.environ)
    token_file = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    with_token = {**LOOPBACK_ONLY, "RAY_AUTH_TOKEN_PATH": str(token_file)}  # what the sweeps get: no RAY_AUTH_MODE
    os.environ.update({**with_token, "RAY_AUTH_MODE": "token"})
    from ray._raylet import Config
    from ray.cluster_utils import Cluster  # after the environment above: Ray reads it on import

    Config.initialize("")  # this process (the cluster's driver) in token mode, even if Ray was imported before

    node_args = dict(num_cpus=1, object_store_memory=80 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    # the worker node finds no text: no NANOSWEEP_INPUT, an empty data dir; its trials get the driver's copy
    worker_data_dir = tmp_path_factory.mktemp("worker-node-data")
    os.environ.pop("NANOSWEEP_INPUT", None)
    os.environ["NANOSWEEP_DATA_DIR"] = str(worker_data_dir)
    worker = cluster.add_node(**node_args)
    os.environ.clear()
    os.environ.update({**saved, **with_token})
    cluster.wait_for_nodes()
    try:
        yield RayCluster(cluster, cluster.head_node.node_id, worker, worker.node_id, worker_data_dir)
    finally:
        cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)


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

    def both_with_a_checkpoint() -> bool:
        return sum("nanosweep.checkpoint_iter" in r.data.tags for r in trial_runs(client, name)) == 2

    try:
        wait_until(both_with_a_checkpoint, 300, "two trials with a checkpoint", sweep)
        sweep.send_signal(signal.SIGTERM)
        output, _ = sweep.communicate(timeout=300)
    finally:
        sweep.kill()
    assert sweep.returncode == 130, output
    parents, children = sweep_runs(client, client.get_experiment_by_name(name).experiment_id)
    assert parents[0].info.status == "KILLED" and len(children) == 2
    for run in children:
        assert run.info.status == "KILLED"
        assert run.data.tags["nanosweep.end_reason"] == "interrupted by SIGTERM"  # the trial ended it, on its node
    commands = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    assert not [c for c in commands for r in children if r.info.run_id in c], "trial processes outlived the sweep"


def test_a_worker_node_killed_mid_trial_is_resumed_on_the_other_node_from_its_checkpoint(
    server: Server, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """Last in the module: the cluster has one node left afterwards."""
    # the first checkpoint comes at 1/12 of the trial: the node is killed with most of it still to train
    sweeps_dir = write_member(tmp_path / "sweeps", max_iters=[3000], eval_interval=250)
    name = unique_experiment("it-ray-kill")
    client = server.client()
    sweep = server.popen(*ray_sweep(server, ray_cluster, sweeps_dir, name))

    def on_the_worker_with_a_checkpoint() -> Any:
        on_the_worker = [r for r in trial_runs(client, name) if r.data.tags.get("node") == ray_cluster.worker_id]
        return next((r for r in on_the_worker if "nanosweep.checkpoint_iter" in r.data.tags), None)

    try:
        victim = wait_until(on_the_worker_with_a_checkpoint, 300, "trial with a checkpoint on the worker", sweep)
        ray_cluster.cluster.remove_node(ray_cluster.worker, allow_graceful=False)  # the machine is gone
        output, _ = sweep.communicate(timeout=600)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output

    parents, children = sweep_runs(client, client.get_experiment_by_name(name).experiment_id)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}  # no run duplicated
    resumed = client.get_run(victim.info.run_id)
    assert resumed.data.tags["node"] == ray_cluster.head_id  # where Ray ran it again
    assert int(resumed.data.tags["nanosweep.resumed_from"]) >= int(victim.data.tags["nanosweep.checkpoint_iter"])
    for run in children:
        assert missing_or_doubled(client, run) == {}, run.info.run_name
