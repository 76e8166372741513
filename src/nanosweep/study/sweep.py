"""The sweep driver: expand member grids, skip what is finished, resume what was cut off, run the rest.

Each trial (a fused group of runs) is its own process (`nanosweep train-group`), started by an executor
(study/executors/: this machine, or a Ray cluster), so a crash or out-of-memory fails that group alone. Runs are
created here, in the parent, before any trial starts: concurrent first writes to a new SQLite store can corrupt
it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from nanosweep.config import ConfigError
from nanosweep.data import prepare
from nanosweep.filelocks import OwnedFolder
from nanosweep.study.driver import Tally, adopt, close_trial_run, end_stale_sweeps, open_parent, supervise_trials
from nanosweep.study.executors.base import Executor, TrialExit, TrialLaunch
from nanosweep.study.executors.choice import EXECUTORS, make_executor
from nanosweep.study.grid import GridPoint, check_profile, expand, load_members
from nanosweep.study.planning import (
    ACTIONS,
    BUSY,
    RERUN,
    RESUME,
    PlannedTrial,
    format_table,
    fuse_limit,
    fused_groups,
    plan,
    study_runs,
)
from nanosweep.tracking.claims import Claims
from nanosweep.tracking.names import (
    END_REASON_TAG,
    FUSED_GROUP_TAG,
    MEMBER_TAG,
    PROFILE_TAG,
    SWEEP_RUN,
)
from nanosweep.tracking.recorder import check_fits, trial_spec
from nanosweep.tracking.run import CheckpointUnreadable, TrackedRun
from nanosweep.tracking.scope import study_scope
from nanosweep.tracking.store import ensure_store, store_missing


class SweepError(ConfigError):
    """A sweep cannot start as asked; the message names the value and what is allowed."""


@dataclass(frozen=True)
class SweepOptions:
    member: str  # a member name or "all"
    profile: str = "full"
    workers: int = 0  # 0: every GPU slot, or one trial at a time on CPU
    trials_per_gpu: int = 1  # processes (fused groups) sharing each GPU
    fuse: int = 0  # at most this many trials per fused group; 0: auto (fuse_limit)
    experiment: str | None = None  # None: the rule of tracking.study_scope decides where runs are and go
    sweeps_dir: Path = Path("sweeps")
    input_path: str | None = None
    dry_run: bool = False
    repeats: int = 0  # seeds per grid point; 0: the member file's `repeats` (default 1)
    executor: str = "local"  # local (processes on this machine) or ray (tasks on a Ray cluster)
    ray_address: str | None = None  # the Ray cluster; None: Ray's rule (RayExecutor)

    def __post_init__(self) -> None:
        check_profile(self.profile)
        if self.workers < 0 or self.trials_per_gpu < 1:
            raise SweepError(
                f"workers={self.workers}, trials_per_gpu={self.trials_per_gpu} are not allowed: workers >= 0, "
                "trials_per_gpu >= 1"
            )
        if self.fuse < 0:
            raise SweepError(f"fuse={self.fuse} is not allowed: use auto or a positive integer")
        if self.executor not in EXECUTORS:
            raise SweepError(f"executor={self.executor!r} is not allowed: choose one of {', '.join(EXECUTORS)}")


def fuse_limit_option(text: str) -> int:
    """--fuse as SweepOptions.fuse: auto is 0, else a positive integer."""
    if text == "auto":
        return 0
    if not (text.isdigit() and int(text) >= 1):
        raise SweepError(f"fuse={text!r} is not allowed: use auto or a positive integer")
    return int(text)


def group_name(group: list[PlannedTrial], parent_run_id: str, index: int) -> str:
    """The fused_group tag: which sweep, which group, which architecture, e.g. 3f2a9c1e-g002-b64_L4_H4_E128_BS8."""
    cfg = group[0].point.config
    heads = "+".join(str(h) for h in sorted({p.point.config.n_head for p in group}))
    arch = f"b{cfg.block_size}_L{cfg.n_layer}_H{heads}_E{cfg.n_embd}_BS{cfg.batch_size}"
    return f"{parent_run_id[:8]}-g{index:03d}-{arch}"


def group_argv(group: list[PlannedTrial], name: str) -> list[str]:
    """The group's command: `nanosweep train-group`, every run with its whole config."""
    argv = [sys.executable, "-m", "nanosweep", "train-group", "--tag", f"{FUSED_GROUP_TAG}={name}"]
    for planned in group:
        argv += ["--trial", trial_spec(planned.point.config, planned.run_id)]
    return argv


