"""Which experiments a command reads a study from and writes new runs to: decided once (study_scope), passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_experiment_name

from nanosweep.tracking.names import DEFAULT_EXPERIMENT
from nanosweep.tracking.store import TrackingError, ensure_experiment


def active_experiments() -> dict[str, str]:
    """Every active experiment of the store, id -> name."""
    client = MlflowClient()
    found, token = {}, None
    while True:
        page = client.search_experiments(ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        found.update((e.experiment_id, e.name) for e in page)
        token = page.token
        if not token:
            return found


@dataclass(frozen=True)
class StudyScope:
    """Where a command looks for a study's runs and where it puts new ones; decided once, by study_scope."""

    experiments: dict[str, str]  # id -> name of the experiments looked in: the named one, else every active one
    named: str | None  # the experiment named by --experiment, MLFLOW_EXPERIMENT_NAME or _ID; None: none was
    attached_experiment_id: str | None  # the experiment of the run `mlflow run` made for this process, if any

    @property
    def ids(self) -> list[str]:
        return list(self.experiments)

    def describe(self) -> str:
        """For messages: where the runs were looked for."""
        return f"experiment {self.named!r}" if self.named else "any experiment of the tracking store"

    def names(self, experiment_ids: set[str]) -> str:
        return ", ".join(repr(self.experiments.get(i, i)) for i in sorted(experiment_ids))

    def spread_error(self, what: str, experiment_ids: set[str]) -> TrackingError:
        """The one-line refusal when a member's runs lie in several experiments and none was named."""
        return TrackingError(
            f"{what} has runs in experiments {self.names(experiment_ids)}: choose one with --experiment NAME "
            "(or MLFLOW_EXPERIMENT_NAME)"
        )

    def home(self, holders: set[str], what: str = "the study", create: bool = True) -> str | None:
        """The experiment id new runs go into: the attached or named one, else the one already holding the runs
        (holders), else the CLI's default; refused when the runs lie in several experiments. create=False: None
        where that experiment does not exist yet (a dry run creates nothing)."""
        if self.attached_experiment_id:
            return self.attached_experiment_id
        if len(holders) > 1 and not self.named:
            raise self.spread_error(what, holders)
        if holders and not self.named:
            return next(iter(holders))
        name = self.named or DEFAULT_EXPERIMENT
        if create:
            return ensure_experiment(name)
        found = MlflowClient().get_experiment_by_name(name)
        return found.experiment_id if found is not None and found.lifecycle_stage == "active" else None


def chosen_experiment(experiment: str | None = None) -> str | None:
    """The experiment the user named: --experiment, else MLFLOW_EXPERIMENT_NAME, else MLFLOW_EXPERIMENT_ID (not
    under `mlflow run`, which sets it for every run it makes); None when none was named. Only an id is looked up."""
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    experiment_id = None if os.environ.get("MLFLOW_RUN_ID") else os.environ.get("MLFLOW_EXPERIMENT_ID")
    if name:
        try:  # MLflow's own rule for a name, before any store is opened (creating the experiment would refuse it)
            _validate_experiment_name(name)
        except MlflowException as exc:
            shown = name if len(name) <= 60 else f"{name[:60]}..."
            message = f"experiment {shown!r} ({len(name)} characters) is not allowed: {exc.message}"
            raise TrackingError(message) from None
        return name
    if not experiment_id:
        return name
    try:
        found = MlflowClient().get_experiment(experiment_id)
    except MlflowException:
        found = None
    if found is None or found.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLFLOW_EXPERIMENT_ID={experiment_id!r} is not an active experiment of {mlflow.get_tracking_uri()}: "
            "unset it or name an existing experiment"
        )
    return found.name


def study_scope(experiment: str | None = None) -> StudyScope:
    """The rule for where a study lives (README, "Where a study lives"), applied once per command.

    The experiment named (chosen_experiment) is the only one looked in; without one, every active experiment
    is. New runs go into the experiment `mlflow run` chose, else the named one, else where the member's runs
    already are, else `nanosweep` (StudyScope.home).
    """
    client = MlflowClient()
    attached = os.environ.get("MLFLOW_RUN_ID")
    attached_experiment = client.get_run(attached).info.experiment_id if attached else None
    name = chosen_experiment(experiment)
    if not name:
        return StudyScope(active_experiments(), None, attached_experiment)
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment {name!r} is deleted: restore it in the MLflow UI or choose another name")
    return StudyScope({found.experiment_id: name} if found else {}, name, attached_experiment)
