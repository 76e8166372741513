"""Finished study runs read back from any tracking store into pandas: one row per run, histories on request.

Everything the analysis, download and register commands know about a study comes from here, so
they see exactly what the tracking store holds and never a local folder it does not know about.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from nanosweep.config import TRAIN_FIELDS, TrainConfig
from nanosweep.tracking.names import (
    CHECKPOINT,
    GLOBAL_ID_TAG,
    GRID_POSITION_TAG,
    IMPORTED_RUN,
    MEMBER_TAG,
    MODEL_RUN_KINDS,
    PROFILE_TAG,
    REPLICATE_TAG,
    RUN_KIND_TAG,
    TRAIN_RUN,
    TRIAL_RUN,
)
from nanosweep.tracking.scope import StudyScope, study_scope
from nanosweep.tracking.store import TrackingError, search_runs

RESULT_KINDS = (TRIAL_RUN, IMPORTED_RUN)  # runs that hold a trained configuration; sweeps and analyses do not
ALL_MEMBERS = "all"
AUTO_PROFILE = "auto"
CURVE_METRICS = ("train_loss", "val_loss")  # the evaluations: what loss curves and overfitting need
RUN_ID = re.compile(r"[0-9a-f]{32}")
HISTORY_THREADS = 8  # metric histories are one request per run and key; overlap them


class SelectionError(TrackingError):
    """The member, profile or run asked for is not in the tracking store; the message lists what is."""


def _row(run: Any) -> dict[str, Any] | None:
    """One run as a flat record, or None when it lacks the tags that place it in the study."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    if not all(key in tags for key in (MEMBER_TAG, PROFILE_TAG, GRID_POSITION_TAG, GLOBAL_ID_TAG)):
        return None
    name = run.info.run_name
    artifacts = run.info.artifact_uri.rstrip("/")
    row: dict[str, Any] = {
        "name": name,
        "member": tags[MEMBER_TAG],
        "profile": tags[PROFILE_TAG],
        "run_kind": tags.get(RUN_KIND_TAG, ""),
        "grid_position": int(tags[GRID_POSITION_TAG]),
        "global_id": int(tags[GLOBAL_ID_TAG]),
        "replicate": int(tags.get(REPLICATE_TAG, 1)),  # imported and older runs carry one seed: replicate 1
    }
    defaults = TrainConfig()
    for field in TRAIN_FIELDS:
        default = getattr(defaults, field)
        row[field] = type(default)(params[field]) if field in params else default
    row["total_params"] = int(float(params["total_params"])) if "total_params" in params else None
    row["train_loss"] = metrics.get("train_loss", float("nan"))
    row["val_loss"] = metrics.get("val_loss", float("nan"))
    row["loss_gap"] = row["val_loss"] - row["train_loss"]
    row["best_val_loss"] = metrics.get("best_val_loss", float("nan"))
    row.update(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        start_time=run.info.start_time,
        artifact_uri=artifacts,
        config_uri=f"{artifacts}/{name}.py",
        checkpoint_uri=f"{artifacts}/{CHECKPOINT}",
    )
    return row


def finished_runs(scope: StudyScope) -> pd.DataFrame:
    """Every FINISHED trial or imported run of the scope's experiments, all members and profiles."""
    runs = []
    for kind in RESULT_KINDS:  # MLflow's search has no OR
        runs += search_runs(scope.ids, f"attributes.status = 'FINISHED' and tags.{RUN_KIND_TAG} = '{kind}'")
    rows = [row for row in map(_row, runs) if row is not None]
    return pd.DataFrame(
        rows, columns=None if rows else ["name", "member", "profile", "grid_position", "global_id", "experiment_id"]
    )


def as_scope(where: StudyScope | str) -> StudyScope:
    """A scope, or an experiment name as shorthand for the scope naming it."""
    return study_scope(where) if isinstance(where, str) else where


def _in_scope(scope: StudyScope) -> StudyScope:
    """The scope, refused when the experiment it names does not exist."""
    if scope.named and not scope.experiments:
        raise SelectionError(
            f"experiment {scope.named!r} does not exist in {mlflow.get_tracking_uri()}: "
            "leave --experiment out to look in every experiment, or run a sweep into it first"
        )
    return scope


