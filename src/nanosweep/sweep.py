"""The sweep driver: expand member grids, skip what is finished, resume what was cut off, run the rest.

Each trial (a fused group of runs) is its own process (`nanosweep train-group`), started by an executor
(executors.py: this machine, or a Ray cluster), so a crash or out-of-memory fails that group alone. Runs are
created here, in the parent, before any trial starts: concurrent first writes to a new SQLite store corrupt it
(MLFLOW-NOTES).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from nanosweep.data import prepare
from nanosweep.executors import STOP_GRACE_SECONDS, Executor, TrialExit, TrialLaunch, make_executor
from nanosweep.filelocks import OwnedFolder
from nanosweep.grid import GridPoint, expand, load_members
from nanosweep.stopping import Interrupted, signal_name, stop_signals
from nanosweep.tracking import (
    CONFIG_HASH_TAG,
    END_REASON_TAG,
    FUSED_GROUP_TAG,
    HOST_TAG,
    MEMBER_TAG,
    PARENT_RUN_TAG,
    PID_TAG,
    PROFILE_TAG,
    RUN_KIND_TAG,
    CheckpointUnreadable,
    Claims,
    Heartbeat,
    TrackedRun,
    alive,
    ensure_store,
    heartbeat_age,
    heartbeat_now,
    open_runs,
    search_runs,
    store_missing,
    study_scope,
)
from nanosweep.train import fusion_key
from nanosweep.trial import check_fits, trial_spec

# --fuse auto on CPU: trials per group (bench/README.md, bench_study.py: on a 2-core CPU fusing is no slower per
# trial-iteration and saves a process start per trial); on CUDA a group takes every trial of its fusion key.
CPU_AUTO_FUSE = 4
CUDA_AUTO_FUSE = 64


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


@dataclass
class PlannedTrial:
    point: GridPoint
    action: str  # run, rerun (a FAILED run exists), resume (KILLED or stale RUNNING), skip (FINISHED), busy
    run_id: str | None = None
    note: str = ""
    status: str = ""  # the run's status when the sweep ends
    seconds: float = 0.0
    val_loss: float | None = None

    @property
    def launches(self) -> bool:
        return self.action in ("run", "rerun", "resume")


@dataclass
class Progress:
    """One line per event: done, running, skipped, failed, and an ETA from this sweep's trial times."""

    total: int
    capacity: int
    stream: TextIO
    done: int = 0
    failed: int = 0
    skipped: int = 0
    running: int = 0
    durations: list[float] = field(default_factory=list)

    def eta(self) -> str:
        left = self.total - self.done - self.failed - self.skipped
        if not self.durations or not left:
            return "-"
        seconds = sum(self.durations) / len(self.durations) * left / self.capacity
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

    def report(self, event: str) -> None:
        finished = self.done + self.failed + self.skipped
        self.stream.write(
            f"[{finished}/{self.total}] done {self.done} | running {self.running} | skipped {self.skipped} | "
            f"failed {self.failed} | ETA {self.eta()}  {event}\n"
        )
        self.stream.flush()


def end_stale_sweeps(experiment_ids: list[str], keep: str | None, kind: str = "sweep") -> None:
    """End KILLED the parent runs (of a sweep, or a search) whose driver died (SIGKILL, a lost machine): their
    heartbeat is stale."""
    for run in search_runs(experiment_ids, f"tags.{RUN_KIND_TAG} = '{kind}' and attributes.status = 'RUNNING'"):
        if run.info.run_id != keep and not alive(run.data.tags):
            TrackedRun(run.info.run_id).finish("KILLED", f"the {kind} process was killed; a later {kind} took over")


def study_runs(experiment_ids: list[str]) -> list[Any]:
    """Every sweep trial, and every finished imported run, in the experiments: what a sweep must not redo."""
    trials = search_runs(experiment_ids, f"tags.{RUN_KIND_TAG} = 'trial'")
    return trials + search_runs(experiment_ids, f"tags.{RUN_KIND_TAG} = 'imported' and attributes.status = 'FINISHED'")


