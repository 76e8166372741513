"""One driver per point through the PostgreSQL-backed server: the claim at a barrier of real processes, and sweeps
of one member started together on one experiment, which train every grid point exactly once."""

from __future__ import annotations

from collections import Counter

import pytest

from helpers import ROUNDS, TWO_POINTS, assert_one_winner_each_round, claim_together

from .server_checks import unique_experiment

pytestmark = pytest.mark.server


def test_of_processes_taking_one_claim_through_the_server_at_a_barrier_exactly_one_wins(server) -> None:
    experiment_id = server.client().create_experiment(unique_experiment("it-claims"))
    assert_one_winner_each_round(claim_together(server.uri, experiment_id, racers=4))


@pytest.mark.parametrize("drivers", [2, 3])
def test_sweeps_started_together_through_the_server_train_every_point_exactly_once(server, tmp_path, drivers):
    sweeps_dir = tmp_path / "sweeps"
    sweeps_dir.mkdir()
    (sweeps_dir / "tiny.yaml").write_text(TWO_POINTS)
    client = server.client()
    for round in range(ROUNDS):
        name = unique_experiment(f"it-claims-{drivers}")
        client.create_experiment(name)  # the sweeps race on the points alone
        argv = ["sweep", "--member", "tiny", "--sweeps-dir", str(sweeps_dir), "--fuse", "1", "--experiment", name]
        procs = [server.popen(*argv) for _ in range(drivers)]
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
        assert [proc.returncode for proc in procs] == [0] * drivers, outputs
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)
        trials = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
        finished = Counter(r.data.tags["config_hash"] for r in trials if r.info.status == "FINISHED")
        assert sorted(finished.values()) == [1, 1], (round, outputs)  # both points, each trained once
        assert len(trials) == 2 and not [r for r in runs if r.info.status == "RUNNING"], (round, outputs)
