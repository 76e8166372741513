"""`nanosweep search --executor ray` on a real two-node Ray cluster (conftest.ray_cluster), its runs on the
PostgreSQL-backed tracking server and its Optuna study in the stack's PostgreSQL database `optuna` (which the
searches find in NANOSWEEP_OPTUNA_STORAGE, as after `eval "$(scripts/tracking-stack.sh env)"`).
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest
from mlflow import MlflowClient

from helpers import LR_RANGE, write_space

from .conftest import RayCluster, Server
from .server_checks import OffLoopbackWatch, sigterm_when_all_have_a_checkpoint, skip_or_fail, unique_experiment

pytestmark = pytest.mark.server

@pytest.fixture
def storage(server: Server) -> str:
    if not server.optuna_storage:
        skip_or_fail("no Optuna storage on the stack: set NANOSWEEP_TEST_OPTUNA_STORAGE (tracking-stack.sh test-env)")
    return server.optuna_storage


def unique_space(folder: Path, iters: int, every: int, lr: str = LR_RANGE) -> Path:
    """The tiny space (helpers.TINY_SPACE), under a study name no other test or CI run has: the stack's database
    outlives a session."""
    return write_space(folder, f"it_search_{uuid.uuid4().hex[:8]}", iters, every, lr)


def ray_search(cluster: RayCluster, space: Path, experiment: str, *extra: str) -> list[str]:
    argv = ["search", "--space", str(space), "--experiment", experiment, "--executor", "ray"]
    return [*argv, "--ray-address", cluster.address, *extra]


def search_runs(client: MlflowClient, experiment: str) -> tuple[list[Any], list[Any]]:
    """(parents, trial runs) of an experiment searches fill (none before it exists)."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000) if found else []
    kinds = [[r for r in runs if r.data.tags.get("run_kind") == kind] for kind in ("search", "search_trial")]
    return kinds[0], kinds[1]


def launched(storage: str, space: Path) -> dict[int, optuna.trial.FrozenTrial]:
    """The study's trials that were trained, by number."""
    study = optuna.load_study(study_name=space.stem, storage=storage)
    return {t.number: t for t in study.trials if "run_id" in t.user_attrs}


def test_a_search_with_asha_over_two_nodes_agrees_with_optuna_trial_by_trial(
    server: Server, ray_cluster: RayCluster, storage: str, tmp_path: Path
) -> None:
    space, name = unique_space(tmp_path, iters=40, every=10), unique_experiment("it-ray-search")
    argv = ray_search(ray_cluster, space, name, "--trials", "6", "--workers", "2", "--sampler-seed", "1")
    with OffLoopbackWatch() as watch:
        done = server.cli(*argv)
    assert done.returncode == 0, done.stdout
    assert "2 at a time on Ray cluster at 127.0.0.1" in done.stdout and "asha pruner" in done.stdout
    assert watch.seen == set(), "connections off loopback"

    client = server.client()
    [parent], children = search_runs(client, name)
    assert parent.info.status == "FINISHED" and parent.data.params["executor"] == "ray"
    trials = launched(storage, space)
    assert len(children) == 6 and len(trials) == 6
    assert {r.data.tags["node"] for r in children} == {ray_cluster.head_id, ray_cluster.worker_id}
    for run in children:
        trial = trials[int(run.data.tags["optuna_trial"])]
        assert run.info.status == "FINISHED" and trial.user_attrs["run_id"] == run.info.run_id
        assert run.data.tags["executor"] == "ray"
        steps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
        assert trial.intermediate_values == pytest.approx(steps)  # reported from whichever node trained it
        if run.data.tags.get("pruned") == "true":
            assert trial.state == optuna.trial.TrialState.PRUNED
            assert max(steps) == int(run.data.tags["pruned_at_iter"]) < 40
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and max(steps) == 40
            assert trial.value == pytest.approx(run.data.metrics["val_loss"])
    assert parent.data.metrics["trials_complete"] + parent.data.metrics["trials_pruned"] == 6