def plan(
    points: list[GridPoint], runs: list[Any], claims: Claims | None = None, experiment_id: str | None = None
) -> list[PlannedTrial]:
    """Decide per grid point, from the study runs already there with the same config hash and profile, and from
    the claims on the points in experiment_id (a point another live driver claimed is busy)."""
    existing: dict[tuple[str, str], list[Any]] = {}
    for run in runs:
        key = (run.data.tags.get(CONFIG_HASH_TAG, ""), run.data.tags.get(PROFILE_TAG, ""))
        existing.setdefault(key, []).append(run)
    plans = []
    for point in points:
        runs = sorted(existing.get((point.config.config_hash, point.profile), []), key=lambda r: -r.info.start_time)
        by_status = {
            status: [r for r in runs if r.info.status == status] for status in ("FINISHED", "RUNNING", "KILLED")
        }
        if by_status["FINISHED"]:
            run = by_status["FINISHED"][0]
            plans.append(
                PlannedTrial(
                    point, "skip", run.info.run_id, "finished", "FINISHED", 0.0, run.data.metrics.get("val_loss")
                )
            )
            continue
        live = [r for r in by_status["RUNNING"] if alive(r.data.tags)]
        if live:
            tags = live[0].data.tags
            where = f"on {tags[HOST_TAG]}, " if HOST_TAG in tags else ""
            note = f"running {where}heartbeat {heartbeat_age(tags):.0f}s ago"
            plans.append(PlannedTrial(point, "busy", live[0].info.run_id, note, "RUNNING"))
            continue
        holder = claims and experiment_id and claims.holder(experiment_id, point.profile, point.config.config_hash)
        if holder:
            plans.append(PlannedTrial(point, "busy", None, f"claimed by the driver of run {holder}"))
            continue
        cut_off = [r for r in runs if r.info.status in ("RUNNING", "KILLED")]
        if cut_off:
            iteration = cut_off[0].data.tags.get("nanosweep.checkpoint_iter", "0")
            plans.append(PlannedTrial(point, "resume", cut_off[0].info.run_id, f"from iteration {iteration}"))
        elif runs:
            plans.append(
                PlannedTrial(point, "rerun", None, f"previous run {runs[0].info.run_id} {runs[0].info.status}")
            )
        else:
            plans.append(PlannedTrial(point, "run"))
    return plans


def fuse_limit(fuse: int, cuda: bool) -> int:
    """Trials per fused group: --fuse N, or for auto what the benchmarks chose for this kind of device.

    On CUDA memory is not the limit it seems: a group splits each step into as many passes as its memory
    needs (train.sequences_per_pass), so auto groups every trial that can fuse.
    """
    if fuse:
        return fuse
    return CUDA_AUTO_FUSE if cuda else CPU_AUTO_FUSE


def fused_groups(plans: list[PlannedTrial], limit: int) -> list[list[PlannedTrial]]:
    """The launching trials in groups of at most limit that share a fusion key, in global id order.

    Within a key, trials are ordered by head count and dropout so that trials of one attention shape and rate sit
    together (fewer kernel calls).
    """
    by_key: dict[tuple, list[PlannedTrial]] = {}
    for planned in plans:
        if planned.launches:
            by_key.setdefault(fusion_key(planned.point.config), []).append(planned)
    groups = []
    for members in by_key.values():
        members.sort(
            key=lambda p: (p.point.config.n_head, p.point.config.dropout, p.point.global_id, p.point.config.seed)
        )
        groups += [members[i : i + limit] for i in range(0, len(members), limit)]
    return sorted(groups, key=lambda group: min(p.point.global_id for p in group))


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


