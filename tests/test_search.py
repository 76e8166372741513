"""Real searches as subprocesses: Optuna on SQLite beside a SQLite MLflow store, tiny models, pruning, kills."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from conftest import heartbeat_stopped
from helpers import PATIENCE, SWEEPS, finish, study_runs, wait_for, write_space
from nanosweep.study.optuna_study import SearchError, make_sampler, open_study, study_storage
from nanosweep.study.pruning import redacted
from nanosweep.study.space import SpaceError, load_space


def search(space: Path, *args: str, **popen) -> subprocess.Popen:
    argv = [sys.executable, "-m", "nanosweep", "search", "--space", str(space), *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def study(tmp_path: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def launched(s: optuna.Study) -> list:
    return [t for t in s.trials if "run_id" in t.user_attrs]


def test_a_search_nests_trials_under_one_parent_prunes_and_is_analysed(store, tmp_path):
    space = write_space(tmp_path)
    code, output = finish(search(space, "--trials", "6", "--sampler", "random", "--sampler-seed", "3"), PATIENCE)
    assert code == 0, output
    [parent] = study_runs("search")
    children = study_runs("search_trial")
    assert parent.info.run_name == "search-tiny" and parent.info.status == "FINISHED"
    assert parent.data.params["sampler"] == "random" and parent.data.params["pruner"] == "asha"
    assert parent.data.metrics["trials_complete"] + parent.data.metrics["trials_pruned"] == 6
    trials = {t.number: t for t in launched(study(tmp_path))}
    assert len(children) == 6 and len(trials) == 6
    pruned = [r for r in children if r.data.tags.get("pruned") == "true"]
    assert pruned, "ASHA pruned nothing among 6 trials with learning rates from 1e-5 to 1e-2"
    for run in children:
        tags = run.data.tags
        trial = trials[int(tags["optuna_trial"])]
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["search"] == "tiny"
        assert run.info.status == "FINISHED" and trial.user_attrs["run_id"] == run.info.run_id
        assert float(run.data.params["learning_rate"]) == trial.params["learning_rate"]
        steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_loss")]
        if run in pruned:
            at = int(tags["pruned_at_iter"])
            assert trial.state == optuna.trial.TrialState.PRUNED and 0 < at < 40 and max(steps) == at
            assert tags["nanosweep.end_reason"] == f"pruned by Optuna's asha pruner at iteration {at}"
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and max(steps) == 40
            assert trial.value == pytest.approx(run.data.metrics["val_loss"])
            artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
            assert {"ckpt.pt", "vocab.json", "samples", "loss_curve.png", "logs"} <= artifacts
        assert sorted(trial.intermediate_values) == sorted(steps)  # every evaluation reported as it happened

    code, output = finish(search(space, "--trials", "6"), PATIENCE)  # the same total again: nothing to do
    assert code == 0 and "search-tiny: nothing to run: 6 trial(s) ended" in output
    assert len(study_runs("search")) == 1

    argv = [sys.executable, "-m", "nanosweep", "analyze", "--search", "tiny", "--out", str(tmp_path / "results")]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "results" / "analysis-search-tiny"
    figures = {"optimization_history", "pruned_vs_completed", "param_importances", "parallel_coordinates"}
    assert {p.stem for p in (folder / "plots").glob("*.png")} == figures
    csv = (folder / "trials.csv").read_text().splitlines()
    assert csv[0].startswith("trial,state,val_loss,iterations,learning_rate,n_head,run_name,run_id")
    assert len(csv) == 7 and sum(",PRUNED," in line for line in csv) == len(pruned)
    best = min((t for t in trials.values() if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert f"Trial {best.number} reached validation loss **{best.value:.4f}**" in (folder / "report.md").read_text()
    assert "data:image/png;base64," in (folder / "report.html").read_text()


def test_sigkill_mid_trial_then_rerun_resumes_that_trial_and_reaches_the_total_without_repeats(store, tmp_path):
    space = write_space(tmp_path, iters=600, every=50)  # seconds of training after the first checkpoint: the kill lands
    args = ("--trials", "2", "--pruner", "none", "--sampler", "random", "--sampler-seed", "1")
    proc = search(space, *args, start_new_session=True)

    def cut_off_run():
        runs = [r for r in study_runs("search_trial") if r.info.status == "RUNNING"]
        return next((r for r in runs if int(r.data.tags.get("nanosweep.checkpoint_iter", 0)) >= 50), None)

    victim = wait_for(cut_off_run, PATIENCE)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: heartbeat_stopped(victim.info.run_id))
    [killed] = [t for t in launched(study(tmp_path)) if t.user_attrs["run_id"] == victim.info.run_id]
    assert killed.state == optuna.trial.TrialState.RUNNING  # nobody could tell Optuna

    code, output = finish(search(space, *args), PATIENCE)
    assert code == 0, output
    assert f"trial {killed.number} started (resume)" in output
    trials = launched(study(tmp_path))
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["config_hash"] for t in trials}) == 2  # no configuration trained twice
    runs = study_runs("search_trial")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.info.status != "RUNNING" for r in study_runs("search"))
    resumed = MlflowClient().get_run(victim.info.run_id)  # the same run and the same Optuna trial, finished
    assert resumed.data.tags["optuna_trial"] == str(killed.number)
    steps = [m.step for m in MlflowClient().get_metric_history(victim.info.run_id, "val_loss")]
    assert sorted(steps) == list(range(0, 601, 50))  # no gap, no duplicate across the kill
    parents = {r.info.status for r in study_runs("search")}
    assert parents == {"KILLED", "FINISHED"}
    assert resumed.data.tags["mlflow.parentRunId"] in {r.info.run_id for r in study_runs("search")}


def test_two_workers_never_train_the_same_configuration(store, tmp_path):
    space = write_space(tmp_path, iters=20, lr="{choices: [0.001, 0.003]}")  # 2 heads x 2 rates: 4 configurations
    args = ("--trials", "6", "--workers", "2", "--sampler", "random", "--sampler-seed", "0", "--pruner", "none")
    code, output = finish(search(space, *args), PATIENCE)
    assert code == 0, output
    assert "4 new, 2 at a time" in output  # 6 asked for, the space holds 4
    s = study(tmp_path)
    trials = launched(s)
    assert len(trials) == 4 and len({tuple(sorted(t.params.items())) for t in trials}) == 4
    rejected = [t for t in s.trials if "rejected" in t.user_attrs]
    assert rejected and all(t.user_attrs["rejected"].startswith("duplicate of trial") for t in rejected)
    assert sorted(r.info.status for r in study_runs("search_trial")) == ["FINISHED"] * 4


def test_a_grid_search_trains_the_whole_grid_once_and_ends_finished(store, tmp_path):
    space = write_space(tmp_path, iters=10, lr="{choices: [0.001, 0.003]}")  # 2 heads x 2 rates: 4 configurations
    args = ("--trials", "4", "--workers", "2", "--sampler", "grid", "--pruner", "none")
    code, output = finish(search(space, *args), PATIENCE)
    assert code == 0, output  # the last tell covers the grid: Optuna's grid sampler stopped an optimize() loop there
    trials = launched(study(tmp_path))
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials) == 4
    assert {t.state.name for t in trials} == {"COMPLETE"}
    [parent] = study_runs("search")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == 4


def test_tpe_in_a_small_space_trains_every_configuration_asked_for_instead_of_its_incumbent_again(store, tmp_path):
    space = write_space(tmp_path, iters=10, lr="{choices: [0.001, 0.003]}")  # 2 heads x 2 rates: 4 configurations
    args = ("--trials", "4", "--sampler", "tpe", "--sampler-seed", "0", "--pruner", "none")
    code, output = finish(search(space, *args), PATIENCE)
    assert code == 0, output
    s = study(tmp_path)
    trials = launched(s)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials) == 4
    rejected = [t for t in s.trials if "rejected" in t.user_attrs]
    assert len(rejected) <= 3  # each duplicate is followed by an untried configuration


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("params: {n_head: {choices: [2, 4]}}\nprofile: slow\n", "key 'profile' is 'slow': choose one of full, quick"),
        ("params: {n_heads: {choices: [2]}}\n", "key 'params.n_heads' is not a TrainConfig field"),
        ("params: {dropout: {low: 0.1}}\n", "key 'params.dropout' is {'low': 0.1}: use {choices: [...]} or"),
        ("params: {n_head: {low: 2, high: 8.5}}\n", "key 'params.n_head.high' must be an integer, got 8.5"),
        ("params: {weight_decay: {low: 0, high: 0.1, log: true}}\n", "key 'params.weight_decay': "),  # Optuna's
        ("params: {learning_rate: {low: 0, high: 0.1}}\n", "key 'params.learning_rate.low': learning_rate=0.0 is"),
        ("fixed: {max_iters: 0}\nparams: {n_head: {choices: [2]}}\n", "key 'fixed.max_iters': max_iters=0 is not"),
        ("fixed: {warmup_iters: 2.5}\nparams: {n_head: {choices: [2]}}\n", "warmup_iters=2.5 is not allowed: it"),
        ("fixed: {grad_clip: .nan}\nparams: {n_head: {choices: [2]}}\n", "grad_clip=nan is not allowed: it must"),
        ("params: {dropout: {choices: [0.1, 1.5]}}\n", "key 'params.dropout.choices': dropout=1.5 is not allowed"),
        ("params: {n_head: {choices: [2, 2]}}\n", "key 'params.n_head.choices' lists 2 twice: give each value once"),
        ("params: {n_head: {choices: [2]}}\nparams: {n_head: {choices: [4]}}\n", "key 'params' is given twice"),
        ("params: {seed: {choices: [1, 2]}}\n", "key 'params.seed' cannot be searched"),
        ("fixed: {n_head: 4}\nparams: {n_head: {choices: [2]}}\n", "key 'params.n_head' is also in 'fixed'"),
        ("objective: train_loss\nparams: {n_head: {choices: [2]}}\n", "key 'objective' is 'train_loss': only val_loss"),
        ("params: {}\n", "key 'params' must be a non-empty mapping of TrainConfig fields"),
        ("params: [n_head\n", "not valid YAML"),
    ],
)
def test_a_malformed_space_is_refused_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as refused:
        load_space(path)
    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_the_cli_refuses_a_malformed_space_in_one_line_and_writes_nothing(store, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("params: {dropout: {low: 0.5, high: 0.1}}\n")
    code, output = finish(search(path, "--trials", "2"), PATIENCE)
    assert code == 1 and output.startswith(f"Error: {path}: key 'params.dropout': ") and output.count("\n") == 1
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()
    code, output = finish(search(write_space(tmp_path), "--trials", "2", "--sampler", "grid"), PATIENCE)
    assert (code, output) == (
        1,
        f"Error: sampler='grid' needs choices for every param of {tmp_path / 'tiny.yaml'}; learning_rate is a range\n",
    )


def test_the_example_space_covers_the_study_dimensions_and_the_learning_rate():
    space = load_space(SWEEPS / "search" / "width_lr.yaml")
    study_dims = {"block_size", "n_layer", "n_head", "n_embd", "batch_size", "max_iters", "dropout"}
    assert set(space.params) == study_dims | {"learning_rate"}
    assert space.params["learning_rate"].log and space.name == "width_lr"


def test_the_study_sits_beside_a_sqlite_store_and_a_server_needs_a_database(monkeypatch):
    monkeypatch.delenv("NANOSWEEP_OPTUNA_STORAGE", raising=False)
    assert study_storage("sqlite:///mlflow.db", None) == "sqlite:///optuna.db"
    assert study_storage("sqlite:////data/runs/mlflow.db", None) == "sqlite:////data/runs/optuna.db"
    with pytest.raises(SearchError, match="http://127.0.0.1:5000 is not a local SQLite file.*--storage URL"):
        study_storage("http://127.0.0.1:5000", None)
    monkeypatch.setenv("NANOSWEEP_OPTUNA_STORAGE", "postgresql://u:secret@db/optuna")
    assert study_storage("http://127.0.0.1:5000", None) == "postgresql://u:secret@db/optuna"
    assert study_storage("http://127.0.0.1:5000", "sqlite:///x.db") == "sqlite:///x.db"
    assert "secret" not in redacted("postgresql://u:secret@db/optuna")


def test_a_changed_space_does_not_continue_the_old_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = load_space(write_space(tmp_path))
    open_study(space, storage, make_sampler("random", space, 0, 4), "asha")
    open_study(space, storage, make_sampler("tpe", space, 0, 4), "median")  # other sampler and pruner: same study
    changed = load_space(write_space(tmp_path, iters=80))
    with pytest.raises(SearchError, match="tiny.yaml changed since study 'tiny' started"):
        open_study(changed, storage, make_sampler("random", changed, 0, 4), "asha")
