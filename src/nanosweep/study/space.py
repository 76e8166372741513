"""Search spaces (YAML files in sweeps/search/): fixed TrainConfig fields, one Optuna distribution per searched field.

A space file names the study: rerunning a search with the same file continues the same Optuna study.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from nanosweep.config import FIELD_TYPES, ConfigError, TrainConfig, check_value
from nanosweep.study.grid import PROFILES
from nanosweep.textfiles import read_yaml

SPACE_KEYS = ("description", "profile", "objective", "fixed", "params")
OBJECTIVES = ("val_loss",)  # the final validation loss, minimised
RANGE_KEYS = ("low", "high", "log", "step")
UNSEARCHABLE = ("seed",)  # every trial trains with the same seed: differences come from the hyperparameters


class SpaceError(ConfigError):
    """A search-space file is malformed; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class SearchSpace:
    """One search: what stays fixed, what is searched and how, on which profile."""

    name: str  # the file's stem: the Optuna study name and the `search` tag of its runs
    path: Path
    profile: str  # a grid.PROFILES name, applied to every sampled configuration
    objective: str  # the metric minimised: the final val_loss
    fixed: dict[str, Any]  # TrainConfig fields every trial shares
    params: dict[str, BaseDistribution]  # TrainConfig field -> Optuna distribution

    @property
    def digest(self) -> str:
        """What the file means (not how it is written): a changed space must not continue an old study."""
        doc = {
            "profile": self.profile,
            "objective": self.objective,
            "fixed": self.fixed,
            "params": {k: repr(v) for k, v in self.params.items()},
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def configurations(self) -> list[dict[str, Any]] | None:
        """Every assignment of the searched values, in grid order; None when a range is continuous."""
        values = []
        for dist in self.params.values():
            if isinstance(dist, CategoricalDistribution):
                values.append(list(dist.choices))
            elif isinstance(dist, IntDistribution):
                values.append(list(range(dist.low, dist.high + 1, dist.step)))
            elif dist.step is not None:
                count = math.floor(round((dist.high - dist.low) / dist.step, 9)) + 1
                values.append([dist.low + i * dist.step for i in range(count)])
            else:
                return None
        return [dict(zip(self.params, combination)) for combination in itertools.product(*values)]

    @property
    def size(self) -> float:
        """How many distinct configurations the space holds (inf when a range is continuous)."""
        size = 1.0
        for dist in self.params.values():
            if isinstance(dist, CategoricalDistribution):
                size *= len(dist.choices)
            elif isinstance(dist, IntDistribution):
                size *= (dist.high - dist.low) // dist.step + 1
            elif dist.step is not None:
                size *= math.floor(round((dist.high - dist.low) / dist.step, 9)) + 1
            else:
                return math.inf
        return size

    def config(self, values: dict[str, Any]) -> TrainConfig:
        """The configuration a trial trains: fixed fields, the sampled values, then the profile."""
        return PROFILES[self.profile](TrainConfig(**{**self.fixed, **values}))


def _bound(path: Path, key: str, value: Any, kind: type) -> int | float:
    """A bound or step of the field's type."""
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise SpaceError(f"{path}: key {key!r} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _allowed(path: Path, key: str, name: str, value: Any) -> None:
    """A value the field can take (TrainConfig's rule for it), refused up front rather than trial after trial."""
    try:
        check_value(name, value)
    except ConfigError as exc:
        raise SpaceError(f"{path}: key {key!r}: {exc}") from None


def _distribution(path: Path, name: str, spec: Any) -> BaseDistribution:
    key = f"params.{name}"
    kind = FIELD_TYPES[name]
    usage = "{choices: [...]} or {low: L, high: H} with optional log: true or step: S"
    if not isinstance(spec, dict):
        raise SpaceError(f"{path}: key {key!r} must be a mapping: {usage}, got {spec!r}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
            raise SpaceError(f"{path}: key {key!r} must be {{choices: [a non-empty list]}} alone, got {spec!r}")
        if kind in (int, float):
            choices = [_bound(path, f"{key}.choices", c, kind) for c in choices]
        wrong = [c for c in choices if not isinstance(c, kind)]
        if wrong:
            raise SpaceError(f"{path}: key '{key}.choices' holds {wrong[0]!r}: {name} takes {kind.__name__} values")
        repeated = [c for i, c in enumerate(choices) if c in choices[:i]]
        if repeated:
            raise SpaceError(f"{path}: key '{key}.choices' lists {repeated[0]!r} twice: give each value once")
        for choice in choices:
            _allowed(path, f"{key}.choices", name, choice)
        return CategoricalDistribution(choices)
    unknown = sorted(set(spec) - set(RANGE_KEYS))
    if unknown or "low" not in spec or "high" not in spec:
        raise SpaceError(f"{path}: key {key!r} is {spec!r}: use {usage}")
    if kind not in (int, float):
        raise SpaceError(f"{path}: key {key!r}: {name} is a {kind.__name__} field: only choices are allowed")
    low = _bound(path, f"{key}.low", spec["low"], kind)
    high = _bound(path, f"{key}.high", spec["high"], kind)
    for bound, value in (("low", low), ("high", high)):  # a field's allowed values are an interval: ends suffice
        _allowed(path, f"{key}.{bound}", name, value)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{path}: key '{key}.log' must be true or false, got {log!r}")
    step = _bound(path, f"{key}.step", spec["step"], kind) if "step" in spec else None
    try:
        if kind is int:
            return IntDistribution(low, high, log=log, step=step or 1)
        return FloatDistribution(low, high, log=log, step=step)
    except ValueError as exc:  # Optuna's own checks: low <= high, log needs low > 0, no step with log
        raise SpaceError(f"{path}: key {key!r}: {exc}") from None


def load_space(path: Path) -> SearchSpace:
    """Read and check a space file; every complaint is one line naming the file and the key."""
    doc = read_yaml(path, SpaceError)
    if not isinstance(doc, dict):
        raise SpaceError(f"{path}: expected a mapping with keys {', '.join(SPACE_KEYS)}")
    unknown = [k for k in doc if k not in SPACE_KEYS]
    if unknown:
        raise SpaceError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(SPACE_KEYS)}")
    profile = doc.get("profile", "full")
    if profile not in PROFILES:
        raise SpaceError(f"{path}: key 'profile' is {profile!r}: choose one of {', '.join(PROFILES)}")
    objective = doc.get("objective", "val_loss")
    if objective not in OBJECTIVES:
        raise SpaceError(f"{path}: key 'objective' is {objective!r}: only val_loss (final, minimised) is supported")
    fixed, params = doc.get("fixed") or {}, doc.get("params")
    for key, section in (("fixed", fixed), ("params", params)):
        if not isinstance(section, dict) or (key == "params" and not section):
            raise SpaceError(f"{path}: key {key!r} must be a non-empty mapping of TrainConfig fields, got {section!r}")
        for name in section:
            if name not in FIELD_TYPES:
                raise SpaceError(f"{path}: key '{key}.{name}' is not a TrainConfig field")
    for name, value in fixed.items():  # as a member file's would be, before any trial is asked for
        _allowed(path, f"fixed.{name}", name, value)
    for name in params:
        if name in fixed:
            raise SpaceError(f"{path}: key 'params.{name}' is also in 'fixed': a field is either fixed or searched")
        if name in UNSEARCHABLE:
            raise SpaceError(f"{path}: key 'params.{name}' cannot be searched: every trial uses the fixed seed")
    distributions = {name: _distribution(path, name, spec) for name, spec in params.items()}
    return SearchSpace(path.stem, path, profile, objective, fixed, distributions)