def format_table(plans: list[PlannedTrial], with_results: bool) -> str:
    header = f"{'id':>4}  {'run':<40} {'action':<7} "
    header += f"{'status':<9} {'val_loss':>8} {'time':>7}" if with_results else "note"
    lines = [header, "-" * len(header)]
    for p in plans:
        line = f"{p.point.global_id:>4}  {p.point.config.run_name:<40} {p.action:<7} "
        if with_results:
            val = f"{p.val_loss:.4f}" if p.val_loss is not None else "-"
            line += f"{p.status:<9} {val:>8} {p.seconds:>6.1f}s"
        else:
            line += p.note
        lines.append(line)
    return "\n".join(lines)


def adopt(run_id: str, parent_id: str) -> None:
    """A cut-off run moves under the driver (sweep or search) that resumes it: its parent, a fresh heartbeat, and
    its ending if the driver stops before a trial process ends it."""
    run = TrackedRun(run_id)
    with stop_signals.deferred():
        run.set_tags({PARENT_RUN_TAG: parent_id, **heartbeat_now()})
        open_runs.add(run)


def close_trial_run(exit: TrialExit, run_id: str) -> Any:
    """One of the ended process's runs, its output added under logs/. A run the process left RUNNING ends here:
    KILLED when its machine was lost (a rerun resumes it), FAILED when the process died on its own."""
    run = TrackedRun(run_id)
    info = run.info()
    if info.info.status == "RUNNING" and exit.lost:
        run.finish("KILLED", f"its machine was lost: {exit.lost}")
        info = run.info()
    elif info.info.status == "RUNNING":
        lines = exit.launch.log_path.read_text(errors="replace").strip().splitlines()
        run.finish("FAILED", f"trial process exited with {exit.returncode}: {lines[-1] if lines else 'no output'}")
        info = run.info()
    run.log_file(exit.launch.log_path, "logs")
    open_runs.discard(run_id)  # ended, by its trial or just now
    return info


def _collect(exit: TrialExit, by_run: dict[str, PlannedTrial], progress: Progress) -> list[PlannedTrial]:
    """Record a group's end in its plans and the progress line.

    Returns the grid points to train again in new runs: resumed runs whose checkpoint was unreadable.
    """
    again = []
    for run_id in exit.launch.run_ids:
        planned = by_run[run_id]
        info = close_trial_run(exit, run_id)
        progress.running -= 1
        reason = info.data.tags.get(END_REASON_TAG, "no reason recorded")
        if planned.action == "resume" and reason.startswith(f"{CheckpointUnreadable.__name__}:"):
            name = planned.point.config.run_name
            progress.report(f"{name}: {reason}; run FAILED, training the grid point in a new run")
            planned.action, planned.note = "rerun", f"checkpoint of run {planned.run_id} unreadable"
            planned.run_id = None
            again.append(planned)
            continue
        planned.status, planned.seconds = info.info.status, exit.seconds
        planned.val_loss = info.data.metrics.get("val_loss")
        event = f"{planned.point.config.run_name} {planned.status} in {exit.seconds:.1f}s"
        if planned.status == "FINISHED":
            progress.done += 1
            progress.durations.append(exit.seconds / len(exit.launch.run_ids))  # a fused trial's share
        else:
            progress.failed += 1
            event += f": {reason}"
        progress.report(event)
    return again


def _claim(planned: PlannedTrial, claims: Claims, experiment_id: str, parent_id: str, progress: Progress) -> bool:
    """Claim the point before launching it; one that another driver claimed first is busy, that driver's."""
    holder = claims.take(experiment_id, planned.point.profile, planned.point.config.config_hash, parent_id)
    if holder == parent_id:
        return True
    planned.action, planned.note = "busy", f"claimed by the driver of run {holder}"
    progress.skipped += 1
    progress.report(f"{planned.point.config.run_name} busy: another driver (run {holder}) claimed it first")
    return False


