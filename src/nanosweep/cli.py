"""`nanosweep` command line: thin wrappers over the package, one-line errors, non-zero exits."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from nanosweep.config import ConfigError, TrainConfig
from nanosweep.data import DataError, prepare
from nanosweep.tracking import DEFAULT_EXPERIMENT, TrackingError, connect

USER_ERRORS = (ConfigError, DataError, TrackingError)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the package's expected errors into click's one-line 'Error: ...' and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def train_config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One --option per TrainConfig field, with its default and help."""
    for field in reversed(dataclasses.fields(TrainConfig)):
        option = click.option(
            f"--{field.name.replace('_', '-')}",
            field.name,
            type=type(field.default),
            default=field.default,
            show_default=True,
            help=field.metadata["help"],
        )
        command = option(command)
    return command


input_option = click.option(
    "--input",
    "input_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="tiny Shakespeare input.txt (else NANOSWEEP_INPUT, the cache, or a download)",
)
tracking_uri_option = click.option(
    "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
)
experiment_option = click.option(
    "--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment name"
)


@click.group()
@click.version_option(package_name="nanosweep")
def main() -> None:
    """Hyperparameter studies of small GPTs on tiny Shakespeare, tracked in MLflow."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@main.command("prepare")
@input_option
@user_errors
def prepare_command(input_path: str | None) -> None:
    """Verify tiny Shakespeare and write train/val ids and vocab.json once."""
    prepared = prepare(input_path)
    click.echo(f"prepared {prepared.root} (train.bin, val.bin, vocab.json)")


@main.command("train")
@train_config_options
@input_option
@tracking_uri_option
@experiment_option
@click.option("--run-id", default=None, help="train into this existing run, resuming from its checkpoint")
@click.option("--parent-run-id", default=None, help="nest the new run under this run")
@user_errors
def train_command(
    input_path: str | None,
    tracking_uri: str | None,
    experiment: str,
    run_id: str | None,
    parent_run_id: str | None,
    **fields: Any,
) -> None:
    """Train one configuration as one MLflow run."""
    from nanosweep.trial import Interrupted, run_trial  # torch loads only for commands that train

    cfg = TrainConfig(**fields)
    connect(tracking_uri)
    try:
        run_id = run_trial(cfg, experiment, run_id, parent_run_id, input_path=input_path)
    except (Interrupted, KeyboardInterrupt) as exc:
        click.echo(f"interrupted ({exc.args[0] if exc.args else 'SIGINT'}): run ended KILLED", err=True)
        sys.exit(130)
    click.echo(f"{cfg.run_name}: run {run_id} FINISHED")


@main.command("sweep")
@click.option("--member", required=True, help="a member of sweeps/ (e.g. deep_large), or all")
@click.option("--profile", default="full", show_default=True, help="full (the study's recipe) or quick (CPU-sized)")
@click.option(
    "--workers", type=int, default=0, show_default=True, help="trials at once; 0 = one per GPU slot, or 1 on CPU"
)
@click.option("--trials-per-gpu", type=int, default=1, show_default=True, help="pack this many small trials per GPU")
@click.option(
    "--sweeps-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="folder of member YAML files (default: ./sweeps, else the project's)",
)
@click.option("--dry-run", is_flag=True, help="show what would run, resume or be skipped, and stop")
@input_option
@tracking_uri_option
@experiment_option
@user_errors
def sweep_command(
    member: str,
    profile: str,
    workers: int,
    trials_per_gpu: int,
    sweeps_dir: Path | None,
    dry_run: bool,
    input_path: str | None,
    tracking_uri: str | None,
    experiment: str,
) -> None:
    """Run a member's grid (or all): one child run per grid point under one parent run."""
    from nanosweep.grid import check_profile, default_sweeps_dir
    from nanosweep.sweep import SweepOptions, run_sweep
    from nanosweep.trial import Interrupted

    check_profile(profile)
    if workers < 0 or trials_per_gpu < 1:
        raise click.ClickException(
            f"workers={workers}, trials_per_gpu={trials_per_gpu} are not allowed: workers >= 0, trials_per_gpu >= 1"
        )
    connect(tracking_uri)
    opts = SweepOptions(
        member, profile, workers, trials_per_gpu, experiment, sweeps_dir or default_sweeps_dir(), input_path, dry_run
    )
    try:
        sys.exit(run_sweep(opts))
    except (Interrupted, KeyboardInterrupt) as exc:
        click.echo(
            f"sweep interrupted ({exc.args[0] if exc.args else 'SIGINT'}): rerun the same command to resume", err=True
        )
        sys.exit(130)
