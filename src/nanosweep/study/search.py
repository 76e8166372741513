"""The search driver: an Optuna study proposes configurations, every trial trains as a child run of one parent run.

Optuna decides what to try (its sampler, through ask-and-tell) and what to stop (its pruner, from inside each
trial process); MLflow holds every trial's run. Runs are created here before their process starts (new
SQLite stores race on first writes), and trials start through the executors, so each is its own process.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from nanosweep.config import ConfigError, TrainConfig
from nanosweep.data import PreparedData, prepare
from nanosweep.filelocks import OwnedFolder
from nanosweep.study.driver import Tally, adopt, close_trial_run, end_stale_sweeps, open_parent, supervise_trials
from nanosweep.study.executors.base import Executor, TrialLaunch, names_a_local_file
from nanosweep.study.executors.choice import EXECUTORS, make_executor
from nanosweep.study.optuna_study import (
    CONFIG_HASH_ATTR,
    ITERATIONS_ATTR,
    RUN_ID_ATTR,
    RUN_NAME_ATTR,
    SearchError,
    launched,
    make_sampler,
    open_backend,
    open_study,
    reject,
    settle,
    study_storage,
    tell,
)
from nanosweep.study.pruning import PRUNED_AT_TAG, PRUNERS, STORAGE_ENV, redacted
from nanosweep.study.space import SearchSpace, load_space
from nanosweep.tracking.claims import Claims
from nanosweep.tracking.names import (
    CONFIG_HASH_TAG,
    DEFAULT_EXPERIMENT,
    END_REASON_TAG,
    PROFILE_TAG,
    RUN_KIND_TAG,
    SEARCH_RUN,
    SEARCH_TRIAL_RUN,
)
from nanosweep.tracking.recorder import check_fits
from nanosweep.tracking.run import TrackedRun
from nanosweep.tracking.store import ensure_experiment, ensure_store, run_experiment_id, tracking_uri

SEARCH_TAG = "search"  # the search (space file stem, Optuna study name) a run belongs to
OPTUNA_TRIAL_TAG = "optuna_trial"  # the trial's number in the Optuna study
MAX_REJECTIONS = 50  # proposals in a row that were duplicates or invalid: the space is used up


@dataclass(frozen=True)
class SearchOptions:
    space: Path  # the search-space YAML file
    trials: int  # trained trials in total, over every invocation of this search
    sampler: str = "tpe"
    pruner: str = "asha"
    workers: int = 1  # trials at once; 0: one per slot of the executor (GPU slot, or CPU of a Ray cluster)
    experiment: str = DEFAULT_EXPERIMENT
    storage: str | None = None  # the Optuna study's database URL (default: beside a SQLite tracking store)
    sampler_seed: int | None = None  # makes the sampler's proposals repeatable
    input_path: str | None = None
    executor: str = "local"  # local (processes on this machine) or ray (tasks on a Ray cluster)
    ray_address: str | None = None  # the Ray cluster; None: Ray's rule (RayExecutor)

    def __post_init__(self) -> None:
        if self.trials < 1 or self.workers < 0:
            allowed = "trials >= 1, workers >= 0"
            raise SearchError(f"trials={self.trials}, workers={self.workers} are not allowed: {allowed}")
        if self.pruner not in PRUNERS:
            raise SearchError(f"pruner={self.pruner!r} is unknown: choose one of {', '.join(PRUNERS)}")
        if self.executor not in EXECUTORS:
            raise SearchError(f"executor={self.executor!r} is not allowed: choose one of {', '.join(EXECUTORS)}")


def trial_argv(run_id: str, cfg: TrainConfig, study: optuna.Study, number: int, pruner: str) -> list:
    """The trial's command: `nanosweep train` into its run, every config field spelled out, and its Optuna trial
    (whose storage, with its password, goes in the trial's environment: see pruning.pruning_observer)."""
    argv = [sys.executable, "-m", "nanosweep", "train", "--run-id", run_id]
    for key, value in cfg.to_dict().items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv + ["--optuna-study", study.study_name, "--optuna-trial", str(number), "--optuna-pruner", pruner]


def check_storage_reachable(storage: str, executor: Executor) -> None:
    """Refuse a study database that is a file here when trials may run, and report to it, on other machines."""
    if executor.nodes > 1 and names_a_local_file(storage):
        raise SearchError(
            f"Optuna storage {storage} is a file on this machine and the Ray cluster has {executor.nodes} nodes, "
            f"which cannot reach it: give a database every node reaches with --storage or {STORAGE_ENV} "
            "(scripts/tracking-stack.sh env exports one on its PostgreSQL)"
        )


def ask(
    study: optuna.Study,
    space: SearchSpace,
    prepared: PreparedData,
    seen: dict[str, int],
    claim: Callable[[TrainConfig], str | None],
    seed: int | None = None,
) -> tuple[optuna.trial.Trial, TrainConfig] | None:
    """A new proposal that trains a configuration no launched trial has and that claim gets for this search (it
    says why not), or None when the space is used up."""
    sampler, untried = study.sampler, None
    for _ in range(MAX_REJECTIONS):
        if untried:  # this one proposal only, in this process: nothing shared with other searches of the study
            study.sampler = optuna.samplers.PartialFixedSampler(untried, sampler)
        try:
            trial = study.ask(space.params)
        finally:
            study.sampler = sampler
        try:
            cfg = space.config(trial.params)
            check_fits(cfg, prepared)
        except (ConfigError, TypeError) as exc:
            reject(study, trial, f"invalid: {exc}")
            untried = None
            continue
        holder = None if cfg.config_hash in seen else claim(cfg)
        if cfg.config_hash in seen or holder:
            reject(study, trial, f"duplicate: {holder}" if holder else f"duplicate of trial {seen[cfg.config_hash]}")
            untried = pick_untried(space, seen, trial.number, seed, sampler)
            continue
        return trial, cfg
    return None


def pick_untried(
    space: SearchSpace, seen: dict[str, int], number: int, seed: int | None, sampler: optuna.samplers.BaseSampler
) -> dict[str, Any] | None:
    """After a duplicate proposal in a space of finitely many configurations: the values of one that no trial of
    this search has, picked at random (repeatably with a sampler seed: by it and the trial number), for the next
    proposal, as NNI does for its TPE. In a small space TPE keeps proposing its incumbent: 50 times in a row, in
    bench_search. Not for the grid sampler, whose proposals are its grid's points."""
    if isinstance(sampler, optuna.samplers.GridSampler):
        return None
    untried = []
    for values in space.configurations() or []:
        try:
            if space.config(values).config_hash not in seen:
                untried.append(values)
        except ConfigError:  # not a configuration (n_embd not divisible by n_head, say): never proposed
            continue
    if not untried:
        return None
    return (random.Random(f"{seed}:{number}") if seed is not None else random.Random()).choice(untried)


@dataclass
class Active:
    """A trial whose process runs."""

    number: int
    cfg: TrainConfig


class Driver:
    """One invocation of a search: launch trials into free slots, tell Optuna how each ended."""

    def __init__(
        self,
        opts: SearchOptions,
        space: SearchSpace,
        study: optuna.Study,
        storage: str,
        backend: BaseStorage,
        parent_id: str,
        claims: Claims,
    ):
        self.opts, self.space, self.study, self.storage, self.claims = opts, space, study, storage, claims
        self.backend = backend  # the storage, opened: where ended trials are noted
        self.parent_id = parent_id
        self.experiment_id = run_experiment_id(parent_id)
        self.prepared = prepare(opts.input_path)  # run_search prepared it already: this checks and reads it
        self.logs = OwnedFolder("nanosweep-logs-")
        self.active: dict[str, Active] = {}  # run id -> trial
        self.failed: list[str] = []  # run names of trials that failed or were left KILLED in this invocation
        self.exhausted = False

    def create_run(self, trial: optuna.trial.Trial, cfg: TrainConfig) -> str:
        tags = {
            RUN_KIND_TAG: SEARCH_TRIAL_RUN,
            SEARCH_TAG: self.space.name,
            OPTUNA_TRIAL_TAG: str(trial.number),
            PROFILE_TAG: self.space.profile,
            CONFIG_HASH_TAG: cfg.config_hash,
        }
        run = TrackedRun.create(self.experiment_id, cfg.run_name, tags, self.parent_id)
        run.log_params({SEARCH_TAG: self.space.name, "profile": self.space.profile})
        trial.set_user_attr(RUN_ID_ATTR, run.run_id)
        trial.set_user_attr(RUN_NAME_ATTR, cfg.run_name)
        trial.set_user_attr(CONFIG_HASH_ATTR, cfg.config_hash)
        return run.run_id

    def claim(self, cfg: TrainConfig) -> str | None:
        """Claim cfg's configuration for this search; why not, when another search has it (README, "Claims")."""
        point = (self.experiment_id, f"{SEARCH_TAG}-{self.space.name}", cfg.config_hash)
        holder = self.claims.holder(*point)
        if holder in (None, self.parent_id):
            holder = self.claims.take(*point, self.parent_id)
        return None if holder == self.parent_id else f"claimed by the search of run {holder}"

    def start(self, executor: Executor, number: int, run_id: str, cfg: TrainConfig) -> None:
        argv = trial_argv(run_id, cfg, self.study, number, self.opts.pruner)
        name = f"trial{number:04d}-{cfg.run_name}"
        log = self.logs.path / f"{name}.log"
        executor.start(TrialLaunch((run_id,), name, argv, log, {STORAGE_ENV: self.storage}))
        self.active[run_id] = Active(number, cfg)

    def run(self, executor: Executor, resume: list[FrozenTrial], new: int, tally: Tally) -> None:
        """Resume the cut-off trials, then ask for `new` more, at most executor.capacity at a time."""
        seen = {t.user_attrs[CONFIG_HASH_ATTR]: t.number for t in launched(self.study)}
        queue = list(resume)
        while queue or (new and not self.exhausted) or executor.running():
            while len(executor.running()) < executor.capacity and (queue or (new and not self.exhausted)):
                if queue:
                    trial = queue.pop(0)
                    cfg, number = self.space.config(trial.params), trial.number
                    taken = self.claim(cfg)
                    if taken:  # another search resumes it
                        tally.skipped += 1
                        tally.report(f"trial {number} busy: {taken}")
                        continue
                    run_id = trial.user_attrs[RUN_ID_ATTR]
                    adopt(run_id, self.parent_id)
                    how = "resume"
                else:
                    proposal = ask(self.study, self.space, self.prepared, seen, self.claim, self.opts.sampler_seed)
                    if proposal is None:
                        self.exhausted = True
                        tally.report(f"{MAX_REJECTIONS} proposals in a row were duplicates or invalid: stopping")
                        break
                    live, cfg = proposal
                    run_id, number, how = self.create_run(live, cfg), live.number, "new"
                    seen[cfg.config_hash] = number
                    new -= 1
                self.start(executor, number, run_id, cfg)
                tally.running += 1
                tally.report(f"trial {number} started ({how}): {cfg.run_name}, {describe(cfg, self.space)}")
            for exit in executor.wait(timeout=1.0):
                self.collect(close_trial_run(exit, exit.launch.run_ids[0]), tally, exit.seconds)

    def collect(self, info: Any, tally: Tally, seconds: float) -> None:
        active = self.active.pop(info.info.run_id)
        state = tell(self.study, self.backend, self.study.trials[active.number], info)
        tally.running -= 1
        event = f"trial {active.number} {state} in {seconds:.1f}s"
        if state in ("COMPLETE", "PRUNED"):
            tally.done += 1
            tally.durations.append(seconds)
            value = self.study.trials[active.number].value
            event += f": val_loss {value:.4f}" if value is not None else ""
            event += f" at iteration {info.data.tags[PRUNED_AT_TAG]}" if state == "PRUNED" else ""
        else:
            tally.failed += 1
            self.failed.append(f"trial {active.number} ({active.cfg.run_name})")
            event += f": {info.data.tags.get(END_REASON_TAG, 'no reason recorded')}"
        tally.report(event)


def describe(cfg: TrainConfig, space: SearchSpace) -> str:
    """The searched values of a configuration, e.g. n_head=4, learning_rate=0.00031."""
    values = {name: getattr(cfg, name) for name in space.params}
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def format_trials(study: optuna.Study, space: SearchSpace) -> str:
    """The launched trials as a table: number, state, final (or last) val_loss, iterations, run, searched values."""
    header = f"{'trial':>5}  {'state':<9} {'val_loss':>8} {'iters':>6}  {'run':<32}  searched values"
    lines = [header, "-" * len(header)]
    for t in sorted(launched(study), key=lambda t: t.number):
        value = f"{t.value:.4f}" if t.value is not None else "-"
        lines.append(
            f"{t.number:>5}  {t.state.name:<9} {value:>8} {t.user_attrs.get(ITERATIONS_ATTR, '-')!s:>6}  "
            f"{t.user_attrs[RUN_ID_ATTR]:<32}  {describe(space.config(t.params), space)}"
        )
    return "\n".join(lines)


def run_search(opts: SearchOptions, stream: TextIO = sys.stderr) -> int:
    """Continue the space's study to opts.trials trained trials; 0 when all ended COMPLETE or PRUNED, else 1."""
    space = load_space(opts.space)
    sampler = make_sampler(opts.sampler, space, opts.sampler_seed, opts.trials)
    prepare(opts.input_path)  # once, here, so trials never race to write it
    storage = study_storage(tracking_uri(), opts.storage)
    # before anything is written: an executor that cannot serve this search (a file store for a cluster) refuses here
    executor = make_executor(opts.executor, opts.workers, 1, opts.input_path, opts.ray_address)
    with contextlib.closing(executor):
        check_storage_reachable(storage, executor)
        return _search(opts, space, sampler, storage, executor, stream)


def _search(
    opts: SearchOptions,
    space: SearchSpace,
    sampler: optuna.samplers.BaseSampler,
    storage: str,
    executor: Executor,
    stream: TextIO,
) -> int:
    """run_search once its executor is at hand: open the study and the parent run, drive the trials, summarise."""
    # before the experiment: a storage that fails, or a space changed under its study, leaves the tracking store be
    backend = open_backend(storage)
    study = open_study(space, backend, sampler, opts.pruner)
    ensure_store()
    attached = os.environ.get("MLFLOW_RUN_ID")  # the run `mlflow run` created becomes the parent
    experiment_id = run_experiment_id(attached) if attached else ensure_experiment(opts.experiment)
    end_stale_sweeps([experiment_id], keep=attached, kind=SEARCH_RUN)
    claims = Claims()  # before the runs (README, "Claims: one driver per point")
    resume, busy = settle(study, backend)
    target = int(min(opts.trials, space.size))
    ended = len(launched(study)) - len(resume) - len(busy)
    new = max(0, target - len(launched(study)))
    name = f"search-{space.name}"
    if not attached and not resume and not new:
        stream.write(format_trials(study, space) + "\n")
        stream.write(f"{name}: nothing to run: {ended} trial(s) ended, {len(busy)} running elsewhere, of {target}\n")
        return 0

    tags = {SEARCH_TAG: space.name, PROFILE_TAG: space.profile}
    parent = open_parent(experiment_id, attached, name, SEARCH_RUN, tags)
    parent.log_params(
        {
            "space": str(opts.space),
            "trials": opts.trials,
            "sampler": opts.sampler,
            "pruner": opts.pruner,
            "workers": opts.workers,
            "executor": opts.executor,
            "study": space.name,
            "storage": redacted(storage),
            "profile": space.profile,
        }
    )
    tally = Tally(target, executor.capacity, stream)
    tally.skipped = ended
    tally.report(
        f"{name}: study {space.name!r} in {redacted(storage)}, {opts.sampler} sampler, {opts.pruner} pruner: "
        f"{ended} ended, {len(resume)} to resume, {new} new, {executor.capacity} at a time on {executor.where}"
    )

    driver = Driver(opts, space, study, storage, backend, parent.run_id, claims)
    started = time.monotonic()
    with driver.logs, supervise_trials(name, executor, parent, stream):
        driver.run(executor, resume, new, tally)

    summary = format_trials(study, space)
    stream.write(summary + "\n")
    parent.log_text(summary + "\n", "summary.txt")
    trials = launched(study)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    best = [t.value for t in trials if t.state == TrialState.COMPLETE]
    metrics = {
        "trials_complete": counts[TrialState.COMPLETE],
        "trials_pruned": counts[TrialState.PRUNED],
        "trials_failed": counts[TrialState.FAIL],
        "trained_iterations": sum(t.user_attrs.get(ITERATIONS_ATTR, 0) for t in trials),
        "search_seconds": time.monotonic() - started,
    }
    if best:
        metrics["best_val_loss"] = min(best)
    parent.log_metrics(metrics, step=0)
    if driver.failed:
        stream.write(f"{name}: {len(driver.failed)} trial(s) did not finish: {', '.join(driver.failed)}\n")
        parent.finish("FAILED", f"trials that did not finish: {', '.join(driver.failed)}")
        return 1
    parent.finish("FINISHED")
    return 0
