"""The tracking server restarts in the middle of a sweep: the sweep goes on and loses nothing.

MLflow's HTTP client retries with backoff while the server is down, and the trials' asynchronous
metric logging is flushed before each run ends.
"""

from __future__ import annotations

import time

import pytest

from .server_checks import (
    missing_or_doubled,
    not_finished,
    running,
    sweep_command,
    sweep_runs,
    unique_experiment,
    wait_until,
    write_member,
)

pytestmark = pytest.mark.server

SECONDS_DOWN = 3  # plus the server's own start-up, several seconds more


def test_sweep_survives_a_server_restart_without_losing_metric_points(server, tmp_path) -> None:
    sweeps_dir = write_member(tmp_path / "sweeps", max_iters=[300], eval_interval=50)  # 2 points, 2 workers
    name = unique_experiment("it-restart")
    client = server.client()

    def both_trials_logging() -> bool:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            return False
        _, children = sweep_runs(client, experiment.experiment_id)
        return len(children) == 2 and all(
            r.info.status == "RUNNING" and "iter_loss" in r.data.metrics for r in children
        )

    sweep = server.popen(*sweep_command(sweeps_dir, name))
    try:
        wait_until(both_trials_logging, 300, "two trials logging metrics", sweep)
        down_from = int(time.time() * 1000)
        server.restart(SECONDS_DOWN)
        back_at = int(time.time() * 1000)
        output, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, output

    experiment_id = client.get_experiment_by_name(name).experiment_id
    parents, children = sweep_runs(client, experiment_id)
    assert not_finished(parents + children) == {}
    assert running(client, experiment_id) == []
    logged_while_down = 0
    for run in children:
        assert run.info.end_time > down_from, f"{run.info.run_name} ended before the restart: nothing was tested"
        assert missing_or_doubled(client, run) == {}, run.info.run_name
        history = client.get_metric_history(run.info.run_id, "iter_loss")
        logged_while_down += sum(down_from <= m.timestamp <= back_at for m in history)
    assert logged_while_down > 0, "no point was logged while the server was down"
