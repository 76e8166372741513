"""The search driver: an Optuna study proposes configurations, every trial trains as a child run of one parent run.

Optuna decides what to try (its sampler, through ask-and-tell) and what to stop (its pruner, from inside each
trial process); MLflow holds every trial's run. Runs are created here before their process starts (SQLite
races, MLFLOW-NOTES), and trials start through the sweep's executors, so each is its own process.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import mlflow
import optuna
from optuna.trial import FrozenTrial, TrialState

from nanosweep.config import ConfigError, TrainConfig
from nanosweep.data import PreparedData, prepare
from nanosweep.executors import Executor, TrialLaunch, make_executor
from nanosweep.filelocks import OwnedFolder, create_once, sqlite_file
from nanosweep.pruning import PRUNED_AT_TAG, PRUNED_TAG, PRUNERS, make_pruner, open_storage, redacted
from nanosweep.space import SearchSpace, load_space
from nanosweep.sweep import (
    Progress,
    adopt,
    close_trial_run,
    end_stale_sweeps,
    open_parent,
    supervise_trials,
)
from nanosweep.tracking import (
    CONFIG_HASH_TAG,
    DEFAULT_EXPERIMENT,
    END_REASON_TAG,
    PROFILE_TAG,
    RUN_KIND_TAG,
    Claims,
    TrackedRun,
    alive,
    ensure_experiment,
    ensure_store,
    run_experiment_id,
)
from nanosweep.trial import check_fits

SAMPLERS = ("tpe", "random", "grid", "cmaes")
STORAGE_ENV = "NANOSWEEP_OPTUNA_STORAGE"  # the study's database when the tracking store is not a local SQLite file
SEARCH_TAG = "search"  # the search (space file stem, Optuna study name) a run belongs to
OPTUNA_TRIAL_TAG = "optuna_trial"  # the trial's number in the Optuna study
MAX_REJECTIONS = 50  # proposals in a row that were duplicates or invalid: the space is used up
# Optuna user attributes of a study's trials
RUN_ID_ATTR = "run_id"  # the MLflow run of a launched trial
RUN_NAME_ATTR = "run_name"  # and its name
CONFIG_HASH_ATTR = "config_hash"  # TrainConfig.config_hash: no two launched trials share one
ITERATIONS_ATTR = "iterations"  # iterations the trial trained (the iteration where it was pruned, or max_iters)
REJECTED_ATTR = "rejected"  # why a proposal was not trained (duplicate, invalid); such trials do not count


class SearchError(ConfigError):
    """A search cannot start as asked; the message names the value and what is allowed."""


@dataclass(frozen=True)
class SearchOptions:
    space: Path  # the search-space YAML file
    trials: int  # trained trials in total, over every invocation of this search
    sampler: str = "tpe"
    pruner: str = "asha"
    workers: int = 1  # trials at once
    experiment: str = DEFAULT_EXPERIMENT
    storage: str | None = None  # the Optuna study's database URL (default: beside a SQLite tracking store)
    sampler_seed: int | None = None  # makes the sampler's proposals repeatable
    input_path: str | None = None


def study_storage(tracking_uri: str, storage: str | None) -> str:
    """--storage, else NANOSWEEP_OPTUNA_STORAGE, else optuna.db beside a SQLite tracking store's file."""
    storage = storage or os.environ.get(STORAGE_ENV)
    if storage:
        return storage
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    raise SearchError(
        f"tracking URI {tracking_uri} is not a local SQLite file, so the study has no default database: "
        f"pass --storage URL or set {STORAGE_ENV} (e.g. postgresql://user:pass@host/optuna)"
    )


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
        return optuna.samplers.GridSampler({n: d.choices for n, d in space.params.items()}, seed=seed)
    if name == "cmaes":
        if importlib.util.find_spec("cmaes") is None:
            raise SearchError("sampler='cmaes' needs the cmaes package: pip install 'nanosweep[search]'")
        return optuna.samplers.CmaEsSampler(seed=seed)
    raise SearchError(f"sampler={name!r} is unknown: choose one of {', '.join(SAMPLERS)}")


