"""The study's numbers from a table of runs: rankings, main effects, importance, where overfitting sets in.

How sure each number is (intervals, noise floor, ties, ANOVA) comes from `stats`.

Pure functions of the DataFrames that `query` builds, so every figure is reproducible from the store.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pandas as pd

from nanosweep.analysis import stats
from nanosweep.analysis.layout import HYPERPARAMETERS
from nanosweep.tracking.query import SelectionError, member_order

ALL_SCOPE = "all"  # main effects over every member together
OVERFIT_TOLERANCE = 0.01  # nats: a validation loss this far above its best is a rise, not evaluation noise
EFFECT_COLUMNS = [
    "scope",
    "metric",
    "factor",
    "level",
    "runs",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "min",
    "max",
    "effect",
    "balanced",
]


RANKED_COLUMNS = ["member", "name", "val_loss", "train_loss", "loss_gap", "best_val_loss", "total_params"]


def rankings(runs: pd.DataFrame, by: str) -> pd.DataFrame:
    """Runs ranked by `by` (val_loss or loss_gap, lower is better) overall and within their member.

    Values equal to a millionth of a nat share a rank (float noise is no difference); ties list in global id order.
    """
    table = runs.sort_values("global_id", kind="stable")[RANKED_COLUMNS].copy()
    key = table[by].round(6)
    table.insert(0, "rank", key.rank(method="min").astype(int))
    table.insert(1, "rank_in_member", key.groupby(table["member"]).rank(method="min").astype(int))
    return table.sort_values("rank", kind="stable").reset_index(drop=True)


def best_per_member(runs: pd.DataFrame) -> pd.DataFrame:
    """Each member's run with the lowest validation loss (ties: the lower global id), in member order."""
    ordered = runs.sort_values("global_id", kind="stable")
    best = ordered.loc[ordered.groupby("member", sort=False)["val_loss"].idxmin()]
    columns = ["member", "name", *HYPERPARAMETERS, "val_loss", "train_loss", "loss_gap", "total_params"]
    return best[columns].reset_index(drop=True)


def varied(runs: pd.DataFrame) -> list[str]:
    """The hyperparameters that take more than one value in these runs."""
    return [h for h in HYPERPARAMETERS if runs[h].nunique() > 1]


def is_balanced(runs: pd.DataFrame, factor: str, others: list[str]) -> bool:
    """True when every level of factor meets the same combinations of the other factors (a full grid does)."""
    combos = [Counter(map(tuple, group[others].to_numpy().tolist())) for _, group in runs.groupby(factor)]
    return all(c == combos[0] for c in combos)