def _drive(
    groups: list[list[PlannedTrial]],
    executor: Executor,
    claims: Claims,
    experiment_id: str,
    parent_id: str,
    progress: Progress,
    log_dir: Path,
    by_run: dict[str, PlannedTrial],
    fuse: int,
) -> None:
    """Run the groups, each point claimed first; by_run maps every run started to its plan."""
    queue = deque(groups)
    started = 0
    while queue or executor.running():
        while queue and len(executor.running()) < executor.capacity:
            group = [p for p in queue.popleft() if _claim(p, claims, experiment_id, parent_id, progress)]
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
            progress.running += len(group)
            members = ", ".join(
                f"{p.point.config.run_name} ({p.action}{', ' + p.note if p.note else ''})" for p in group
            )
            progress.report(f"{name} started: {members}" if len(group) > 1 else f"{members} started")
        for exit in executor.wait(timeout=1.0):
            queue.extendleft(reversed(fused_groups(_collect(exit, by_run, progress), fuse)))


def open_parent(experiment_id: str, attached: str | None, name: str, kind: str, tags: dict[str, Any]) -> TrackedRun:
    """The parent run of a sweep or a search (the run `mlflow run` created, else a new one), tagged with its driver."""
    if attached:
        parent = TrackedRun(attached)
        parent.take_over()
    else:
        parent = TrackedRun.create(experiment_id, name, {RUN_KIND_TAG: kind})
    driver = {HOST_TAG: socket.gethostname(), PID_TAG: os.getpid(), **heartbeat_now()}
    parent.set_tags({RUN_KIND_TAG: kind, "mlflow.runName": name, **tags, **driver})
    return parent


@contextlib.contextmanager
def supervise_trials(name: str, executor: Executor, parent: TrackedRun, stream: TextIO) -> Iterator[None]:
    """The driver's duties while its trials run: keep the parent's and the running trials' heartbeats fresh
    (a trial waiting for its process, or for Ray to rerun it elsewhere, is still this driver's), and when the
    driver stops (SIGTERM, Ctrl-C, an error) stop the running trials first: they end their runs KILLED, to be
    resumed. The parent, and runs that no trial ended (killed after the grace, or never started), end with the
    command (tracking.open_runs).
    """

    def launched() -> list[str]:
        """The runs of every trial process started and not ended yet: this driver keeps them alive."""
        return [run_id for launch in executor.running() for run_id in launch.run_ids]

    with Heartbeat([parent.run_id], also=launched):
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, (Interrupted, KeyboardInterrupt)):
                stream.write(f"{name}: interrupted by {signal_name(exc)}; stopping {len(launched())} trial(s)\n")
            # trials that got the same Ctrl-C are already ending their runs and ignore this SIGTERM
            executor.stop(signal.SIGTERM, STOP_GRACE_SECONDS)
            raise


def _report_dry_run(plans: list[PlannedTrial], stream: TextIO) -> int:
    stream.write(format_table(plans, with_results=False) + "\n")
    counts = {a: sum(p.action == a for p in plans) for a in ("run", "rerun", "resume", "skip", "busy")}
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
        parent = open_parent(experiment_id, attached, name, "sweep", tags)
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
        progress = Progress(len(plans), executor.capacity, stream)
        progress.skipped = sum(not p.launches for p in plans)
        fused = f" in {len(groups)} fused group(s)" if len(groups) < sum(p.launches for p in plans) else ""
        progress.report(f"{name}: {len(plans)} grid points{fused}, {executor.capacity} at a time on {executor.where}")

        started = time.monotonic()
        by_run: dict[str, PlannedTrial] = {}
        with OwnedFolder("nanosweep-logs-") as log_dir, supervise_trials(name, executor, parent, stream):
            _drive(groups, executor, claims, experiment_id, parent.run_id, progress, log_dir, by_run, limit)

        summary = format_table(plans, with_results=True)
        failed = [p for p in plans if p.launches and p.status != "FINISHED"]
        stream.write(summary + "\n")
        parent.log_text(summary + "\n", "summary.txt")
        parent.log_metrics(
            {
                "trials_finished": progress.done,
                "trials_skipped": progress.skipped,
                "trials_failed": progress.failed,
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
