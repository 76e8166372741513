"""`nanosweep prepare`, `train` and `train-group`: one run, or a fused group of existing runs."""

from __future__ import annotations

import sys
from typing import Any

import click

from nanosweep.cli.options import (
    experiment_option,
    input_option,
    stops_cleanly,
    tracking_uri_option,
    train_config_options,
    user_errors,
)
from nanosweep.config import TrainConfig
from nanosweep.data import prepare
from nanosweep.tracking.names import DEFAULT_EXPERIMENT
from nanosweep.tracking.scope import chosen_experiment
from nanosweep.tracking.store import connect


@click.command("prepare")
@input_option
@user_errors
def prepare_command(input_path: str | None) -> None:
    """Verify tiny Shakespeare and write train/val ids and vocab.json once."""
    prepared = prepare(input_path)
    click.echo(f"prepared {prepared.root} (train.bin, val.bin, vocab.json)")


@click.command("train")
@train_config_options
@input_option
@tracking_uri_option
@experiment_option
@click.option("--run-id", default=None, help="train into this existing run, resuming from its checkpoint")
@click.option("--parent-run-id", default=None, help="nest the new run under this run")
# set by `nanosweep search` for its trial processes: report val_loss to this Optuna trial, which may prune the run
# (its storage comes in NANOSWEEP_OPTUNA_STORAGE)
@click.option("--optuna-study", default=None, hidden=True)
@click.option("--optuna-trial", type=int, default=None, hidden=True)
@click.option("--optuna-pruner", default="none", hidden=True)
@user_errors
@stops_cleanly("run ended KILLED")
def train_command(
    input_path: str | None,
    tracking_uri: str | None,
    experiment: str | None,
    run_id: str | None,
    parent_run_id: str | None,
    optuna_study: str | None,
    optuna_trial: int | None,
    optuna_pruner: str,
    **fields: Any,
) -> None:
    """Train one configuration as one MLflow run."""
    from nanosweep.tracking.recorder import run_trial

    cfg = TrainConfig(**fields)
    connect(tracking_uri, must_exist=run_id is not None)  # a new run is made in a new store, once
    new_runs_go_to = chosen_experiment(experiment) or DEFAULT_EXPERIMENT  # a train run is no grid point: no search
    watch = None
    if optuna_study is not None:  # a search trial; only then is Optuna imported
        from nanosweep.study.pruning import pruning_observer

        watch = pruning_observer(optuna_study, optuna_trial, optuna_pruner)
    run_id = run_trial(cfg, new_runs_go_to, run_id, parent_run_id, input_path=input_path, watch=watch)
    click.echo(f"{cfg.run_name}: run {run_id} FINISHED")


@click.command("train-group")
@click.option(
    "--trial",
    "trials",
    multiple=True,
    required=True,
    metavar="JSON",
    help='one run: {"run_id": ..., "config": {TrainConfig fields}}; all of one architecture and batch size',
)
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="a tag for every run (sweeps name the group)")
@input_option
@tracking_uri_option
@user_errors
@stops_cleanly("unfinished runs ended KILLED")
def train_group_command(
    trials: tuple[str, ...], tags: tuple[str, ...], input_path: str | None, tracking_uri: str | None
) -> None:
    """Train existing runs fused in one process, each ending on its own (what a sweep launches per group)."""
    from nanosweep.tracking.recorder import parse_trial_spec, run_group

    specs = [parse_trial_spec(text) for text in trials]
    bad = [t for t in tags if "=" not in t]
    if bad:
        raise click.ClickException(f"--tag {bad[0]!r} is not allowed: give KEY=VALUE")
    connect(tracking_uri, must_exist=True)
    statuses = run_group(specs, dict(t.split("=", 1) for t in tags), input_path)
    for cfg, run_id in specs:
        click.echo(f"{cfg.run_name}: run {run_id} {statuses[run_id]}")
    sys.exit(0 if set(statuses.values()) == {"FINISHED"} else 1)
