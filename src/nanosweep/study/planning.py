"""What a sweep does with each grid point (run, rerun, resume, skip, busy), decided from the runs in the store and the
claims, and how the points to launch are fused into groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanosweep.group import fusion_key
from nanosweep.study.grid import GridPoint
from nanosweep.tracking.claims import Claims
from nanosweep.tracking.heartbeat import alive, heartbeat_age
from nanosweep.tracking.names import (
    CHECKPOINT_ITER_TAG,
    CONFIG_HASH_TAG,
    HOST_TAG,
    IMPORTED_RUN,
    PROFILE_TAG,
    RUN_KIND_TAG,
    TRIAL_RUN,
)
from nanosweep.tracking.store import search_runs

# --fuse auto on CPU: trials per group (bench/README.md, bench_study.py: on a 2-core CPU fusing is no slower per
# trial-iteration and saves a process start per trial); on CUDA a group takes every trial of its fusion key.
CPU_AUTO_FUSE = 4
CUDA_AUTO_FUSE = 64

# what a sweep plans for a grid point
RUN = "run"  # no run yet: train it in a new run
RERUN = "rerun"  # its runs FAILED (or its checkpoint was unreadable): train it in a new run
RESUME = "resume"  # its run was cut off (KILLED, or RUNNING with a stale heartbeat): continue it from its checkpoint
SKIP = "skip"  # a run of it FINISHED: never trained again
BUSY = "busy"  # another driver trains it now (its run is alive, or its claim stands)
ACTIONS = (RUN, RERUN, RESUME, SKIP, BUSY)
LAUNCHES = (RUN, RERUN, RESUME)


@dataclass
class PlannedTrial:
    point: GridPoint
    action: str  # one of ACTIONS
    run_id: str | None = None
    note: str = ""
    status: str = ""  # the run's status when the sweep ends
    seconds: float = 0.0
    val_loss: float | None = None

    @property
    def launches(self) -> bool:
        return self.action in LAUNCHES


def study_runs(experiment_ids: list[str]) -> list[Any]:
    """Every sweep trial, and every finished imported run, in the experiments: what a sweep must not redo."""
    trials = search_runs(experiment_ids, f"tags.{RUN_KIND_TAG} = '{TRIAL_RUN}'")
    imported = f"tags.{RUN_KIND_TAG} = '{IMPORTED_RUN}' and attributes.status = 'FINISHED'"
    return trials + search_runs(experiment_ids, imported)


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
                    point, SKIP, run.info.run_id, "finished", "FINISHED", 0.0, run.data.metrics.get("val_loss")
                )
            )
            continue
        live = [r for r in by_status["RUNNING"] if alive(r.data.tags)]
        if live:
            tags = live[0].data.tags
            where = f"on {tags[HOST_TAG]}, " if HOST_TAG in tags else ""
            note = f"running {where}heartbeat {heartbeat_age(tags):.0f}s ago"
            plans.append(PlannedTrial(point, BUSY, live[0].info.run_id, note, "RUNNING"))
            continue
        holder = claims and experiment_id and claims.holder(experiment_id, point.profile, point.config.config_hash)
        if holder:
            plans.append(PlannedTrial(point, BUSY, None, f"claimed by the driver of run {holder}"))
            continue
        cut_off = [r for r in runs if r.info.status in ("RUNNING", "KILLED")]
        if cut_off:
            iteration = cut_off[0].data.tags.get(CHECKPOINT_ITER_TAG, "0")
            plans.append(PlannedTrial(point, RESUME, cut_off[0].info.run_id, f"from iteration {iteration}"))
        elif runs:
            plans.append(
                PlannedTrial(point, RERUN, None, f"previous run {runs[0].info.run_id} {runs[0].info.status}")
            )
        else:
            plans.append(PlannedTrial(point, RUN))
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
