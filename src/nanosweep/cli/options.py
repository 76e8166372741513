"""What every command shares: the options, the one-line errors and a clean stop on SIGTERM or Ctrl-C."""

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
from nanosweep.data import DataError
from nanosweep.signals import Interrupted, signal_name, stop_signals
from nanosweep.study.executors.base import ExecutorError
from nanosweep.tracking.names import DEFAULT_EXPERIMENT
from nanosweep.tracking.open_runs import open_runs
from nanosweep.tracking.store import TrackingError, first_line, store_failure

USER_ERRORS = (ConfigError, DataError, TrackingError, ExecutorError)  # importer.StudyFormatError is a ConfigError


def failure_line(exc: Exception) -> str | None:
    """What slipped past the checks (a store, a disk or a file failing underneath) as one line naming what failed;
    None for anything else, a bug, which keeps its traceback."""
    if isinstance(exc, UnicodeDecodeError):  # nanosweep's own reads of the user's files name them (textfiles)
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8"
    if isinstance(exc, OSError):
        paths = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
        if not paths:
            return str(exc)
        return f"{paths}: {exc.strerror}: check the path, its permissions and the space left on its disk"
    optuna_errors = sys.modules.get("optuna.exceptions")  # only a search loads Optuna
    if optuna_errors and isinstance(exc, optuna_errors.StorageInternalError):  # its own words say little: the cause
        cause = exc.__cause__
        return f"the Optuna storage failed: {first_line(getattr(cause, 'orig', None) or cause or exc)}"
    return store_failure(exc)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the package's expected errors into click's one-line 'Error: ...' and exit status 1, and so whatever
    failure_line recognises: the last line of defence, behind the checks that refuse bad input before any write."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            line = failure_line(exc)
            if line is None:
                raise
            raise click.ClickException(line) from None

    return wrapper


def stops_cleanly(outcome: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """SIGTERM or Ctrl-C stops the command at whatever moment it comes: every run the command opened ends KILLED
    (an error ends them FAILED), then it says `outcome` and exits 130."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                with stop_signals.installed(), open_runs.ended_on_exit():
                    return command(*args, **kwargs)
            except (Interrupted, KeyboardInterrupt) as exc:
                name = click.get_current_context().info_name
                click.echo(f"{name} interrupted ({signal_name(exc)}): {outcome}", err=True)
                sys.exit(130)

        return wrapper

    return decorate


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


sweeps_dir_option = click.option(
    "--sweeps-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="folder of member YAML files (default: NANOSWEEP_SWEEPS_DIR, ./sweeps, else the checkout's sweeps/)",
)


storage_option = click.option(
    "--storage",
    default=None,
    help="Optuna study database URL (default: NANOSWEEP_OPTUNA_STORAGE, else optuna.db beside a SQLite tracking store)",
)


executor_option = click.option(
    "--executor",
    default="local",
    show_default=True,
    help="where trials run: local (processes here) or ray (tasks on a Ray cluster; pip install 'nanosweep[ray]')",
)


ray_address_option = click.option(
    "--ray-address",
    default=None,
    help="the Ray cluster, e.g. HEAD:6379 (default: RAY_ADDRESS, else the cluster `ray start` started on this "
    "machine, else a local Ray started for the command)",
)


experiment_option = click.option(
    "--experiment",
    default=None,
    help="MLflow experiment (else MLFLOW_EXPERIMENT_NAME / _ID); none named: look in every experiment "
    f"and write where the member's runs are, else {DEFAULT_EXPERIMENT!r} (README: Where a study lives)",
)


member_option = click.option(
    "--member", default="all", show_default=True, help="a member with finished runs in the store, or all"
)


profile_option = click.option(
    "--profile", default="auto", show_default=True, help="full or quick; auto: the only profile in the store"
)


def writable_folder(ctx: click.Context, param: click.Parameter, folder: Path) -> Path:
    """--out is written at the end of a command's work: refuse at once a folder that cannot be written, or made."""
    nearest = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not os.access(nearest, os.W_OK):  # False on a read-only file system, for root too
        made = "" if nearest == folder else f", so {folder} cannot be made there"
        raise click.BadParameter(f"{nearest} is not writable{made}: choose a folder you may write")
    return folder


out_option = click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    callback=writable_folder,
    default=Path("results"),
    show_default=True,
    help="folder for the study layout (nanoGPT_results_vijay_<member>/) and analysis-<member>/",
)
