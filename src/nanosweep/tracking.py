"""Everything nanosweep writes to MLflow goes through here: connection, experiments, one run's log."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag, ViewType
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.uri import get_uri_scheme
from mlflow.utils.validation import _validate_experiment_name

from nanosweep.checkpoint import load_checkpoint, mismatch, save_checkpoint
from nanosweep.filelocks import OwnedFolder, create_once, database_exists, sqlite_file
from nanosweep.stopping import Interrupted, signal_name, stop_signals

if TYPE_CHECKING:
    from nanosweep.config import TrainConfig
    from nanosweep.model import GPT

DEFAULT_EXPERIMENT = "nanosweep"
PARENT_RUN_TAG = "mlflow.parentRunId"
CHECKPOINT = "ckpt.pt"
METRIC_BATCH = 500  # points per log_batch call; MLflow's own limit is 1000
FLUSH_SECONDS = 2.0  # a buffered metric reaches the store this soon at the latest: the UI charts runs live
# the metric a study compares: logged first, so a SQLite store lists it first and the MLflow UI's compare
# view (which preselects the first metric the runs share) plots it in parallel coordinates by default
PRIMARY_METRIC = "val_loss"
# what resuming reads, and checks against the run (checkpoint.mismatch)
CHECKPOINT_KEYS = ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "config", "rng", "eval_losses")

# Tags that place a run in the study; analysis filters on them (`tags.member = 'deep_large'`).
MEMBER_TAG = "member"  # shallow_small, deep_small, ... (a file in sweeps/)
PROFILE_TAG = "profile"  # full (the study's recipe) or quick (CPU-sized); never mixed in analysis
GRID_POSITION_TAG = "grid_position"  # 1-based position in the member's grid, also the seed
GLOBAL_ID_TAG = "global_id"  # the study's id across members (1-128)
REPLICATE_TAG = "replicate"  # 1-based seed replicate of the grid point; runs without it are replicate 1
CONFIG_HASH_TAG = "config_hash"  # TrainConfig.config_hash: equal hashes train the same thing
RUN_KIND_TAG = "run_kind"  # trial (of a sweep), train (nanosweep train alone), sweep, analysis or imported
MODEL_RUN_KINDS = ("trial", "train", "imported")  # runs that hold a trained model, named by `sample --name`
HOST_TAG = "nanosweep.host"  # machine of the process training the run (for people: liveness is the heartbeat)
PID_TAG = "nanosweep.pid"  # its process id there
FUSED_GROUP_TAG = "fused_group"  # runs with the same value trained together as one stacked model
EXECUTOR_TAG = "executor"  # local or ray: what ran the trial's process
NODE_TAG = "node"  # where: the host name (local) or the Ray node id
RESUMED_FROM_TAG = "nanosweep.resumed_from"  # the checkpoint iteration the run's last process continued from
END_REASON_TAG = "nanosweep.end_reason"  # why the run's last process ended it FAILED or KILLED (or stopped it early)
# A RUNNING run is alive while its trial process or its driver (sweep, search) keeps this tag fresh: unix
# seconds, stamped every heartbeat_seconds(). Older than STALE_BEATS beats, it is dead wherever it ran and is
# resumed from its checkpoint. Machines' clocks must agree to well within that (NTP).
HEARTBEAT_TAG = "nanosweep.heartbeat"
HEARTBEAT_ENV = "NANOSWEEP_HEARTBEAT_SECONDS"  # the beat; the same on every machine of a study
DEFAULT_HEARTBEAT_SECONDS = 15.0
STALE_BEATS = 4  # missed beats before a run counts as dead: 60 s by default
# the stores MLflow itself opens ("" and file: the folder store); a database URL's +driver does not count
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "file", "")
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
STALLED_SECONDS = 10.0  # a half-made SQLite store nobody has written to for this long is no creation in progress


def heartbeat_seconds() -> float:
    """The beat: NANOSWEEP_HEARTBEAT_SECONDS, else 15 s."""
    return float(os.environ.get(HEARTBEAT_ENV) or DEFAULT_HEARTBEAT_SECONDS)


def heartbeat_now() -> dict[str, str]:
    """The heartbeat tag, stamped now."""
    return {HEARTBEAT_TAG: f"{time.time():.1f}"}


def heartbeat_age(tags: dict[str, str]) -> float | None:
    """Seconds since the run's last heartbeat; None when it never had one."""
    try:
        return time.time() - float(tags[HEARTBEAT_TAG])
    except (KeyError, ValueError):
        return None


