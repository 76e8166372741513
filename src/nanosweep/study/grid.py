"""Member grids (YAML files in sweeps/), profiles, and their expansion into the study's ordered grid points."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nanosweep
from nanosweep.config import TRAIN_FIELDS, ConfigError, TrainConfig
from nanosweep.textfiles import read_yaml
from nanosweep.tracking.names import (
    CONFIG_HASH_TAG,
    GLOBAL_ID_TAG,
    GRID_POSITION_TAG,
    MEMBER_TAG,
    PROFILE_TAG,
    REPLICATE_TAG,
    RUN_KIND_TAG,
    TRIAL_RUN,
)

MEMBER_KEYS = {"member", "description", "global_id_offset", "repeats", "fixed", "grid", "overrides"}
SEED_STRIDE = 1000  # replicate r of grid position p has seed p + SEED_STRIDE * (r - 1): no two points share a seed
MAX_RUNS = 100_000  # grid points x repeats of one member: more is a typo, not a study (and would not fit in memory)


class GridError(ConfigError):
    """A member file, member name or profile is wrong; the message names the file, key or value."""


def default_sweeps_dir() -> Path:
    """NANOSWEEP_SWEEPS_DIR, else ./sweeps, else the sweeps/ folder of this checkout."""
    if os.environ.get("NANOSWEEP_SWEEPS_DIR"):
        return Path(os.environ["NANOSWEEP_SWEEPS_DIR"])
    here = Path("sweeps")
    checkout = Path(nanosweep.__file__).resolve().parents[2]  # src/nanosweep/__init__.py -> the checkout
    return here if here.is_dir() else checkout / "sweeps"


@dataclass(frozen=True)
class Member:
    """One member's share of the study: fixed architecture, the grid over the rest, recipe overrides."""

    name: str
    path: Path
    global_id_offset: int
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]  # expansion order: the last key varies fastest
    overrides: dict[str, Any]
    repeats: int = 1  # seeds per grid point when the sweep's --repeats does not say

    @property
    def size(self) -> int:
        size = 1
        for values in self.grid.values():
            size *= len(values)
        return size


def load_member(path: Path) -> Member:
    """Read and check one member file; every complaint names the file and the key."""
    doc = read_yaml(path, GridError)
    if not isinstance(doc, dict):
        raise GridError(f"{path}: expected a mapping with keys {', '.join(sorted(MEMBER_KEYS))}")
    unknown = sorted(set(doc) - MEMBER_KEYS)
    if unknown:
        raise GridError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(MEMBER_KEYS))}")
    offset = doc.get("global_id_offset", 0)
    if not isinstance(offset, int) or offset < 0:
        raise GridError(f"{path}: key 'global_id_offset' must be an integer >= 0, got {offset!r}")
    repeats = doc.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise GridError(f"{path}: key 'repeats' must be an integer >= 1 (seeds per grid point), got {repeats!r}")
    sections = {}
    for key in ("fixed", "grid", "overrides"):
        section = doc.get(key) or {}
        if not isinstance(section, dict):
            raise GridError(f"{path}: key {key!r} must be a mapping of TrainConfig fields, got {section!r}")
        for name in section:
            if name not in TRAIN_FIELDS:
                raise GridError(f"{path}: key '{key}.{name}' is not a TrainConfig field")
        sections[key] = section
    if not sections["grid"]:
        raise GridError(f"{path}: key 'grid' is missing or empty")
    for name, values in sections["grid"].items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{path}: key 'grid.{name}' must be a non-empty list, got {values!r}")
        repeated = [value for i, value in enumerate(values) if value in values[:i]]
        if repeated:
            raise GridError(f"{path}: key 'grid.{name}' lists {repeated[0]!r} twice: give each value once")
    if "seed" in sections["grid"] or "seed" in sections["fixed"] or "seed" in sections["overrides"]:
        raise GridError(f"{path}: key 'seed' is not allowed: a run's seed is its 1-based grid position")
    return Member(
        str(doc.get("member") or path.stem),
        path,
        offset,
        sections["fixed"],
        sections["grid"],
        sections["overrides"],
        repeats,
    )


