"""Trials as Ray tasks: the sweep's commands run on whichever node of a Ray cluster has room.

A trial (a fused group of runs, or one) is a task that reserves one CPU and, on a GPU cluster, 1/trials_per_gpu
of a GPU. Inside, it runs the same `nanosweep train-group` command as the local pool, with that node's Python,
and sends back its exit code and output. The runs log to the sweep's tracking server from wherever they train.
A node that dies takes its tasks with it; Ray runs them again on another node (NODE_RETRIES), and the new process
resumes every run from its last checkpoint (the sweep's heartbeat keeps the runs its own meanwhile).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray._raylet import Config as RayConfig
from ray.exceptions import RayError, RayTaskError, TaskCancelledError

from nanosweep.data import cache_input
from nanosweep.memory import PROCESSES_PER_GPU_ENV
from nanosweep.signals import stop_signals
from nanosweep.study.executors.base import (
    STOP_GRACE_SECONDS,
    Executor,
    ExecutorError,
    TrialExit,
    TrialLaunch,
    names_a_local_file,
)
from nanosweep.tracking.names import EXECUTOR_ENV, HEARTBEAT_ENV, NODE_ENV
from nanosweep.tracking.store import tracking_uri

NODE_RETRIES = 3  # times Ray reruns a trial whose node or worker process died
POLL_SECONDS = 0.5
# the sweep's environment a trial needs on another machine: where to log and as whom, and the heartbeat's beat;
# never the sweep's own run or experiment
FORWARDED_ENV_PREFIXES = ("MLFLOW_", HEARTBEAT_ENV)
NOT_FORWARDED = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # token: send the cluster a token (token authentication)


def trial_env() -> dict[str, str]:
    """What the driver hands every trial: the tracking URI as resolved here, credentials, the heartbeat beat."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key.startswith(FORWARDED_ENV_PREFIXES) and key not in NOT_FORWARDED
    }
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    return env


def run_on_node(argv: list[str], env: dict[str, str], text: bytes) -> tuple[int, bytes, str]:
    """In a Ray worker: the trial command on this node's Python. Returns (exit code, its output, node id).

    The driver's copy of tiny Shakespeare goes into this node's cache first (checked), for nodes without it.
    """
    node = ray.get_runtime_context().get_node_id()
    cache_input(text)
    # Ray has set OMP_NUM_THREADS (and CUDA_VISIBLE_DEVICES for a GPU share) in this worker's environment
    env = {**os.environ, **env, EXECUTOR_ENV: "ray", NODE_ENV: node}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, *argv[1:]], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        try:
            while proc.poll() is None:  # polled: ray.cancel's KeyboardInterrupt cannot reach a blocking wait
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:  # ray.cancel: stop the trial as a local sweep does (its runs end KILLED)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        log.seek(0)
        return proc.returncode, log.read(), node


def send_token_if_at_hand() -> None:
    """Ray's rule for `ray start --head`, on the connecting side: with RAY_AUTH_MODE unset and a token at hand
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), connect in token mode.

    A head started after any local Ray (which writes ~/.ray/auth_token) demands the token, and Ray sends it only
    to a cluster it found by itself; a cluster without token authentication accepts it all the same.
    """
    if AUTH_MODE_ENV in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ[AUTH_MODE_ENV] = "token"
        RayConfig.initialize("")  # Ray read its settings at import: read them again, as Ray does on this switch


def check_tracking_reachable(nodes: int) -> None:
    """Refuse a tracking store that is a file here when trials may run on other machines."""
    uri = tracking_uri()
    if nodes > 1 and names_a_local_file(uri):
        raise ExecutorError(
            f"tracking URI {uri} is a file on this machine and the Ray cluster has {nodes} nodes, which cannot "
            "write to it: start a tracking server (scripts/tracking-stack.sh or docker compose) and set "
            "MLFLOW_TRACKING_URI to it"
        )


