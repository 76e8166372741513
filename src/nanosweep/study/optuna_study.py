"""The search's Optuna study: its storage, sampler and space check, and what the search notes on its trials
(their runs, iterations, and why a proposal was not trained).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from nanosweep.config import ConfigError
from nanosweep.filelocks import create_once, sqlite_file
from nanosweep.study.pruning import (
    PRUNED_AT_TAG,
    PRUNED_TAG,
    STORAGE_ENV,
    check_storage,
    live_trial,
    make_pruner,
    open_storage,
)
from nanosweep.study.space import SearchSpace
from nanosweep.tracking.heartbeat import alive
from nanosweep.tracking.run import TrackedRun

SAMPLERS = ("tpe", "random", "grid", "cmaes")
# Optuna user attributes of a study's trials
RUN_ID_ATTR = "run_id"  # the MLflow run of a launched trial
RUN_NAME_ATTR = "run_name"  # and its name
CONFIG_HASH_ATTR = "config_hash"  # TrainConfig.config_hash: no two launched trials share one
ITERATIONS_ATTR = "iterations"  # iterations the trial trained (the iteration where it was pruned, or max_iters)
REJECTED_ATTR = "rejected"  # why a proposal was not trained (duplicate, invalid); such trials do not count


class SearchError(ConfigError):
    """A search cannot start as asked; the message names the value and what is allowed."""


def study_storage(tracking_uri: str, storage: str | None) -> str:
    """--storage, else NANOSWEEP_OPTUNA_STORAGE, else optuna.db beside a SQLite tracking store's file."""
    storage = storage or os.environ.get(STORAGE_ENV)
    if storage:
        return storage
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    raise SearchError(
        f"tracking URI {tracking_uri} is not a local SQLite file, so the study has no default database: "
        f"pass --storage URL or set {STORAGE_ENV} (e.g. postgresql+psycopg://user:pass@host/optuna)"
    )


class AskAndTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for a driver that asks and tells. Its after_trial only stops an optimize() loop once
    the grid is covered (Study.stop, which raises outside one, so the last tell of a whole grid failed); a search
    stops by its own count, which a grid's size caps."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        """Nothing to stop: there is no optimize() loop."""


def make_sampler(name: str, space: SearchSpace, seed: int | None, trials: int) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for a --sampler name (refused here when the space or the installation cannot serve it)."""
    if name == "tpe":
        # constant_liar: running trials count as bad, so parallel workers spread out; a small search starts
        # modelling after a quarter of its trials rather than Optuna's fixed 10 random ones
        startup = max(1, min(10, trials // 4))
        return optuna.samplers.TPESampler(n_startup_trials=startup, constant_liar=True, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        ranges = [n for n, d in space.params.items() if not isinstance(d, optuna.distributions.CategoricalDistribution)]
        if ranges:
            raise SearchError(f"sampler='grid' needs choices for every param of {space.path}; {ranges[0]} is a range")
        return AskAndTellGridSampler({n: d.choices for n, d in space.params.items()}, seed=seed)
    if name == "cmaes":
        if importlib.util.find_spec("cmaes") is None:
            raise SearchError("sampler='cmaes' needs the cmaes package: pip install 'nanosweep[search]'")
        return optuna.samplers.CmaEsSampler(seed=seed)
    raise SearchError(f"sampler={name!r} is unknown: choose one of {', '.join(SAMPLERS)}")


def open_backend(storage: str) -> BaseStorage:
    """The study's storage, opened; a new SQLite database for it is made once and whole (filelocks.create_once),
    whoever starts at the same time."""
    check_storage(storage)  # a bad URL is named as such, before any file is made for it
    database = sqlite_file(storage)
    if database is not None:
        create_once(database, lambda path: open_storage(f"sqlite:///{path}").engine.dispose())
    return open_storage(storage)


def open_study(
    space: SearchSpace, storage: str | BaseStorage, sampler: optuna.samplers.BaseSampler, pruner: str
) -> optuna.Study:
    """The space's study, created on the first search and continued by every later one with the same space."""
    study = optuna.create_study(
        storage=open_backend(storage) if isinstance(storage, str) else storage,
        study_name=space.name,
        sampler=sampler,
        pruner=make_pruner(pruner),
        direction="minimize",
        load_if_exists=True,
    )
    recorded = study.user_attrs.get("space_digest")
    if recorded is None:
        study.set_user_attr("space_digest", space.digest)
        study.set_user_attr("space_file", str(space.path))
    elif recorded != space.digest:
        raise SearchError(
            f"{space.path} changed since study {space.name!r} started (digest {recorded}, now {space.digest}): "
            "restore it, or save the new space under another file name to start a new study"
        )
    return study


def launched(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that were trained (or are training): those with a run."""
    return [t for t in study.get_trials(deepcopy=False) if RUN_ID_ATTR in t.user_attrs]


def tell(study: optuna.Study, backend: BaseStorage, trial: FrozenTrial, info: Any) -> str:
    """Hand an ended run's result to Optuna; a KILLED run stays RUNNING there, to be resumed. Returns its state."""
    status, tags, metrics = info.info.status, info.data.tags, info.data.metrics
    if status == "FINISHED" and tags.get(PRUNED_TAG) == "true":
        live_trial(study, backend, trial.number).set_user_attr(ITERATIONS_ATTR, int(tags[PRUNED_AT_TAG]))
        study.tell(trial.number, state=TrialState.PRUNED)  # its value: the last val_loss it reported
        return "PRUNED"
    if status == "FINISHED" and "val_loss" in metrics:
        iterations = int(info.data.params["max_iters"])
        live_trial(study, backend, trial.number).set_user_attr(ITERATIONS_ATTR, iterations)
        study.tell(trial.number, metrics["val_loss"])
        return "COMPLETE"
    if status in ("FINISHED", "FAILED"):
        study.tell(trial.number, state=TrialState.FAIL)
        return "FAIL"
    return status


def settle(study: optuna.Study, backend: BaseStorage) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
    """Trials a killed search left RUNNING in Optuna: tell those whose run ended; return (to resume, busy)."""
    resume, busy = [], []
    for trial in launched(study):
        if trial.state != TrialState.RUNNING:
            continue
        info = TrackedRun(trial.user_attrs[RUN_ID_ATTR]).info()
        if info.info.status == "RUNNING" and alive(info.data.tags):
            busy.append(trial)
        elif tell(study, backend, trial, info) in ("RUNNING", "KILLED"):
            resume.append(trial)
    return resume, busy


def reject(study: optuna.Study, trial: optuna.trial.Trial, reason: str) -> None:
    """A proposal that will not be trained: failed in Optuna, with the reason, and not counted."""
    trial.set_user_attr(REJECTED_ATTR, reason)
    study.tell(trial, state=TrialState.FAIL)