def resolve_profile(runs: pd.DataFrame, profile: str, where: str) -> str:
    """The profile asked for, or for 'auto' the only one present: analysis never mixes profiles."""
    present = sorted(runs["profile"].unique())
    if not present:
        raise SelectionError(f"{where} holds no finished trial or imported runs: run a sweep or import-results first")
    if profile == AUTO_PROFILE:
        if len(present) > 1:
            raise SelectionError(f"{where} holds runs of profiles {', '.join(present)}: choose one with --profile")
        return present[0]
    if profile not in present:
        raise SelectionError(f"profile={profile!r} has no finished runs in {where}: choose one of {', '.join(present)}")
    return profile


def member_order(runs: pd.DataFrame) -> list[str]:
    """Members in the study's order (by their lowest global id)."""
    return list(runs.groupby("member")["global_id"].min().sort_values(kind="stable").index)


def select(where: StudyScope | str, member: str = ALL_MEMBERS, profile: str = AUTO_PROFILE) -> pd.DataFrame:
    """The latest finished run per grid point and seed replicate of one member (or all) and one profile, in id order.

    A member whose runs lie in several experiments is refused unless the scope names one.
    """
    scope = _in_scope(as_scope(where))
    runs = finished_runs(scope)
    label = scope.describe()
    profile = resolve_profile(runs, profile, label)
    runs = runs[runs["profile"] == profile]
    if member != ALL_MEMBERS:
        if member not in set(runs["member"]):
            valid = ", ".join(member_order(runs))
            raise SelectionError(
                f"member={member!r} has no finished {profile} runs in {label}: choose one of {valid} or {ALL_MEMBERS}"
            )
        runs = runs[runs["member"] == member]
    for name, group in runs.groupby("member", sort=False):
        if group["experiment_id"].nunique() > 1:
            raise scope.spread_error(f"member {name!r} ({profile})", set(group["experiment_id"]))
    # a replicate trained twice (a rerun, or an import beside a sweep): the latest run is the result
    point = ["member", "grid_position", "replicate"]
    runs = runs.sort_values("start_time", kind="stable").drop_duplicates(point, keep="last")
    return runs.sort_values(["global_id", "grid_position", "replicate"], kind="stable").reset_index(drop=True)


def find_run(where: StudyScope | str, name_or_id: str) -> tuple[str, str]:
    """(run id, run name) of a run given by its id, or of the latest finished run of that name that holds a model
    (a sweep trial, a `nanosweep train` run or an imported one) in the scope's experiments."""
    if RUN_ID.fullmatch(name_or_id):
        try:
            run = MlflowClient().get_run(name_or_id)
            return run.info.run_id, run.info.run_name
        except MlflowException:  # not an id after all: try it as a name
            pass
    scope = _in_scope(as_scope(where))
    named = []
    if "'" not in name_or_id:  # run names are the study's; a quote cannot be one and would break the filter
        named = search_runs(scope.ids, f"attributes.status = 'FINISHED' and attributes.run_name = '{name_or_id}'")
    # runs of `mlflow run . -e train` made before run_kind existed have no kind: they hold a model too
    named = [r for r in named if r.data.tags.get(RUN_KIND_TAG, TRAIN_RUN) in MODEL_RUN_KINDS]
    if not named:
        raise SelectionError(
            f"no finished run named {name_or_id!r} in {scope.describe()} (nor a run with that id): "
            "give a run name such as b64_L4_H4_E128_BS8_MI1000_D10_s1 or a 32-character run id"
        )
    latest = max(named, key=lambda r: r.info.start_time)
    return latest.info.run_id, latest.info.run_name


def histories(run_ids: list[str], keys: tuple[str, ...] = CURVE_METRICS) -> pd.DataFrame:
    """Metric histories as a long table (run_id, key, step, value), sorted; requests overlap in threads."""
    client = MlflowClient()

    def fetch(job: tuple[str, str]) -> list[tuple[str, str, int, float]]:
        run_id, key = job
        return [(run_id, key, m.step, m.value) for m in client.get_metric_history(run_id, key)]

    jobs = [(run_id, key) for run_id in run_ids for key in keys]
    with ThreadPoolExecutor(HISTORY_THREADS) as pool:
        points = [point for chunk in pool.map(fetch, jobs) for point in chunk]
    table = pd.DataFrame(points, columns=["run_id", "key", "step", "value"])
    return table.sort_values(["run_id", "key", "step"], kind="stable").reset_index(drop=True)