def create_trial_run(experiment_id: str, point: GridPoint, parent_run_id: str) -> str:
    """A child run of the sweep, tagged with its place in the study (and a heartbeat: nobody else takes it)."""
    run = TrackedRun.create(experiment_id, point.config.run_name, point.study_tags(), parent_run_id)
    run.log_params({"member": point.member, "profile": point.profile})
    return run.run_id


def _collect(exit: TrialExit, by_run: dict[str, PlannedTrial], tally: Tally) -> list[PlannedTrial]:
    """Record a group's end in its plans and the tally.

    Returns the grid points to train again in new runs: resumed runs whose checkpoint was unreadable.
    """
    again = []
    for run_id in exit.launch.run_ids:
        planned = by_run[run_id]
        info = close_trial_run(exit, run_id)
        tally.running -= 1
        reason = info.data.tags.get(END_REASON_TAG, "no reason recorded")
        if planned.action == RESUME and reason.startswith(f"{CheckpointUnreadable.__name__}:"):
            name = planned.point.config.run_name
            tally.report(f"{name}: {reason}; run FAILED, training the grid point in a new run")
            planned.action, planned.note = RERUN, f"checkpoint of run {planned.run_id} unreadable"
            planned.run_id = None
            again.append(planned)
            continue
        planned.status, planned.seconds = info.info.status, exit.seconds
        planned.val_loss = info.data.metrics.get("val_loss")
        event = f"{planned.point.config.run_name} {planned.status} in {exit.seconds:.1f}s"
        if planned.status == "FINISHED":
            tally.done += 1
            tally.durations.append(exit.seconds / len(exit.launch.run_ids))  # a fused trial's share
        else:
            tally.failed += 1
            event += f": {reason}"
        tally.report(event)
    return again


def _claim(planned: PlannedTrial, claims: Claims, experiment_id: str, parent_id: str, tally: Tally) -> bool:
    """Claim the point before launching it; one that another driver claimed first is busy, that driver's."""
    holder = claims.take(experiment_id, planned.point.profile, planned.point.config.config_hash, parent_id)
    if holder == parent_id:
        return True
    planned.action, planned.note = BUSY, f"claimed by the driver of run {holder}"
    tally.skipped += 1
    tally.report(f"{planned.point.config.run_name} busy: another driver (run {holder}) claimed it first")
    return False


def _drive(
    groups: list[list[PlannedTrial]],
    executor: Executor,
    claims: Claims,
    experiment_id: str,
    parent_id: str,
    tally: Tally,
    log_dir: Path,
    by_run: dict[str, PlannedTrial],
    fuse: int,
) -> None:
    """Run the groups, each point claimed first; by_run maps every run started to its plan."""
    queue = deque(groups)
    started = 0
    while queue or executor.running():
        while queue and len(executor.running()) < executor.capacity:
            group = [p for p in queue.popleft() if _claim(p, claims, experiment_id, parent_id, tally)]
            if not group:
                continue
            for planned in group:
                if planned.run_id is None:
                    planned.run_id = create_trial_run(experiment_id, planned.point, parent_id)
                else:
                    adopt(planned.run_id, parent_id)
                by_run[planned.run_id] = planned
            started += 1
            name = group_name(group, parent_id, started)
            log_name = group[0].point.config.run_name if len(group) == 1 else name
            run_ids = tuple(p.run_id for p in group)
            executor.start(TrialLaunch(run_ids, name, group_argv(group, name), log_dir / f"{log_name}.log"))
            tally.running += len(group)
            members = ", ".join(
                f"{p.point.config.run_name} ({p.action}{', ' + p.note if p.note else ''})" for p in group
            )
            tally.report(f"{name} started: {members}" if len(group) > 1 else f"{members} started")
        for exit in executor.wait(timeout=1.0):
            queue.extendleft(reversed(fused_groups(_collect(exit, by_run, tally), fuse)))