def test_a_sqlite_optuna_storage_is_refused_for_a_cluster_of_two_nodes_before_anything_is_written(
    server: Server, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    space, name = unique_space(tmp_path, iters=20, every=10), unique_experiment("it-ray-search-sqlite")
    database = tmp_path / "optuna.db"
    done = server.cli(*ray_search(ray_cluster, space, name, "--trials", "2", "--storage", f"sqlite:///{database}"))
    assert done.returncode == 1
    assert done.stdout.strip().splitlines()[-1] == (
        f"Error: Optuna storage sqlite:///{database} is a file on this machine and the Ray cluster has 2 nodes, "
        "which cannot reach it: give a database every node reaches with --storage or NANOSWEEP_OPTUNA_STORAGE "
        "(scripts/tracking-stack.sh env exports one on its PostgreSQL)"
    )
    assert not database.exists()
    assert server.client().get_experiment_by_name(name) is None  # no experiment, no run


def test_two_searches_of_one_study_started_together_never_train_a_configuration_twice(
    server: Server, ray_cluster: RayCluster, storage: str, tmp_path: Path
) -> None:
    # 2 heads x 2 learning rates: the 4 configurations, 4 asked for by each search: what one trains the other must not
    space = unique_space(tmp_path, iters=20, every=10, lr="{choices: [0.001, 0.003]}")
    name = unique_experiment("it-ray-search-two")
    argv = ray_search(ray_cluster, space, name, "--trials", "4", "--sampler", "random", "--pruner", "none")
    searches = [server.popen(*argv, "--sampler-seed", str(seed)) for seed in (1, 2)]
    outputs = [search.communicate(timeout=600)[0] for search in searches]
    assert [search.returncode for search in searches] == [0, 0], outputs

    parents, children = search_runs(server.client(), name)
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    hashes = Counter(r.data.tags["config_hash"] for r in children)
    assert len(hashes) == len(children) == 4 and set(hashes.values()) == {1}, hashes
    trials = launched(storage, space)
    assert Counter(t.user_attrs["config_hash"] for t in trials.values()) == hashes
    assert {t.state for t in trials.values()} == {optuna.trial.TrialState.COMPLETE}


def test_sigterm_of_the_search_ends_every_run_killed_and_leaves_its_trials_to_resume(
    server: Server, ray_cluster: RayCluster, storage: str, tmp_path: Path
) -> None:
    space, name = unique_space(tmp_path, iters=10**6, every=50), unique_experiment("it-ray-search-stop")
    client = server.client()
    search = server.popen(*ray_search(ray_cluster, space, name, "--trials", "2", "--workers", "2"))
    output = sigterm_when_all_have_a_checkpoint(search, lambda: search_runs(client, name)[1], 2)
    assert search.returncode == 130, output
    [parent], children = search_runs(client, name)
    assert parent.info.status == "KILLED" and len(children) == 2
    for run in children:
        assert run.info.status == "KILLED"
        assert run.data.tags["nanosweep.end_reason"] == "interrupted by SIGTERM"  # the trial ended it, on its node
    assert {t.state for t in launched(storage, space).values()} == {optuna.trial.TrialState.RUNNING}  # to resume
    commands = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    assert not [c for c in commands for r in children if r.info.run_id in c], "trial processes outlived the search"


def test_a_worker_node_killed_mid_trial_resumes_it_in_the_same_run_and_optuna_trial_on_the_other_node(
    server: Server, ray_cluster: RayCluster, storage: str, tmp_path: Path
) -> None:
    # the first checkpoint comes at 1/12 of the trial: the node is killed with most of it still to train
    space, name = unique_space(tmp_path, iters=3000, every=250), unique_experiment("it-ray-search-kill")
    client = server.client()
    search = server.popen(*ray_search(ray_cluster, space, name, "--trials", "2", "--workers", "2", "--pruner", "none"))
    victim, output = ray_cluster.kill_the_worker_mid_trial(lambda: search_runs(client, name)[1], search)
    assert search.returncode == 0, output

    [parent], children = search_runs(client, name)
    assert parent.info.status == "FINISHED" and len(children) == 2  # no run duplicated
    resumed = client.get_run(victim.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["node"] == ray_cluster.head_id
    assert int(resumed.data.tags["nanosweep.resumed_from"]) >= int(victim.data.tags["nanosweep.checkpoint_iter"])
    trials = launched(storage, space)
    assert len(trials) == 2  # no Optuna trial duplicated either
    trial = trials[int(victim.data.tags["optuna_trial"])]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["run_id"] == victim.info.run_id
    assert trial.value == pytest.approx(resumed.data.metrics["val_loss"])
    history = client.get_metric_history(resumed.info.run_id, "val_loss")
    steps = {m.step: m.value for m in history}
    assert len(steps) == len(history)  # each evaluation logged once, before and after the move
    assert trial.intermediate_values == pytest.approx(steps)  # and reported to the pruner from both nodes
