"""Fixtures for tests against a real tracking server: PostgreSQL + `mlflow server` with basic auth.

`scripts/tracking-stack.sh start` starts one; these variables point the tests at it:
  NANOSWEEP_TEST_SERVER_URI       e.g. http://127.0.0.1:5000
  NANOSWEEP_TEST_SERVER_USERNAME  an account of the server's basic auth (the admin)
  NANOSWEEP_TEST_SERVER_PASSWORD
  NANOSWEEP_TEST_OPTUNA_STORAGE   the stack's Optuna database (searches get it as NANOSWEEP_OPTUNA_STORAGE)
Without them the `server` and `browser` tests skip; with NANOSWEEP_REQUIRE_SERVER=1 (CI) they fail instead.

Tests that ask for `ray_cluster` share one real two-node Ray cluster for the session (ray.cluster_utils.Cluster:
a head and a worker node, each with its own raylet and one CPU). Every packet stays on loopback: the nodes bind
127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray use the loopback address for its nodes, as it does on a
laptop, instead of this machine's network address), and what Ray would send elsewhere at start-up (cloud metadata
probes) goes to a closed loopback proxy port. The cluster uses Ray's token authentication, its token in a file
that RAY_AUTH_TOKEN_PATH names; commands run with RAY_AUTH_MODE unset, so they must send the token they find by
themselves, as after `ray start --head`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from nanosweep.data import PreparedData

from .server_checks import skip_or_fail, sweep_command, sweep_runs, unique_experiment, wait_until, write_member

REPO = Path(__file__).resolve().parents[2]
STACK_SCRIPT = REPO / "scripts" / "tracking-stack.sh"
NANOSWEEP = [sys.executable, "-m", "nanosweep"]


@dataclass
class Server:
    """The running tracking server, and nanosweep's CLI pointed at it."""

    uri: str
    username: str
    password: str
    workdir: Path
    started_by_stack_script: bool = False
    optuna_storage: str = ""  # the stack's Optuna database, as `tracking-stack.sh env` exports it to a client

    def env(self, authenticated: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_TRACKING_URI=self.uri, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
        if self.optuna_storage:
            env["NANOSWEEP_OPTUNA_STORAGE"] = self.optuna_storage
        if authenticated:
            env.update(MLFLOW_TRACKING_USERNAME=self.username, MLFLOW_TRACKING_PASSWORD=self.password)
        return env

    def popen(self, *args: str, authenticated: bool = True, **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(
            [*NANOSWEEP, *args],
            cwd=self.workdir,
            env=self.env(authenticated),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **kwargs,
        )

    def cli(self, *args: str, authenticated: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run `nanosweep ARGS` against the server to the end; stdout and stderr together in .stdout."""
        proc = self.popen(*args, authenticated=authenticated)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout)

    def client(self) -> MlflowClient:
        # the credentials are read from the environment at each request
        os.environ["MLFLOW_TRACKING_USERNAME"] = self.username
        os.environ["MLFLOW_TRACKING_PASSWORD"] = self.password
        return MlflowClient(tracking_uri=self.uri)

    def restart(self, seconds_down: float) -> None:
        """Stop the MLflow server, leave it down a while, start it again (PostgreSQL stays up)."""
        if not self.started_by_stack_script:
            skip_or_fail(f"{self.uri} was not started by scripts/tracking-stack.sh, so this test cannot restart it")
        subprocess.run(["bash", str(STACK_SCRIPT), "restart-server", str(seconds_down)], check=True, timeout=300)


@pytest.fixture(scope="session")
def server(prepared: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> Server:
    uri = os.environ.get("NANOSWEEP_TEST_SERVER_URI")
    if not uri:
        skip_or_fail("no tracking server: run `bash scripts/tracking-stack.sh start` and set NANOSWEEP_TEST_SERVER_URI")
    username = os.environ.get("NANOSWEEP_TEST_SERVER_USERNAME", "")
    password = os.environ.get("NANOSWEEP_TEST_SERVER_PASSWORD", "")
    status = subprocess.run(["bash", str(STACK_SCRIPT), "status"], capture_output=True, text=True)
    ours = f"on {uri}, healthy" in status.stdout
    storage = os.environ.get("NANOSWEEP_TEST_OPTUNA_STORAGE", "")
    return Server(uri.rstrip("/"), username, password, tmp_path_factory.mktemp("server-cwd"), ours, storage)


@dataclass
class Sweep:
    """A finished sweep on the server: its experiment, parent run and children (in grid order)."""

    experiment_name: str
    experiment_id: str
    sweeps_dir: Path
    parent: Any
    children: list[Any]


@pytest.fixture(scope="session")
def tiny_sweep(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """The tiny grid (4 points) swept once on the server with two workers; several tests read it."""
    sweeps_dir = write_member(tmp_path_factory.mktemp("sweeps"), max_iters=[20, 40], eval_interval=10)
    name = unique_experiment("it-sweep")
    done = server.cli(*sweep_command(sweeps_dir, name))
    assert done.returncode == 0, done.stdout
    client = server.client()
    experiment = client.get_experiment_by_name(name)
    parents, children = sweep_runs(client, experiment.experiment_id)
    assert len(parents) == 1, [p.info.run_name for p in parents]
    return Sweep(name, experiment.experiment_id, sweeps_dir, parents[0], children)


# ---- a real two-node Ray cluster on loopback (module docstring) --------------------------------------------------

LOOPBACK_ONLY = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # read when ray is imported: nodes on 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",
    **{proxy: "http://127.0.0.1:9" for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    **{no_proxy: "127.0.0.1,localhost,::1" for no_proxy in ("NO_PROXY", "no_proxy")},
}


@dataclass
class RayCluster:
    """The session's cluster: a head and one worker node; a test that kills the worker gets a fresh one added."""

    cluster: Any  # ray.cluster_utils.Cluster
    head_id: str
    with_token: dict[str, str]  # the environment its commands run in (LOOPBACK_ONLY and the token file)
    worker_data_dirs: pytest.TempPathFactory  # where each worker node's own data dir is made
    worker: Any = None  # the worker node, for killing it
    worker_id: str = ""
    worker_data_dir: Path = Path()  # the worker node's own data dir: it starts without tiny Shakespeare

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self) -> None:
        """Start a worker node that finds no text (no NANOSWEEP_INPUT, an empty data dir): its trials get the
        driver's copy."""
        saved = dict(os.environ)
        self.worker_data_dir = self.worker_data_dirs.mktemp("worker-node-data")
        os.environ.pop("NANOSWEEP_INPUT", None)
        os.environ.update(self.with_token, RAY_AUTH_MODE="token", NANOSWEEP_DATA_DIR=str(self.worker_data_dir))
        try:
            self.worker = self.cluster.add_node(**RAY_NODE_ARGS)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.worker_id = self.worker.node_id
        self.cluster.wait_for_nodes()

    def kill_the_worker_mid_trial(self, trial_runs: Callable[[], list[Any]], driver: subprocess.Popen) -> tuple:
        """Wait for a run on the worker node with a checkpoint, remove that node without warning (the machine is
        gone) and let the driver finish: (that run as it was then, the driver's output). A fresh worker node
        takes its place for the tests after."""

        def on_the_worker_with_a_checkpoint() -> Any:
            runs = [r for r in trial_runs() if r.data.tags.get("node") == self.worker_id]
            return next((r for r in runs if "nanosweep.checkpoint_iter" in r.data.tags), None)

        try:
            victim = wait_until(on_the_worker_with_a_checkpoint, 300, "trial with a checkpoint on the worker", driver)
            self.cluster.remove_node(self.worker, allow_graceful=False)
            output, _ = driver.communicate(timeout=600)
        finally:
            driver.kill()
        self.add_worker()
        return victim, output


RAY_NODE_ARGS = dict(num_cpus=1, object_store_memory=80 * 2**20)


@pytest.fixture(scope="session")
def ray_cluster(prepared: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """One cluster for the session: a second one started in the same pytest process after the first's shutdown
    failed to come up."""
    saved = dict(os.environ)
    token_file = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    with_token = {**LOOPBACK_ONLY, "RAY_AUTH_TOKEN_PATH": str(token_file)}  # what the sweeps get: no RAY_AUTH_MODE
    os.environ.update({**with_token, "RAY_AUTH_MODE": "token"})
    from ray._raylet import Config
    from ray.cluster_utils import Cluster  # after the environment above: Ray reads it on import

    Config.initialize("")  # this process (the cluster's driver) in token mode, even if Ray was imported before
    cluster = Cluster(initialize_head=True, head_node_args={**RAY_NODE_ARGS, "include_dashboard": False})
    os.environ.clear()
    os.environ.update({**saved, **with_token})
    ray_cluster = RayCluster(cluster, cluster.head_node.node_id, with_token, tmp_path_factory)
    try:
        ray_cluster.add_worker()
        yield ray_cluster
    finally:
        cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)