def alive(tags: dict[str, str]) -> bool:
    """Is someone still training this RUNNING run (wherever it runs)? Its heartbeat says, within the stale limit."""
    age = heartbeat_age(tags)
    return age is not None and age <= STALE_BEATS * heartbeat_seconds()


class Heartbeat:
    """Keeps the heartbeat tag of runs fresh from a daemon thread for as long as the `with` block of a process
    that trains or drives them: the runs given, and those `also` returns at each beat. A beat that cannot reach
    the store is skipped."""

    def __init__(self, run_ids: Iterable[str], also: Callable[[], Iterable[str]] | None = None) -> None:
        self.run_ids = list(run_ids)
        self.also = also
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat_until_stopped, name="heartbeat", daemon=True)

    def beat(self) -> None:
        targets = [*self.run_ids, *(self.also() if self.also else ())]
        client, tags = MlflowClient(), [RunTag(k, v) for k, v in heartbeat_now().items()]
        for run_id in targets:
            try:
                client.log_batch(run_id, tags=tags)
            except Exception:  # a store briefly away, a run deleted: a dead heartbeat thread would be worse
                pass

    def _beat_until_stopped(self) -> None:
        while not self._stopped.wait(heartbeat_seconds()):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._thread.join()


# MLflow's set_terminated shuts down the process-wide queue of asynchronous logging; a sibling run of a fused
# group logging asynchronously at that moment fails ("cannot schedule new futures after shutdown"). Both hold this.
_ASYNC_LOGGING = threading.Lock()


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or holds something we refuse to touch."""


class CheckpointUnreadable(TrackingError):
    """A cut-off run's ckpt.pt cannot be loaded: its training cannot continue in that run."""


def check_sqlite_file(url: str, what: str) -> None:
    """A SQLite URL names a SQLite database, or a file that can be created: one in an existing folder we may write.

    Checked before anything opens it, since opening creates the file; `what` names the URL in the refusal.
    """
    from sqlalchemy.engine import make_url  # only for SQLite URLs: no cost to a command that has none

    database = make_url(url).database
    if not database or database == ":memory:":
        return
    path = Path(database)
    if path.is_dir():
        raise TrackingError(f"{what} {url} names a folder, not a database file: give sqlite:///{path}/NAME.db")
    if path.exists():
        with path.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
        if header and header != SQLITE_HEADER:
            raise TrackingError(
                f"{what} {url}: {path} is not a SQLite database: give an MLflow store's file or a new path"
            )
        return
    if not path.parent.is_dir():
        raise TrackingError(f"{what} {url}: folder {path.parent} does not exist: create it or give another path")
    if not os.access(path.parent, os.W_OK):  # False on a read-only file system, for root too
        raise TrackingError(
            f"{what} {url}: folder {path.parent} is not writable, and a new database is created there: "
            "give a path in a writable folder"
        )


def check_tracking_uri(uri: str) -> None:
    """Refuse a tracking URI MLflow cannot use, in one line, before anything opens it (and so creates a store)."""
    try:
        scheme = get_uri_scheme(uri)
    except MlflowException:  # a database URL with two +drivers
        scheme = None
    if scheme not in TRACKING_SCHEMES:
        raise TrackingError(
            f"tracking URI {uri!r} is not one MLflow can use: give sqlite:///PATH, http(s)://HOST:PORT of a "
            "tracking server, or a database URL such as postgresql://user:password@host/db"
        )
    if scheme in ("", "file") and not MLFLOW_ALLOW_FILE_STORE.get():
        raise TrackingError(
            f"tracking URI {uri!r} is a folder store (like ./mlruns), which MLflow 3 no longer opens: give "
            "sqlite:///mlflow.db (`mlflow migrate-filestore` moves old runs), or set MLFLOW_ALLOW_FILE_STORE=true"
        )
    if scheme == "sqlite":
        check_sqlite_file(uri, "tracking URI")