class RayExecutor(Executor):
    """Trial commands as Ray tasks on the cluster at address; None follows Ray's rule: RAY_ADDRESS, else the
    cluster `ray start` started on this machine, else a local Ray started for this sweep."""

    def __init__(self, address: str | None, workers: int, trials_per_gpu: int, input_path: Path):
        send_token_if_at_hand()
        try:
            with stop_signals.kept():  # a stop signal ends the sweep's runs, as without Ray
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as exc:
            raise ExecutorError(
                f"cannot reach a Ray cluster at {address or os.environ.get('RAY_ADDRESS')!r} ({exc}): start one with "
                "`ray start --head`, or give its address with --ray-address or RAY_ADDRESS; a cluster with token "
                "authentication also needs its token here (~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from None
        try:
            nodes = [node for node in ray.nodes() if node["Alive"]]
            self.nodes = len(nodes)
            check_tracking_reachable(self.nodes)
        except BaseException:
            ray.shutdown()
            raise
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
        self.cuda = gpus > 0
        self._capacity = workers or max(1, int(gpus * trials_per_gpu) if self.cuda else int(cpus))
        self.where = (
            f"Ray cluster at {ray.get_runtime_context().gcs_address}: {len(nodes)} node(s), "
            f"{gpus:g} GPU(s), {cpus:g} CPU(s)"
        )
        self._task = ray.remote(run_on_node).options(
            num_cpus=1,
            num_gpus=1 / trials_per_gpu if self.cuda else 0,
            max_retries=NODE_RETRIES,  # system failures only (a dead node or worker), never a trial's own error
            retry_exceptions=False,
        )
        self._text = ray.put(input_path.read_bytes())  # sent once to each node that runs a trial
        self._env = trial_env()
        if self.cuda:  # Ray puts trials_per_gpu tasks on a GPU: each plans its memory for its share
            self._env[PROCESSES_PER_GPU_ENV] = str(trials_per_gpu)
        self._running: dict[ray.ObjectRef, tuple[TrialLaunch, float]] = {}

    @property
    def capacity(self) -> int:
        return self._capacity

    def running(self) -> list[TrialLaunch]:
        return [entry[0] for entry in list(self._running.values())]  # copied at once: read by the heartbeat

    def start(self, launch: TrialLaunch) -> int:
        with stop_signals.deferred():
            ref = self._task.remote(launch.argv, {**self._env, **launch.env}, self._text)
        self._running[ref] = (launch, time.monotonic())
        return 0  # no process id here: the process is on whichever node Ray chose

    def _exit(self, ref: ray.ObjectRef) -> TrialExit:
        """The ended task's exit, its output written to the launch's log."""
        launch, started = self._running.pop(ref)
        lost = ""
        try:
            code, output, _ = ray.get(ref)
        except TaskCancelledError:
            code, output = -signal.SIGTERM, b"cancelled by the sweep\n"
        except RayTaskError as exc:  # run_on_node itself failed (say, the node's copy of the text is corrupt)
            code, output = 1, f"{exc}\n".encode()
        except RayError as exc:  # the node or worker died NODE_RETRIES + 1 times
            code, lost = -signal.SIGKILL, str(exc).strip().splitlines()[0]
            output = f"lost: {lost}\n".encode()
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        launch.log_path.write_bytes(output)
        return TrialExit(launch, code, time.monotonic() - started, lost)

    def wait(self, timeout: float) -> list[TrialExit]:
        if not self._running:
            return []
        refs = list(self._running)
        # Ray's calls are compiled: a stop signal's exception raised inside one comes out as a SystemError, so
        # the sweep's SIGTERM/Ctrl-C waits for the end of the call (at most timeout)
        with stop_signals.deferred():
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            return [self._exit(ref) for ref in ready]

    def stop(self, signum: int, grace: float) -> list[TrialExit]:
        """Cancel every task: each sends its trial SIGTERM and waits up to grace; force what is left after that."""
        if not self._running:
            return []
        for ref in self._running:
            ray.cancel(ref)
        refs = list(self._running)
        ready, late = ray.wait(refs, num_returns=len(refs), timeout=grace + 10)
        for ref in late:
            ray.cancel(ref, force=True)
        return [self._exit(ref) for ref in ready] + self.wait(timeout=10)

    def close(self) -> None:
        ray.shutdown()
