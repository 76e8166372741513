"""What an executor is: it starts trial processes (TrialLaunch), reports how they ended (TrialExit), stops them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse


@dataclass(frozen=True)
class TrialLaunch:
    """One trial process to start (a fused group of runs, or one): its command, environment and log."""

    run_ids: tuple[str, ...]  # the MLflow runs it trains
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)


STOP_GRACE_SECONDS = 60.0  # a stopped trial has this long to flush its logging and end its runs KILLED


LOCAL_FILE_SCHEMES = ("", "file", "sqlite")  # database URLs that name a file of this machine


def names_a_local_file(url: str) -> bool:
    """Whether a tracking URI or an Optuna storage URL is a file here, which other machines cannot reach."""
    return urlparse(url).scheme.split("+")[0] in LOCAL_FILE_SCHEMES  # sqlite+pysqlite: SQLite too


class ExecutorError(RuntimeError):
    """An executor cannot run this sweep as asked; the message says why and what to do."""


@dataclass(frozen=True)
class TrialExit:
    launch: TrialLaunch
    returncode: int  # negative: killed by that signal
    seconds: float
    lost: str = ""  # why the process was lost with its machine (a dead Ray node); its runs are to be resumed


class Executor(ABC):
    """Runs trial commands with bounded concurrency."""

    cuda: bool  # trials run on GPUs (the sweep sizes fused groups for them)
    nodes: int  # machines trials may run on: more than one, and every store they write must be a server
    where: str  # for the sweep's first line, e.g. "CPU, 1 thread(s) per trial"

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Trials that may run at once."""

    @abstractmethod
    def running(self) -> list[TrialLaunch]: ...

    @abstractmethod
    def start(self, launch: TrialLaunch) -> int:
        """Start a trial; returns its process id."""

    @abstractmethod
    def wait(self, timeout: float) -> list[TrialExit]:
        """Trials that ended within timeout seconds (possibly none)."""

    @abstractmethod
    def stop(self, signum: int, grace: float) -> list[TrialExit]:
        """Send signum to every running trial, wait up to grace seconds, then kill what is left."""

    @abstractmethod
    def close(self) -> None:
        """Let go of what the executor holds (a Ray connection); the sweep calls this once, at its end."""
