"""Liveness: a RUNNING run is alive while a process keeps its heartbeat tag fresh (README, "Liveness")."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable

from mlflow import MlflowClient
from mlflow.entities import RunTag

from nanosweep.tracking.names import DEFAULT_HEARTBEAT_SECONDS, HEARTBEAT_ENV, HEARTBEAT_TAG, STALE_BEATS


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
