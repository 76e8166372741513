"""The tracking store: URIs checked before anything opens them, a SQLite store made once and whole,
experiments, and runs by id.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
from mlflow.utils.uri import get_uri_scheme

from nanosweep.filelocks import create_once, database_exists, sqlite_file

# the stores MLflow itself opens ("" and file: the folder store); a database URL's +driver does not count
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "file", "")
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
STALLED_SECONDS = 10.0  # a half-made SQLite store nobody has written to for this long is no creation in progress


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or holds something we refuse to touch."""


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


def tracking_uri() -> str:
    """The tracking URI of this process (connect decided it; trial processes inherit it)."""
    return mlflow.get_tracking_uri()


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


def run_experiment_id(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.experiment_id


def experiment_name(experiment_id: str) -> str:
    return MlflowClient().get_experiment(experiment_id).name
