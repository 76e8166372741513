"""Files that must come out right when processes run at once and any of them may be killed at any moment: a SQLite
database created exactly once and whole, and scratch folders that never outlive their owner.

Both rest on flock(2), which the kernel releases when its holder dies, even by SIGKILL: so "the lock is free"
means "nobody is working on this", and nothing is judged by process ids or by time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy.engine import make_url


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite:/// URL (a tracking store, an Optuna storage); None for any other URL."""
    if not url.startswith("sqlite:"):
        return None
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def database_exists(path: Path) -> bool:
    """A file with something in it: an empty one (SQLite makes them on a bare connect) is treated as missing."""
    return path.is_file() and path.stat().st_size > 0


@contextlib.contextmanager
def _locked(folder: Path, how: int) -> Iterator[None]:
    """flock on the folder itself: no lock file is left behind."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)  # and with it the lock


def create_once(path: Path, build: Callable[[Path], None]) -> bool:
    """Make the database file at path unless it exists: build(tmp) writes it beside the target while this process
    holds the folder's lock, and a rename puts it in place whole. Concurrent callers wait and find it made; a kill
    at any moment leaves no file at path or a complete one. Returns whether this call made it."""
    if database_exists(path):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent, fcntl.LOCK_EX):
        if database_exists(path):  # made while this process waited for the lock
            return False
        tmp = path.with_name(f".{path.name}.creating")
        for leftover in (tmp, tmp.with_name(f"{tmp.name}-journal")):  # a build a killed process left half-done
            leftover.unlink(missing_ok=True)
        build(tmp)
        os.replace(tmp, path)
    return True


def _remove(path: Path, fd: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.close(fd)


def _remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove the folders prefix* in parent whose owner is gone: nobody holds their lock."""
    with _locked(parent, fcntl.LOCK_EX):  # no folder is between its creation and its lock meanwhile
        for folder in parent.glob(f"{prefix}*"):
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:  # not a folder, or gone already
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its owner lives
                os.close(fd)
                continue
            _remove(folder, fd)


class OwnedFolder:
    """A new scratch folder prefix*/ in parent (default: the temporary directory), locked while this process holds
    it and removed by remove(), at garbage collection or at exit. One that a killed process left behind is removed
    by the next OwnedFolder made with the same prefix in the same parent."""

    def __init__(self, prefix: str, parent: Path | None = None) -> None:
        parent = Path(parent or tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        with _locked(parent, fcntl.LOCK_SH):  # shared between creators, exclusive for _remove_abandoned
            self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._finalizer = weakref.finalize(self, _remove, self.path, fd)
        _remove_abandoned(parent, prefix)

    def remove(self) -> None:
        self._finalizer()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.remove()