def scopes(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Each member's runs, then all of them together when there are several members."""
    parts = [(member, group) for member, group in runs.groupby("member", sort=False)]
    if runs["member"].nunique() > 1:
        parts.append((ALL_SCOPE, runs))
    return parts


def main_effects(runs: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """Mean and spread of metric at each level of each varied hyperparameter, per member and over all members.

    `effect` is the range of the level means; with a balanced grid the other factors average out of it.
    `ci_low`/`ci_high`: the 95 % interval of the level mean from the scope's ANOVA error term (nan without one).
    """
    rows = []
    for scope, group in scopes(runs):
        factors = varied(group)
        error = stats.anova(group, metric, factors)
        for factor in factors:
            levels = group.groupby(factor)[metric].agg(["count", "mean", "std", "min", "max"])
            balanced = is_balanced(group, factor, [f for f in factors if f != factor])
            effect = levels["mean"].max() - levels["mean"].min()
            for level, stat in levels.iterrows():
                half = stats.level_half_width(error, int(stat["count"]))
                rows.append(
                    {
                        "scope": scope,
                        "metric": metric,
                        "factor": factor,
                        "level": level,
                        "runs": int(stat["count"]),
                        "mean": stat["mean"],
                        "std": stat["std"],
                        "ci_low": stat["mean"] - half,
                        "ci_high": stat["mean"] + half,
                        "min": stat["min"],
                        "max": stat["max"],
                        "effect": effect,
                        "balanced": balanced,
                    }
                )
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def importance(effects: pd.DataFrame) -> pd.DataFrame:
    """One row per scope and factor, largest effect first: which hyperparameters matter and their best level."""
    rows = []
    for (scope, factor), group in effects.groupby(["scope", "factor"], sort=False):
        best = group.loc[group["mean"].idxmin()]
        worst = group.loc[group["mean"].idxmax()]
        rows.append(
            {
                "scope": scope,
                "factor": factor,
                "effect": best["effect"],
                "best_level": best["level"],
                "best_mean": best["mean"],
                "worst_level": worst["level"],
                "worst_mean": worst["mean"],
                "balanced": best["balanced"],
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    order = {scope: i for i, scope in enumerate(dict.fromkeys(effects["scope"]))}
    table["_order"] = table["scope"].map(order)
    return table.sort_values(["_order", "effect"], ascending=[True, False], kind="stable").drop(columns="_order")


def overfitting(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Per run, from its evaluations: where validation loss bottomed out and how far it rose after.

    A run overfits when its final validation loss is above its best by more than OVERFIT_TOLERANCE;
    `best_step` is then where overfitting set in (early stopping would have stopped there).
    """
    val = history[history["key"] == "val_loss"]
    train = history[history["key"] == "train_loss"]
    rows = []
    for run in runs.itertuples():
        points = val[val["run_id"] == run.run_id].sort_values("step")
        if points.empty:
            continue
        best = points.loc[points["value"].idxmin()]
        final = points.iloc[-1]
        train_points = train[train["run_id"] == run.run_id].set_index("step")["value"]
        gaps = points.set_index("step")["value"] - train_points
        rise = final["value"] - best["value"]
        rows.append(
            {
                "member": run.member,
                "name": run.name,
                "evaluations": len(points),
                "best_step": int(best["step"]),
                "best_val_loss": best["value"],
                "final_step": int(final["step"]),
                "final_val_loss": final["value"],
                "rise_after_best": rise,
                "overfits": bool(rise > OVERFIT_TOLERANCE),
                "final_gap": gaps.dropna().iloc[-1] if gaps.notna().any() else float("nan"),
                "max_gap": gaps.max(),
            }
        )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Findings:
    """Every number the report states, computed once from the runs and their evaluations."""

    runs: pd.DataFrame
    members: list[str]
    best: pd.DataFrame
    by_val_loss: pd.DataFrame
    by_loss_gap: pd.DataFrame
    effects: pd.DataFrame  # main effects on val_loss and on loss_gap, long format
    importance_val: pd.DataFrame
    importance_gap: pd.DataFrame
    overfitting: pd.DataFrame
    points: pd.DataFrame  # per grid point: n, mean, std, 95 % interval of each final loss
    by_mean: pd.DataFrame  # grid points ranked by mean validation loss, with the test against the best
    anova_val: stats.Anova  # factorial ANOVA of validation loss over the report's scope
    anova_gap: stats.Anova  # the same for the loss gap
    noise: stats.Noise  # seed-to-seed spread of validation loss (or the ANOVA residual without replicates)
    interaction: tuple[str, str] | None  # the strongest two-way interaction on validation loss


def findings(runs: pd.DataFrame, history: pd.DataFrame) -> Findings:
    """Rankings, main effects, overfitting and their uncertainty for a selection of runs (one profile, members)."""
    factors = varied(runs)
    if not factors:  # effects, ANOVA and their plots compare levels: one configuration has none
        members = ", ".join(member_order(runs))
        raise SelectionError(
            f"the {len(runs)} finished run(s) of {members} share one configuration of {', '.join(HYPERPARAMETERS)}: "
            "an analysis compares configurations; finish at least two grid points first"
        )
    effects_val = main_effects(runs, "val_loss")
    effects_gap = main_effects(runs, "loss_gap")
    points = stats.point_stats(runs, list(HYPERPARAMETERS))
    anova_val = stats.anova(runs, "val_loss", factors)
    spread, df = stats.pooled_std(runs, "val_loss")
    noise = stats.Noise(spread, df, stats.REPLICATES) if df else anova_val.noise
    return Findings(
        runs=runs,
        members=member_order(runs),
        best=best_per_member(runs),
        by_val_loss=rankings(runs, "val_loss"),
        by_loss_gap=rankings(runs, "loss_gap"),
        effects=pd.concat([effects_val, effects_gap], ignore_index=True),
        importance_val=importance(effects_val),
        importance_gap=importance(effects_gap),
        overfitting=overfitting(runs, history),
        points=points,
        by_mean=stats.compare_with_best(runs, points, anova_val),
        anova_val=anova_val,
        anova_gap=stats.anova(runs, "loss_gap", factors),
        noise=noise,
        interaction=stats.strongest_interaction(anova_val.table),
    )
