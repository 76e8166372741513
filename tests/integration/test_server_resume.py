"""A sweep killed outright (SIGKILL of its whole process group) resumes on rerun, in the same runs."""

from __future__ import annotations

import os
import re
import signal

import pytest

from conftest import heartbeat_stopped

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


def test_rerun_resumes_trials_killed_by_sigkill_from_their_checkpoints(server, tmp_path) -> None:
    sweeps_dir = write_member(tmp_path / "sweeps", max_iters=[200], eval_interval=25)  # 2 points, 2 workers
    name = unique_experiment("it-resume")
    client = server.client()

    def trials_with_a_checkpoint() -> list:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            return []
        _, children = sweep_runs(client, experiment.experiment_id)
        return [r for r in children if r.info.status == "RUNNING" and "nanosweep.checkpoint_iter" in r.data.tags]

    sweep = server.popen(*sweep_command(sweeps_dir, name), start_new_session=True)
    try:
        wait_until(trials_with_a_checkpoint, 300, "trial with a checkpoint", sweep)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)  # the driver and its trial processes, without any cleanup
        sweep.communicate()
    experiment_id = client.get_experiment_by_name(name).experiment_id
    _, before = sweep_runs(client, experiment_id)
    stale = [r for r in before if r.info.status == "RUNNING"]
    assert stale, "the kill left no trial RUNNING: nothing to resume"
    # until their heartbeat is stale a rerun sees them busy
    stopped = lambda: all(heartbeat_stopped(r.info.run_id, client) for r in stale)  # noqa: E731
    wait_until(stopped, 60, "stale heartbeats of the killed trials")

    rerun = server.cli(*sweep_command(sweeps_dir, name))
    assert rerun.returncode == 0, rerun.stdout
    for run in stale:
        assert re.search(rf"{re.escape(run.info.run_name)}\s+resume\s+FINISHED", rerun.stdout), rerun.stdout
    _, after = sweep_runs(client, experiment_id)
    assert [r.info.run_id for r in after] == [r.info.run_id for r in before], "resumed in the same runs"
    assert not_finished(after) == {}
    for run in after:
        assert missing_or_doubled(client, run) == {}, run.info.run_name
        assert run.data.tags["nanosweep.checkpoint_iter"] == "200"
    assert running(client, experiment_id) == [], "a run stayed RUNNING after the rerun"