def _report_dry_run(plans: list[PlannedTrial], stream: TextIO) -> int:
    stream.write(format_table(plans, with_results=False) + "\n")
    counts = {a: sum(p.action == a for p in plans) for a in ACTIONS}
    stream.write(", ".join(f"{n} {a}" for a, n in counts.items() if n) + "\n")
    return 0


def run_sweep(opts: SweepOptions, stream: TextIO = sys.stderr) -> int:
    """Run the member grid(s) to the end; 0 when every point is finished, 1 when some failed."""
    members = load_members(opts.sweeps_dir, opts.member)
    points = [point for member in members for point in expand(member, opts.profile, opts.repeats or member.repeats)]
    prepared = prepare(opts.input_path)  # once, here, so trials never race to write it
    for point in points:
        check_fits(point.config, prepared)

    attached = os.environ.get("MLFLOW_RUN_ID")  # the run `mlflow run` created becomes the parent
    if not opts.dry_run:
        ensure_store()
    elif store_missing():  # nothing tracked yet, so every point would run; a dry run creates no store
        return _report_dry_run(plan(points, []), stream)
    scope = study_scope(opts.experiment)
    claims = Claims()  # before the runs (README, "Claims: one driver per point")
    runs = study_runs(scope.ids)
    members_swept = {point.member for point in points}
    holders = {r.info.experiment_id for r in runs if r.data.tags.get(MEMBER_TAG) in members_swept}
    experiment_id = scope.home(holders, f"member {opts.member!r}", create=not opts.dry_run)
    plans = plan(points, runs, claims, experiment_id)
    if opts.dry_run:
        return _report_dry_run(plans, stream)

    end_stale_sweeps(scope.ids, keep=attached)
    name = f"sweep-{opts.member}-{opts.profile}"
    if not attached and not any(p.launches for p in plans):
        stream.write(format_table(plans, with_results=True) + "\n")
        stream.write(f"{name}: nothing to run: every grid point is finished or running elsewhere\n")
        return 0
    # before any run is written: an executor that cannot serve this sweep (a file store for a cluster) refuses here
    executor = make_executor(opts.executor, opts.workers, opts.trials_per_gpu, opts.input_path, opts.ray_address)
    with contextlib.closing(executor):
        tags = {MEMBER_TAG: opts.member, PROFILE_TAG: opts.profile}
        parent = open_parent(experiment_id, attached, name, SWEEP_RUN, tags)
        parent.log_params(
            {
                "member": opts.member,
                "profile": opts.profile,
                "workers": opts.workers,
                "trials_per_gpu": opts.trials_per_gpu,
                "fuse": opts.fuse or "auto",
                "grid_points": len(points),
                "executor": opts.executor,
            }
        )
        limit = fuse_limit(opts.fuse, executor.cuda)
        groups = fused_groups(plans, limit)
        tally = Tally(len(plans), executor.capacity, stream)
        tally.skipped = sum(not p.launches for p in plans)
        fused = f" in {len(groups)} fused group(s)" if len(groups) < sum(p.launches for p in plans) else ""
        tally.report(f"{name}: {len(plans)} grid points{fused}, {executor.capacity} at a time on {executor.where}")

        started = time.monotonic()
        by_run: dict[str, PlannedTrial] = {}
        with OwnedFolder("nanosweep-logs-") as log_dir, supervise_trials(name, executor, parent, stream):
            _drive(groups, executor, claims, experiment_id, parent.run_id, tally, log_dir, by_run, limit)

        summary = format_table(plans, with_results=True)
        failed = [p for p in plans if p.launches and p.status != "FINISHED"]
        stream.write(summary + "\n")
        parent.log_text(summary + "\n", "summary.txt")
        parent.log_metrics(
            {
                "trials_finished": tally.done,
                "trials_skipped": tally.skipped,
                "trials_failed": tally.failed,
                "sweep_seconds": time.monotonic() - started,
            },
            step=0,
        )
        if failed:
            names = ", ".join(p.point.config.run_name for p in failed)
            stream.write(f"{name}: {len(failed)} trial(s) failed: {names}\n")
            parent.finish("FAILED", f"failed trials: {names}")
            return 1
        parent.finish("FINISHED")
        return 0
