"""Optuna inside a search trial's process: report each evaluation's val_loss to the pruner, stop when it says so.

Only `nanosweep train --optuna-study ...` imports this module, so grid trials never load Optuna.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import optuna
from optuna.storages import BaseStorage
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from nanosweep.group import RunObserver, StoppedEarly
from nanosweep.tracking.store import TrackingError, check_sqlite_file, first_line

PRUNERS = ("asha", "hyperband", "median", "none")
STORAGE_ENV = "NANOSWEEP_OPTUNA_STORAGE"  # the study's database: a search's default, and its trials' (never argv)
SQLITE_BUSY_SECONDS = 60  # the driver and K trial processes write one SQLite file; wait for the lock, do not fail
PRUNED_TAG = "pruned"  # "true" on a search trial's run that the pruner stopped
PRUNED_AT_TAG = "pruned_at_iter"  # the iteration it reached


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """Optuna's pruner for a --pruner name; the driver and the trial processes build the same one."""
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "median":
        return optuna.pruners.MedianPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner={name!r} is unknown: choose one of {', '.join(PRUNERS)}")


def redacted(url: str) -> str:
    """A database URL without its password, fit for a run's params and a message."""
    return make_url(url).render_as_string(hide_password=True)


def check_storage(url: str) -> None:
    """A database URL SQLAlchemy can open, its driver installed (and for SQLite a usable file), checked before
    anything is written: a search refused after it created its experiment would leave that behind."""
    usage = "give a database URL such as sqlite:///optuna.db or postgresql+psycopg://user:password@host/optuna"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise TrackingError(f"Optuna storage {url.split('@')[-1]!r} is not a database URL: {usage}") from None
    try:
        parsed.get_dialect().import_dbapi()
    except (NoSuchModuleError, ImportError) as exc:
        raise TrackingError(f"Optuna storage {redacted(url)} cannot be opened ({exc}): {usage}") from None
    if parsed.get_backend_name() == "sqlite":
        check_sqlite_file(url, "Optuna storage")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage at url, checked first; on SQLite, writers wait for each other instead of failing. One
    that cannot be opened (or created: its tables are made here) is refused in one line naming it."""
    check_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_SECONDS}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except SQLAlchemyError as exc:
        detail = first_line(getattr(exc, "orig", None) or exc)
        message = f"Optuna storage {redacted(url)} cannot be opened ({detail}): check it, or give another --storage"
        raise TrackingError(message) from None


class PruningObserver:
    """A RunObserver that passes everything on and reports each val_loss to the Optuna trial as it happens."""

    def __init__(self, inner: RunObserver, trial: optuna.trial.Trial, pruner: str):
        self.inner = inner
        self.trial = trial
        self.pruner = pruner

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.inner.log_metrics(metrics, step)
        if "val_loss" not in metrics:
            return
        self.trial.report(metrics["val_loss"], step)
        # iteration 0 is the untrained model: every trial looks alike there
        if step > 0 and self.trial.should_prune():
            raise StoppedEarly(
                f"pruned by Optuna's {self.pruner} pruner at iteration {step}",
                {PRUNED_TAG: "true", PRUNED_AT_TAG: str(step)},
            )

    def log_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.inner.log_checkpoint(checkpoint)


def live_trial(study: optuna.Study, backend: BaseStorage, number: int) -> optuna.trial.Trial:
    """Trial `number` of the study as a live Trial (to report to, or to note on), found by the storage's public API."""
    study_id = backend.get_study_id_from_name(study.study_name)
    return optuna.trial.Trial(study, backend.get_trial_id_from_study_id_trial_number(study_id, number))


def pruning_observer(study_name: str, number: int, pruner: str) -> Any:
    """A function wrapping a run's observer so that trial `number` of the Optuna study can prune it. The study's
    storage comes in the environment (STORAGE_ENV), never on the command line, which ps and Ray's dashboard show."""
    backend = open_storage(os.environ[STORAGE_ENV])
    study = optuna.load_study(study_name=study_name, storage=backend, pruner=make_pruner(pruner))
    trial = live_trial(study, backend, number)
    return lambda inner: PruningObserver(inner, trial, pruner)