def connect(tracking_uri: str | None = None, must_exist: bool = False) -> str:
    """Use tracking_uri (else MLFLOW_TRACKING_URI, else MLflow's sqlite:///mlflow.db); fail fast if a server is down.

    Nothing is created here: a command that writes calls ensure_store once its input is checked. must_exist: a
    command that only reads refuses a SQLite store that is not there (rather than making an empty one).
    """
    uri = tracking_uri or mlflow.get_tracking_uri()
    check_tracking_uri(uri)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # also exported to the environment, for trial processes
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except ValueError as exc:  # a port above 65535, or not a number
            message = f"tracking URI {uri} has no valid port ({exc}): give {parsed.scheme}://HOST:PORT"
            raise TrackingError(message) from None
        try:
            socket.create_connection((parsed.hostname, port), timeout=5).close()
        except OSError as exc:
            raise TrackingError(
                f"tracking server {uri} is unreachable ({exc.strerror or exc}): start it or point "
                "--tracking-uri / MLFLOW_TRACKING_URI at a running one"
            ) from None
        try:  # a server with basic auth refuses every request without credentials
            MlflowClient(uri).search_experiments(max_results=1)
        except MlflowException as exc:
            if exc.get_http_status_code() not in (401, 403):
                raise
            raise TrackingError(
                f"tracking server {uri} refused the request (HTTP {exc.get_http_status_code()}): "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
    store = sqlite_file(uri)
    if store is not None and database_exists(store):
        check_store_is_whole(store)
    elif store is not None and must_exist:
        raise TrackingError(
            f"no tracking store at {store.resolve()} ({uri}): nothing has been tracked there; run where the store "
            "is, or point --tracking-uri / MLFLOW_TRACKING_URI at it"
        )
    return uri


def store_failure(exc: BaseException) -> str | None:
    """A failure of the tracking store (MLflow's refusal, or the database under it) as one line naming the store;
    None when exc is something else. The command line's last line of defence; checks up front come first."""
    uri = mlflow.get_tracking_uri()
    if isinstance(exc, MlflowException):
        return f"tracking store {uri} failed: {first_line(exc.message)}"
    database_errors = sys.modules.get("sqlalchemy.exc")  # loaded by whatever opened a database, else none failed
    if database_errors and isinstance(exc, database_errors.SQLAlchemyError):
        return f"tracking store {uri} failed: {first_line(getattr(exc, 'orig', None) or exc)}"
    return None


def first_line(message: object) -> str:
    """An error's first line, at most 300 characters: MLflow and SQLAlchemy add the SQL and a link below."""
    lines = str(message).strip().splitlines()
    return lines[0][:300] if lines else ""


def check_store_is_whole(store: Path) -> None:
    """Refuse a SQLite store left half-made: its creation was cut off (a kill, or processes creating it at once, by
    MLflow itself or before ensure_store), so its schema is short of MLflow's, and it holds no runs. One that another
    process is making at this moment (say `mlflow ui`, started at the same time) is waited for: a store is judged only
    once nobody has written to it for STALLED_SECONDS. One of another MLflow version that holds runs is left to
    MLflow, which upgrades or names it."""
    from mlflow.store.db.utils import _get_latest_schema_revision  # MLflow's own check of a store's schema

    head = _get_latest_schema_revision()
    seen, still_since = None, time.monotonic()
    while True:
        state = _store_schema(store)
        if state is None:
            return  # not a SQLite database at all: MLflow says so
        revision, tables, runs, writing = state
        if revision == head or runs:
            return
        if writing or (revision, tables) != seen:
            seen, still_since = (revision, tables), time.monotonic()
        elif time.monotonic() - still_since >= STALLED_SECONDS:
            raise TrackingError(
                f"tracking store {store.resolve()} was left half-made (schema revision {revision or 'none'}, MLflow "
                f"{mlflow.__version__} makes {head}) and holds no runs: its creation was cut off by a kill or by "
                f"another process creating it at the same time. Delete it (rm {store}) and run again: the store is "
                "then made whole, once"
            )
        time.sleep(0.2)


def _store_schema(store: Path) -> tuple[str | None, int, int, bool] | None:
    """(alembic revision, tables, runs, someone writing to it now) of a SQLite store; None when it is no database."""
    try:
        with contextlib.closing(sqlite3.connect(store, timeout=1)) as db:  # rolls back a killed writer's journal
            db.execute("BEGIN IMMEDIATE")  # at once, unless another process is writing to it (making it) now
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            versions = db.execute("SELECT version_num FROM alembic_version") if "alembic_version" in tables else []
            revision = next((version for (version,) in versions), None)
            runs = db.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
            db.rollback()
    except sqlite3.OperationalError:  # locked: it is being written to
        return None, 0, 0, True
    except sqlite3.DatabaseError:  # not a SQLite database at all
        return None
    return revision, len(tables), runs, False


def ensure_store() -> None:
    """Create the tracking URI's SQLite store if it is missing, exactly once and whole (filelocks.create_once):
    concurrent first use and a kill at any moment leave no store or a complete one. A server migrates its own.
    Commands that write call this once their input is checked, so a refused command creates no store."""
    store = sqlite_file(mlflow.get_tracking_uri())
    if store is not None and not create_once(store, _build_sqlite_store):
        check_store_is_whole(store)  # made by someone else since connect looked: perhaps by MLflow, not whole yet


def store_missing() -> bool:
    """The tracking URI names a SQLite store that is not there yet: nothing has been tracked (and a look must not
    make it)."""
    store = sqlite_file(mlflow.get_tracking_uri())
    return store is not None and not database_exists(store)


def _build_sqlite_store(path: Path) -> None:
    """MLflow's schema and Default experiment in a new SQLite file, as MLflow makes them on first use."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    built = SqlAlchemyStore(f"sqlite:///{path}", DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
    built.engine.dispose()  # no connection may outlive the rename to its final name


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it once (do this in the parent before trials start: SQLite races)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment {name!r} is deleted: restore it in the MLflow UI or choose another name")
    return experiment.experiment_id


def search_runs(experiment_ids: list[str], filter_string: str) -> list[Any]:
    """Every run matching filter_string (MLflow search syntax), across all result pages."""
    client = MlflowClient()
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def existing_run(run_id: str, what: str = "run") -> Any:
    """The active run with this id; refused in one line when the store has none (a typo, another store). A SQLite
    store that is not there holds no run, and is not made by looking."""
    run = None
    if not store_missing():
        try:
            run = MlflowClient().get_run(run_id)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
    if run is None or run.info.lifecycle_stage == "deleted":
        raise TrackingError(
            f"{what} {run_id!r} is not an active run of {mlflow.get_tracking_uri()}: give the id of an existing run"
        )
    return run


CLAIM_PREFIX = "nanosweep.claim"  # claims are experiments named nanosweep.claim/<experiment id>/<scope>/<hash>/<n>
CLAIM_DRIVER_TAG = "nanosweep.driver"  # on a claim: the parent run of the sweep or search that made it


@dataclass(frozen=True)
class Claim:
    number: int  # the point's claims are numbered 1, 2, ... in the order they were taken
    driver: str  # the parent run id of the sweep or search that took it


class Claims:
    """Which driver (sweep or search) may launch a point: one configuration (its config hash) of one scope (a
    sweep's profile, or search-<name>) in one experiment. README, "Claims: one driver per point".

    A claim is an experiment whose name says which point and which claim number it is: MLflow refuses to create
    an experiment whose name exists (deleted ones included), so of drivers taking the same number, exactly one
    succeeds. Each claim is deleted at once: out of the UI, its name kept. The latest claim of a point stands for
    as long as its driver lives (its parent run RUNNING with a fresh heartbeat). Read the claims before the runs:
    whoever launched since this read took the next number first, so this driver's take of it fails.
    """

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str, str], Claim] = {}  # (experiment id, scope, config hash) -> latest claim
        self._alive: dict[str, bool] = {}  # driver -> alive, looked up once
        client, token = MlflowClient(), None
        while True:
            page = client.search_experiments(
                ViewType.ALL, max_results=1000, filter_string=f"name LIKE '{CLAIM_PREFIX}/%'", page_token=token
            )
            for experiment in page:
                self._note(experiment.name, experiment.tags.get(CLAIM_DRIVER_TAG, ""))
            token = page.token
            if not token:
                return

    def _note(self, name: str, driver: str) -> None:
        *point, number = name.removeprefix(f"{CLAIM_PREFIX}/").split("/")
        if len(point) < 3 or not number.isdigit():
            return  # not one of ours
        key = (point[0], "/".join(point[1:-1]), point[-1])
        if key not in self.latest or int(number) > self.latest[key].number:
            self.latest[key] = Claim(int(number), driver)

    def holder(self, experiment_id: str, scope: str, config_hash: str) -> str | None:
        """The driver whose claim on the point stands (it is the latest, and its driver lives), if any."""
        claim = self.latest.get((experiment_id, scope, config_hash))
        if claim is None:
            return None
        if claim.driver not in self._alive:
            try:
                run = MlflowClient().get_run(claim.driver)
                self._alive[claim.driver] = run.info.status == "RUNNING" and alive(run.data.tags)
            except MlflowException:  # its run is gone: so is it
                self._alive[claim.driver] = False
        return claim.driver if self._alive[claim.driver] else None

    def take(self, experiment_id: str, scope: str, config_hash: str, driver: str) -> str:
        """Claim the point for driver: the next number after the latest one read. Returns the driver holding that
        claim now: driver itself, or the one that took it first."""
        key = (experiment_id, scope, config_hash)
        number = self.latest[key].number + 1 if key in self.latest else 1
        name = f"{CLAIM_PREFIX}/{experiment_id}/{scope}/{config_hash}/{number}"
        client = MlflowClient()
        with stop_signals.deferred():  # created and deleted in one step
            try:
                client.delete_experiment(client.create_experiment(name, tags={CLAIM_DRIVER_TAG: driver}))
                winner = driver
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                existing = client.get_experiment_by_name(name)  # a retried request of ours, or another driver's
                winner = existing.tags.get(CLAIM_DRIVER_TAG, "") if existing else ""
                if winner == driver and existing.lifecycle_stage == "active":
                    client.delete_experiment(existing.experiment_id)
        self._note(name, winner)
        self._alive.setdefault(winner, True)  # it took the claim just now
        return winner


def run_experiment_id(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.experiment_id


def experiment_name(experiment_id: str) -> str:
    return MlflowClient().get_experiment(experiment_id).name


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


class OpenRuns:
    """The runs this process created or took over and has not ended yet.

    TrackedRun.create and take_over add a run in the same step as they make it RUNNING (a stop signal waits for
    that step), and TrackedRun.finish removes it. A command that leaves `ended_on_exit` by an exception ends every
    run it opened that is still RUNNING: KILLED when a stop signal came, FAILED on an error. So whatever moment
    SIGTERM or Ctrl-C comes at, no run is left behind RUNNING.
    """

    def __init__(self) -> None:
        self._runs: dict[str, TrackedRun] = {}

    def add(self, run: TrackedRun) -> None:
        self._runs[run.run_id] = run

    def discard(self, run_id: str) -> None:
        """The run is ended, or another process ended it (a trial that exited): nothing left to do for it."""
        self._runs.pop(run_id, None)

    @contextlib.contextmanager
    def ended_on_exit(self) -> Iterator[None]:
        before = set(self._runs)
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, (Interrupted, KeyboardInterrupt)):
                status, reason = "KILLED", f"interrupted by {signal_name(exc)}"
            else:
                status, reason = "FAILED", f"{type(exc).__name__}: {exc}"
            with stop_signals.deferred():
                for run in [run for run_id, run in self._runs.items() if run_id not in before]:
                    # a trial process may have ended it already (this is its driver): only RUNNING ones are left
                    with contextlib.suppress(Exception):  # the store may be what failed: the error below says so
                        if run.info().info.status == "RUNNING":
                            run.finish(status, reason)
                    self.discard(run.run_id)
            raise


open_runs = OpenRuns()


class TrackedRun:
    """One MLflow run seen from a training process: params, batched async metrics, artifacts, end status."""

    def __init__(self, run_id: str):
        self.client = MlflowClient()
        self.run_id = run_id
        self._buffer: list[Metric] = []
        self._pending: list[Any] = []  # async logging operations to wait for
        self._lock = threading.Lock()  # the buffer is flushed by the training thread and by a timer
        self._timer: threading.Timer | None = None  # flushes what log_metrics buffered FLUSH_SECONDS ago
        self._flush_error: BaseException | None = None  # a timer flush that failed, re-raised by flush_and_wait
        self._upload: threading.Thread | None = None
        self._upload_error: BaseException | None = None
        self._scratch: OwnedFolder | None = None  # made when a checkpoint passes through, removed at the end
        self._last_step: dict[str, int] | None = None  # read on the first metric logged
        self.ended = False  # finish() has set the run's final status

    def _steps_logged(self) -> dict[str, int]:
        """The last step of each metric already in the run (a resumed run): no step is logged twice."""
        if self._last_step is None:
            metrics = self.info().data.metrics
            self._last_step = {
                key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in metrics
            }
        return self._last_step

    @classmethod
    def create(
        cls, experiment_id: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None
    ) -> TrackedRun:
        # mlflow.user and git commit, as mlflow.start_run adds them (the UI's "Created by" and "Source");
        # the source is nanosweep, not the __main__.py of `python -m nanosweep`
        tags = resolve_tags({"mlflow.source.name": "nanosweep", **tags, **heartbeat_now()})  # alive from birth
        if parent_run_id:
            tags[PARENT_RUN_TAG] = parent_run_id  # nests the run under its sweep in the UI
        with stop_signals.deferred():  # created and ended by this process if it stops: one step, never half
            run = cls(MlflowClient().create_run(experiment_id, run_name=run_name, tags=tags).info.run_id)
            open_runs.add(run)
        return run

    def info(self) -> Any:
        return self.client.get_run(self.run_id)

    def next_step(self, prefix: str) -> int:
        """One past the last step of the run's metrics named prefix...: where a resumed run's series of them goes on."""
        return max((step for key, step in self._steps_logged().items() if key.startswith(prefix)), default=-1) + 1

    @property
    def scratch(self) -> Path:
        """This process's folder for the run's checkpoints on their way to and from the store."""
        if self._scratch is None:
            self._scratch = OwnedFolder("nanosweep-run-")
        return self._scratch.path

    def take_over(self) -> None:
        """This process continues the run (it was KILLED, or left RUNNING by a killed process): RUNNING again, the
        end reason of its last process gone, and ended by this process if it stops."""
        if END_REASON_TAG in self.info().data.tags:
            self.client.delete_tag(self.run_id, END_REASON_TAG)
        with stop_signals.deferred():
            self.client.update_run(self.run_id, status="RUNNING")
            open_runs.add(self)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params not yet on the run (`mlflow run` logs its own first; a resumed run has them)."""
        existing = self.info().data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):  # MLflow accepts 100 params per batch
            self.client.log_batch(self.run_id, params=fresh[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer the points; they go out asynchronously in batches, so logging never stalls training."""
        now = int(time.time() * 1000)
        last_step = self._steps_logged()
        with self._lock:
            for key in sorted(metrics, key=lambda k: k != PRIMARY_METRIC):
                if step > last_step.get(key, -1):
                    self._buffer.append(Metric(key, float(metrics[key]), now, step))
                    last_step[key] = step
            full = len(self._buffer) >= METRIC_BATCH
            if not full and self._buffer and self._timer is None:
                self._timer = threading.Timer(FLUSH_SECONDS, self._flush_on_timer)
                self._timer.daemon = True
                self._timer.start()
        if full:
            self.flush()

    def _flush_on_timer(self) -> None:
        try:
            self.flush()
        except BaseException as exc:  # re-raised in the training thread by flush_and_wait
            self._flush_error = exc

    def flush(self) -> None:
        """Hand every buffered point to MLflow's asynchronous queue, in batches."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            while self._buffer:
                batch, self._buffer = self._buffer[:METRIC_BATCH], self._buffer[METRIC_BATCH:]
                with _ASYNC_LOGGING:
                    self._pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def log_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save ckpt.pt and upload it in the background; at most one upload is in flight."""
        self.flush()
        self.wait_for_upload()
        folder = self.scratch / f"iter{checkpoint['iter_num']}"
        folder.mkdir()
        path = folder / CHECKPOINT
        save_checkpoint(checkpoint, path)

        # metrics up to this iteration reach the store before the checkpoint does: a resume never leaves a gap
        with self._lock:
            logged_before, self._pending = self._pending, []

        def upload() -> None:
            try:
                for operation in logged_before:
                    operation.wait()
                self.client.log_artifact(self.run_id, str(path))
                self.set_tags({"nanosweep.checkpoint_iter": checkpoint["iter_num"]})
            except BaseException as exc:  # re-raised in the training thread by wait_for_upload
                self._upload_error = exc
            finally:
                path.unlink(missing_ok=True)

        self._upload = threading.Thread(target=upload, name="ckpt-upload", daemon=True)
        self._upload.start()

    def wait_for_upload(self) -> None:
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._upload_error is not None:
            error, self._upload_error = self._upload_error, None
            raise error

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, Any]) -> None:
        dataset = Dataset(name, digest, "http", json.dumps({"url": source}), profile=json.dumps(profile))
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
        try:
            self.client.log_inputs(self.run_id, inputs)
        except MlflowException:
            # MLflow looks the dataset up, then inserts it: two trials starting together on a new experiment
            # can both insert, and the loser hits the unique key. The second attempt finds the winner's row.
            time.sleep(0.5)
            self.client.log_inputs(self.run_id, inputs)

    def download_checkpoint(self, cfg: TrainConfig, model: GPT) -> dict[str, Any] | None:
        """The run's last ckpt.pt, or None when it has none. One that cannot be read, or that is not the checkpoint
        of cfg's training (built as model: checkpoint.mismatch), is refused, never skipped."""
        names = {a.path for a in self.client.list_artifacts(self.run_id)}
        if CHECKPOINT not in names:
            return None
        local = mlflow.artifacts.download_artifacts(
            run_id=self.run_id, artifact_path=CHECKPOINT, dst_path=str(self.scratch)
        )
        try:
            checkpoint = load_checkpoint(local)
            missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}")
            foreign = mismatch(checkpoint, cfg, model)
        except Exception as exc:
            problem = f"cannot be read ({(str(exc).splitlines() or [type(exc).__name__])[0][:300]})"
        else:
            problem = f"is another training's ({foreign})" if foreign else ""
        finally:
            os.unlink(local)
        if problem:  # starting over inside this run would mix two trainings in one metric history
            raise CheckpointUnreadable(
                f"{CHECKPOINT} of run {self.run_id} {problem}: its training cannot continue in this run"
            )
        return checkpoint

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of one metric, in step order."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def flush_and_wait(self) -> None:
        """Block until every buffered metric and the last checkpoint are in the store."""
        self.flush()
        while self._pending:
            self._pending.pop(0).wait()
        self.wait_for_upload()
        if self._flush_error is not None:
            error, self._flush_error = self._flush_error, None
            raise error

    def finish(self, status: str, reason: str | None = None) -> None:
        """Flush everything, then end the run FINISHED, FAILED or KILLED (with the reason as a tag).

        When the flush or the last upload fails, the run ends FAILED with that reason (never FINISHED with
        metrics or a checkpoint missing) and the error is raised. A stop signal waits until the run has ended.
        """
        with stop_signals.deferred():
            try:
                self.flush_and_wait()
            except BaseException as exc:
                status = "FAILED"
                reason = f"final metric flush or upload failed: {type(exc).__name__}: {exc}" + (
                    f" (after: {reason})" if reason else ""
                )
                raise
            finally:
                if reason:
                    self.set_tags({END_REASON_TAG: reason[:5000]})
                with _ASYNC_LOGGING:  # it shuts down the async queue that sibling runs log through
                    self.client.set_terminated(self.run_id, RunStatus.to_string(getattr(RunStatus, status)))
                self.ended = True
                open_runs.discard(self.run_id)
                if self._scratch is not None:
                    self._scratch.remove()