def load_members(sweeps_dir: Path, name: str) -> list[Member]:
    """The member called name, or every member for 'all', in global id order."""
    paths = sorted(sweeps_dir.glob("*.yaml")) + sorted(sweeps_dir.glob("*.yml"))
    if not paths:
        raise GridError(f"no member files (*.yaml) in {sweeps_dir}")
    members = sorted((load_member(p) for p in paths), key=lambda m: (m.global_id_offset, m.name))
    first: dict[str, Member] = {}
    for member in sorted(members, key=lambda m: m.path):
        if member.name in first:  # one sweep would train its grid twice
            raise GridError(
                f"member name {member.name!r} is used by {first[member.name].path} and {member.path}: "
                "give each member file its own `member:` name"
            )
        first[member.name] = member
    if name == "all":
        return members
    chosen = [m for m in members if m.name == name]
    if not chosen:
        valid = ", ".join(m.name for m in members)
        raise GridError(f"member={name!r} is unknown: choose one of {valid} or all")
    return chosen


def _quick(cfg: TrainConfig) -> TrainConfig:
    """The same architectures, batch sizes and dropouts, with iterations, evaluation and accumulation shrunk.

    Iterations, warmup and decay shrink by the same factor, so a quick run sits at the same point of its
    schedule as the study's (MI1000/MI2000 stay in warmup).
    """
    shrink = 20
    return cfg.replace(
        max_iters=max(1, cfg.max_iters // shrink),
        warmup_iters=cfg.warmup_iters // shrink,
        lr_decay_iters=cfg.lr_decay_iters // shrink,
        eval_interval=max(1, cfg.eval_interval // 8),
        eval_iters=max(1, cfg.eval_iters // 20),
        gradient_accumulation_steps=1,
        num_samples=min(cfg.num_samples, 2),
        max_new_tokens=min(cfg.max_new_tokens, 200),
    )


PROFILES: dict[str, Callable[[TrainConfig], TrainConfig]] = {
    "full": lambda cfg: cfg,  # the study's recipe unchanged: a GPU job
    "quick": _quick,  # a member's grid in about 10 minutes on a 2-core CPU
}


def check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise GridError(f"profile={profile!r} is unknown: choose one of {', '.join(PROFILES)}")


def replicate_seed(position: int, replicate: int) -> int:
    """The seed of a grid point's replicate: its position for replicate 1 (the study's run), then +1000 each."""
    return position + SEED_STRIDE * (replicate - 1)


@dataclass(frozen=True)
class GridPoint:
    member: str
    position: int  # 1-based position in the member's grid; the seed of replicate 1
    global_id: int  # shared by every replicate of the point
    profile: str
    config: TrainConfig
    replicate: int = 1  # 1-based seed replicate; config.seed is replicate_seed(position, replicate)

    def study_tags(self, run_kind: str = TRIAL_RUN) -> dict[str, str]:
        """The tags that place a run in the study: analysis and resuming select runs by them."""
        return {
            MEMBER_TAG: self.member,
            PROFILE_TAG: self.profile,
            GRID_POSITION_TAG: str(self.position),
            GLOBAL_ID_TAG: str(self.global_id),
            REPLICATE_TAG: str(self.replicate),
            CONFIG_HASH_TAG: self.config.config_hash,
            RUN_KIND_TAG: run_kind,
        }


def expand(member: Member, profile: str, repeats: int = 1) -> list[GridPoint]:
    """Every grid point in the study's order, validated, with the profile applied; its replicates side by side."""
    check_profile(profile)
    if repeats < 1:
        raise GridError(f"repeats={repeats} is not allowed: it must be >= 1 (seeds per grid point)")
    if member.size * repeats > MAX_RUNS:  # before anything is expanded
        raise GridError(
            f"{member.path}: {member.size} grid point(s) x repeats={repeats} is {member.size * repeats:,} runs: "
            f"a sweep of one member trains at most {MAX_RUNS:,}"
        )
    if repeats > 1 and member.size >= SEED_STRIDE:
        raise GridError(
            f"{member.path}: {member.size} grid points with repeats={repeats}: replicate seeds step by "
            f"{SEED_STRIDE}, so a grid with repeats must have fewer than {SEED_STRIDE} points"
        )
    points = []
    for index, values in enumerate(itertools.product(*member.grid.values())):
        position = index + 1
        chosen = dict(zip(member.grid, values))
        try:
            cfg = TrainConfig(**{**member.fixed, **chosen, **member.overrides, "seed": position})
        except (ConfigError, TypeError) as exc:
            raise GridError(f"{member.path}: grid point {position} {chosen}: {exc}") from None
        global_id = member.global_id_offset + position
        for replicate in range(1, repeats + 1):
            seeded = cfg.replace(seed=replicate_seed(position, replicate))
            points.append(GridPoint(member.name, position, global_id, profile, PROFILES[profile](seeded), replicate))
    return points