def open_study(space: SearchSpace, storage: str, sampler: optuna.samplers.BaseSampler, pruner: str) -> optuna.Study:
    """The space's study, created on the first search and continued by every later one with the same space. A new
    SQLite database for it is made once and whole (filelocks.create_once), whoever starts at the same time."""
    database = sqlite_file(storage)
    if database is not None:
        create_once(database, lambda path: open_storage(f"sqlite:///{path}").engine.dispose())
    study = optuna.create_study(
        storage=open_storage(storage),
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


def trial_argv(run_id: str, cfg: TrainConfig, study: optuna.Study, trial_id: int, storage: str, pruner: str) -> list:
    """The trial's command: `nanosweep train` into its run, every config field spelled out, and its Optuna trial."""
    argv = [sys.executable, "-m", "nanosweep", "train", "--run-id", run_id]
    for key, value in cfg.to_dict().items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    argv += ["--optuna-storage", storage, "--optuna-study", study.study_name, "--optuna-trial-id", str(trial_id)]
    return argv + ["--optuna-pruner", pruner]


def launched(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that were trained (or are training): those with a run."""
    return [t for t in study.get_trials(deepcopy=False) if RUN_ID_ATTR in t.user_attrs]


def tell(study: optuna.Study, trial: FrozenTrial, info: Any) -> str:
    """Hand an ended run's result to Optuna; a KILLED run stays RUNNING there, to be resumed. Returns its state."""
    status, tags, metrics = info.info.status, info.data.tags, info.data.metrics
    if status == "FINISHED" and tags.get(PRUNED_TAG) == "true":
        optuna.trial.Trial(study, trial._trial_id).set_user_attr(ITERATIONS_ATTR, int(tags[PRUNED_AT_TAG]))
        study.tell(trial.number, state=TrialState.PRUNED)  # its value: the last val_loss it reported
        return "PRUNED"
    if status == "FINISHED" and "val_loss" in metrics:
        optuna.trial.Trial(study, trial._trial_id).set_user_attr(ITERATIONS_ATTR, int(info.data.params["max_iters"]))
        study.tell(trial.number, metrics["val_loss"])
        return "COMPLETE"
    if status in ("FINISHED", "FAILED"):
        study.tell(trial.number, state=TrialState.FAIL)
        return "FAIL"
    return status


def settle(study: optuna.Study) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
    """Trials a killed search left RUNNING in Optuna: tell those whose run ended; return (to resume, busy)."""
    resume, busy = [], []
    client = mlflow.MlflowClient()
    for trial in launched(study):
        if trial.state != TrialState.RUNNING:
            continue
        info = client.get_run(trial.user_attrs[RUN_ID_ATTR])
        if info.info.status == "RUNNING" and alive(info.data.tags):
            busy.append(trial)
        elif tell(study, trial, info) in ("RUNNING", "KILLED"):
            resume.append(trial)
    return resume, busy


def reject(study: optuna.Study, trial: optuna.trial.Trial, reason: str) -> None:
    """A proposal that will not be trained: failed in Optuna, with the reason, and not counted."""
    trial.set_user_attr(REJECTED_ATTR, reason)
    study.tell(trial, state=TrialState.FAIL)


def ask(
    study: optuna.Study,
    space: SearchSpace,
    prepared: PreparedData,
    seen: dict[str, int],
    claim: Callable[[TrainConfig], str | None],
) -> tuple[optuna.trial.Trial, TrainConfig] | None:
    """A new proposal that trains a configuration no launched trial has and that claim gets for this search (it
    says why not), or None when the space is used up."""
    for _ in range(MAX_REJECTIONS):
        trial = study.ask(space.params)
        try:
            cfg = space.config(trial.params)
            check_fits(cfg, prepared)
        except (ConfigError, TypeError) as exc:
            reject(study, trial, f"invalid: {exc}")
            continue
        if cfg.config_hash in seen:
            reject(study, trial, f"duplicate of trial {seen[cfg.config_hash]}")
            continue
        taken = claim(cfg)
        if taken:
            reject(study, trial, f"duplicate: {taken}")
            continue
        return trial, cfg
    return None


@dataclass
class Active:
    """A trial whose process runs."""

    number: int
    cfg: TrainConfig


class Driver:
    """One invocation of a search: launch trials into free slots, tell Optuna how each ended."""

    def __init__(
        self, opts: SearchOptions, space: SearchSpace, study: optuna.Study, storage: str, parent_id: str, claims: Claims
    ):
        self.opts, self.space, self.study, self.storage, self.claims = opts, space, study, storage, claims
        self.parent_id = parent_id
        self.experiment_id = run_experiment_id(parent_id)
        self.prepared = prepare(opts.input_path)  # run_search prepared it already: this checks and reads it
        self.logs = OwnedFolder("nanosweep-logs-")
        self.active: dict[str, Active] = {}  # run id -> trial
        self.failed: list[str] = []  # run names of trials that failed or were left KILLED in this invocation
        self.exhausted = False

    def create_run(self, trial: optuna.trial.Trial, cfg: TrainConfig) -> str:
        tags = {
            RUN_KIND_TAG: "search_trial",
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

    def start(self, executor: Executor, number: int, trial_id: int, run_id: str, cfg: TrainConfig) -> None:
        argv = trial_argv(run_id, cfg, self.study, trial_id, self.storage, self.opts.pruner)
        name = f"trial{number:04d}-{cfg.run_name}"
        executor.start(TrialLaunch((run_id,), name, argv, self.logs.path / f"{name}.log"))
        self.active[run_id] = Active(number, cfg)

    def run(self, executor: Executor, resume: list[FrozenTrial], new: int, progress: Progress) -> None:
        """Resume the cut-off trials, then ask for `new` more, at most executor.capacity at a time."""
        seen = {t.user_attrs[CONFIG_HASH_ATTR]: t.number for t in launched(self.study)}
        queue = list(resume)
        while queue or (new and not self.exhausted) or executor.running():
            while len(executor.running()) < executor.capacity and (queue or (new and not self.exhausted)):
                if queue:
                    trial = queue.pop(0)
                    cfg, number, trial_id = self.space.config(trial.params), trial.number, trial._trial_id
                    taken = self.claim(cfg)
                    if taken:  # another search resumes it
                        progress.skipped += 1
                        progress.report(f"trial {number} busy: {taken}")
                        continue
                    run_id = trial.user_attrs[RUN_ID_ATTR]
                    adopt(run_id, self.parent_id)
                    how = "resume"
                else:
                    proposal = ask(self.study, self.space, self.prepared, seen, self.claim)
                    if proposal is None:
                        self.exhausted = True
                        progress.report(f"{MAX_REJECTIONS} proposals in a row were duplicates or invalid: stopping")
                        break
                    live, cfg = proposal
                    run_id, number, trial_id, how = self.create_run(live, cfg), live.number, live._trial_id, "new"
                    seen[cfg.config_hash] = number
                    new -= 1
                self.start(executor, number, trial_id, run_id, cfg)
                progress.running += 1
                progress.report(f"trial {number} started ({how}): {cfg.run_name}, {describe(cfg, self.space)}")
            for exit in executor.wait(timeout=1.0):
                self.collect(close_trial_run(exit, exit.launch.run_ids[0]), progress, exit.seconds)

    def collect(self, info: Any, progress: Progress, seconds: float) -> None:
        active = self.active.pop(info.info.run_id)
        state = tell(self.study, self.study.trials[active.number], info)
        progress.running -= 1
        event = f"trial {active.number} {state} in {seconds:.1f}s"
        if state in ("COMPLETE", "PRUNED"):
            progress.done += 1
            progress.durations.append(seconds)
            value = self.study.trials[active.number].value
            event += f": val_loss {value:.4f}" if value is not None else ""
            event += f" at iteration {info.data.tags[PRUNED_AT_TAG]}" if state == "PRUNED" else ""
        else:
            progress.failed += 1
            self.failed.append(f"trial {active.number} ({active.cfg.run_name})")
            event += f": {info.data.tags.get(END_REASON_TAG, 'no reason recorded')}"
        progress.report(event)


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


def check_options(opts: SearchOptions) -> None:
    if opts.trials < 1 or opts.workers < 1:
        raise SearchError(f"trials={opts.trials}, workers={opts.workers} are not allowed: both must be >= 1")
    if opts.pruner not in PRUNERS:
        raise SearchError(f"pruner={opts.pruner!r} is unknown: choose one of {', '.join(PRUNERS)}")


def run_search(opts: SearchOptions, stream: TextIO = sys.stderr) -> int:
    """Continue the space's study to opts.trials trained trials; 0 when all ended COMPLETE or PRUNED, else 1."""
    check_options(opts)
    space = load_space(opts.space)
    sampler = make_sampler(opts.sampler, space, opts.sampler_seed, opts.trials)
    prepare(opts.input_path)  # once, here, so trials never race to write it
    storage = study_storage(mlflow.get_tracking_uri(), opts.storage)
    # before the experiment: a storage that fails, or a space changed under its study, leaves the tracking store be
    study = open_study(space, storage, sampler, opts.pruner)
    ensure_store()
    attached = os.environ.get("MLFLOW_RUN_ID")  # the run `mlflow run` created becomes the parent
    experiment_id = run_experiment_id(attached) if attached else ensure_experiment(opts.experiment)
    end_stale_sweeps([experiment_id], keep=attached, kind="search")
    claims = Claims()  # before the runs (README, "Claims: one driver per point")
    resume, busy = settle(study)
    target = int(min(opts.trials, space.size))
    ended = len(launched(study)) - len(resume) - len(busy)
    new = max(0, target - len(launched(study)))
    name = f"search-{space.name}"
    if not attached and not resume and not new:
        stream.write(format_trials(study, space) + "\n")
        stream.write(f"{name}: nothing to run: {ended} trial(s) ended, {len(busy)} running elsewhere, of {target}\n")
        return 0

    parent = open_parent(experiment_id, attached, name, "search", {SEARCH_TAG: space.name, PROFILE_TAG: space.profile})
    parent.log_params(
        {
            "space": str(opts.space),
            "trials": opts.trials,
            "sampler": opts.sampler,
            "pruner": opts.pruner,
            "workers": opts.workers,
            "study": space.name,
            "storage": redacted(storage),
            "profile": space.profile,
        }
    )
    executor = make_executor("local", opts.workers, 1)
    progress = Progress(target, executor.capacity, stream)
    progress.skipped = ended
    progress.report(
        f"{name}: study {space.name!r} in {redacted(storage)}, {opts.sampler} sampler, {opts.pruner} pruner: "
        f"{ended} ended, {len(resume)} to resume, {new} new, {executor.capacity} at a time"
    )

    driver = Driver(opts, space, study, storage, parent.run_id, claims)
    started = time.monotonic()
    with driver.logs, supervise_trials(name, executor, parent, stream):
        driver.run(executor, resume, new, progress)

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
