"""How sure the study's conclusions are: per-point intervals, the noise floor, ties with the best, factorial ANOVA.

scipy computes the Student-t intervals and Welch's t-tests; statsmodels fits the factorial analysis of variance
(`ols` + `anova_lm`) and corrects the comparisons with the best for multiplicity (Holm). Only the analysis
imports this module, never a trial process.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats
import statsmodels.formula.api as smf
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multitest import multipletests

CONFIDENCE = 0.95  # every interval and test of the report
ALPHA = 1 - CONFIDENCE
CORRECTION = "holm"  # statsmodels' multipletests method: Holm-Bonferroni, valid whatever the tests' dependence
METRICS = ("val_loss", "train_loss", "loss_gap")  # per-point statistics of these final losses
POINT = ["member", "grid_position"]  # a grid point; its runs are the seed replicates
REPLICATES = "replicates"  # error term: the seed-to-seed variance within grid points
INTERACTIONS = "interactions"  # error term: the highest-order interactions (one seed per point)
NO_ERROR = "none"  # nothing left to estimate an error from
SEED_SUFFIX = re.compile(r"_s\d+$")


def point_label(run_name: str) -> str:
    """A grid point's name: its runs' name without the seed (b64_L4_H4_E128_BS8_MI1000_D10)."""
    return SEED_SUFFIX.sub("", run_name)


def t_interval(values: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation and the 95 % Student-t interval of the mean (nan with one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(np.std(values, ddof=1))
    if std == 0:
        return mean, 0.0, mean, mean
    low, high = scipy.stats.t.interval(CONFIDENCE, len(values) - 1, loc=mean, scale=std / math.sqrt(len(values)))
    return mean, std, float(low), float(high)


def point_stats(runs: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """Per grid point: its settings, n, and mean, std and 95 % t interval of each final loss, in grid order."""
    rows = []
    ordered = runs.sort_values(["global_id", "grid_position", "replicate"], kind="stable")
    for _, group in ordered.groupby(POINT, sort=False):
        first = group.iloc[0]
        row = {
            "member": first["member"],
            "global_id": int(first["global_id"]),
            "grid_position": int(first["grid_position"]),
            "point": point_label(first["name"]),
            **{factor: first[factor] for factor in factors},
            "n": len(group),
            "seeds": " ".join(str(seed) for seed in group["seed"]),
        }
        for metric in METRICS:
            mean, std, low, high = t_interval(group[metric].to_numpy())
            row.update(
                {f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_ci_low": low, f"{metric}_ci_high": high}
            )
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Noise:
    """The typical seed-to-seed spread of one run's final loss, and where the estimate comes from."""

    std: float  # nats; nan when nothing estimates it
    df: int  # degrees of freedom behind it
    source: str  # REPLICATES (pooled within-point std), INTERACTIONS (ANOVA residual) or NO_ERROR


def pooled_std(runs: pd.DataFrame, metric: str) -> tuple[float, int]:
    """The within-point standard deviation pooled over every grid point with two or more seeds, and its df."""
    groups = runs.groupby(POINT)[metric]
    squares = float((runs[metric] - groups.transform("mean")).pow(2).sum())
    df = int((groups.size() - 1).sum())
    return (math.sqrt(squares / df), df) if df else (math.nan, 0)


@dataclass(frozen=True)
class Anova:
    """A factorial ANOVA of one metric: the table, its error term, and whether the design is balanced."""

    table: pd.DataFrame  # term, kind, df, sum_sq, mean_sq, F, p, eta_sq, partial_eta_sq, significant
    error_ms: float  # mean square of the error term (nan when there is none)
    error_df: int
    error_source: str  # REPLICATES, INTERACTIONS or NO_ERROR
    balanced: bool  # every combination of levels present, each with the same number of runs

    @property
    def noise(self) -> Noise:
        """The error term as a per-run standard deviation."""
        return Noise(math.sqrt(self.error_ms) if self.error_df else math.nan, self.error_df, self.error_source)


ANOVA_COLUMNS = ["term", "kind", "df", "sum_sq", "mean_sq", "F", "p", "eta_sq", "partial_eta_sq", "significant"]


def _term(name: str) -> str:
    """statsmodels' `C(n_embd):C(dropout)` as `n_embd:dropout`."""
    return re.sub(r"C\((\w+)\)", r"\1", name)


def anova(runs: pd.DataFrame, metric: str, factors: list[str]) -> Anova:
    """Main effects and two-way interactions of factors on metric (statsmodels ols + anova_lm, type II).

    With seed replicates the error term is the replicate (pure) error and the interactions of three or more
    factors form a row of their own (lack of fit). With one seed per point there is no noise estimate: the
    residual is the highest-order interactions (of 3+ factors, or the two-way one when only two factors vary).
    """
    if not factors:
        return Anova(pd.DataFrame(columns=ANOVA_COLUMNS), math.nan, 0, NO_ERROR, False)
    data = runs[[*factors, metric]].copy()
    data["cell"] = runs[POINT].astype(str).agg("/".join, axis=1)
    sizes = data.groupby(factors).size()
    balanced = len(sizes) == math.prod(data[f].nunique() for f in factors) and sizes.nunique() == 1
    replicated = bool((data.groupby("cell").size() > 1).any())
    order = 2 if replicated or len(factors) >= 3 else 1
    formula = f"{metric} ~ (" + " + ".join(f"C({f})" for f in factors) + f")**{order}"
    fit = smf.ols(formula, data).fit()
    with warnings.catch_warnings():  # a saturated model (no df left) has no tests: only its sums of squares count
        warnings.simplefilter("ignore", RuntimeWarning)
        table = anova_lm(fit, typ=2 if fit.df_resid > 0 else 1).drop(index="Residual")
    rows = [
        {
            "term": _term(str(name)),
            "kind": "interaction" if ":" in str(name) else "main",
            "df": r.df,
            "sum_sq": r.sum_sq,
        }
        for name, r in table.iterrows()
    ]
    if replicated:
        cells = smf.ols(f"{metric} ~ C(cell)", data).fit()
        error_ss, error_df, source = float(cells.ssr), int(cells.df_resid), REPLICATES
        lack_df = int(round(fit.df_resid)) - error_df
        if lack_df > 0:
            lack = {"term": "interactions of 3+ factors", "kind": "higher-order", "df": lack_df}
            rows.append({**lack, "sum_sq": float(fit.ssr) - error_ss})
        label = "residual: seed-to-seed (replicates)"
    else:
        error_ss, error_df, source = float(fit.ssr), int(round(fit.df_resid)), INTERACTIONS
        label = f"residual: interactions of {order + 1}+ factors (no replicates, so no noise estimate)"
    if error_df == 0:
        source = NO_ERROR
    error_ms = error_ss / error_df if error_df else math.nan
    total = sum(r["sum_sq"] for r in rows) + error_ss
    for r in rows:
        r["mean_sq"] = r["sum_sq"] / r["df"]
        r["F"] = r["mean_sq"] / error_ms if error_df and error_ms > 0 else math.nan
        r["p"] = float(scipy.stats.f.sf(r["F"], r["df"], error_df)) if not math.isnan(r["F"]) else math.nan
        r["eta_sq"] = r["sum_sq"] / total if total else math.nan
        r["partial_eta_sq"] = r["sum_sq"] / (r["sum_sq"] + error_ss) if r["sum_sq"] + error_ss else math.nan
        r["significant"] = bool(r["p"] < ALPHA)
    rows.append(
        {
            "term": label,
            "kind": "error",
            "df": error_df,
            "sum_sq": error_ss,
            "mean_sq": error_ms,
            "F": math.nan,
            "p": math.nan,
            "eta_sq": error_ss / total if total else math.nan,
            "partial_eta_sq": math.nan,
            "significant": False,
        }
    )
    frame = pd.DataFrame(rows, columns=ANOVA_COLUMNS)
    frame["df"] = frame["df"].round().astype(int)
    return Anova(frame, error_ms, error_df, source, bool(balanced))


def strongest_interaction(table: pd.DataFrame) -> tuple[str, str] | None:
    """The two factors of the two-way interaction with the largest sum of squares, or None."""
    pairs = table[table["kind"] == "interaction"]
    if pairs.empty:
        return None
    first, second = pairs.loc[pairs["sum_sq"].idxmax(), "term"].split(":")
    return first, second


def level_half_width(error: Anova, runs_at_level: int) -> float:
    """Half-width of the 95 % interval of a level mean over runs_at_level runs, from the ANOVA's error term."""
    if not error.error_df or math.isnan(error.error_ms):
        return math.nan
    return float(scipy.stats.t.ppf(1 - ALPHA / 2, error.error_df) * math.sqrt(error.error_ms / runs_at_level))


def compare_with_best(runs: pd.DataFrame, points: pd.DataFrame, error: Anova, metric: str = "val_loss") -> pd.DataFrame:
    """Grid points ranked by mean metric; which of them cannot be told apart from the best at the 95 % level.

    Each point is compared with the best by Welch's t-test on their seeds (scipy) when both have two or more;
    otherwise by a t-test on the ANOVA's error term. The p values are Holm-corrected together (statsmodels).
    """
    mean = f"{metric}_mean"
    ranked = points.sort_values([mean, "global_id"], kind="stable").reset_index(drop=True)
    ranked.insert(0, "rank", ranked[mean].round(6).rank(method="min").astype(int))
    values = {key: group[metric].to_numpy() for key, group in runs.groupby(POINT)}
    best = values[(ranked.loc[0, "member"], ranked.loc[0, "grid_position"])]
    tests, p_values = [], []
    for row in ranked.itertuples():
        mine = values[(row.member, row.grid_position)]
        if row.Index == 0:
            tests.append("best")
            p_values.append(math.nan)
        elif len(mine) > 1 and len(best) > 1 and (np.std(mine) > 0 or np.std(best) > 0):
            tests.append("Welch")
            p_values.append(float(scipy.stats.ttest_ind(mine, best, equal_var=False).pvalue))
        elif error.error_df and error.error_ms > 0:
            se = math.sqrt(error.error_ms * (1 / len(mine) + 1 / len(best)))
            t = (np.mean(mine) - np.mean(best)) / se
            tests.append("t on ANOVA error")
            p_values.append(float(2 * scipy.stats.t.sf(abs(t), error.error_df)))
        else:
            tests.append("none")
            p_values.append(math.nan)
    p = np.array(p_values)
    adjusted = np.full(len(p), math.nan)
    testable = ~np.isnan(p)
    if testable.any():
        adjusted[testable] = multipletests(p[testable], alpha=ALPHA, method=CORRECTION)[1]
    ranked["behind_best"] = ranked[mean] - ranked.loc[0, mean]
    ranked["test"] = tests
    ranked["p"] = p
    ranked["p_holm"] = adjusted
    ranked["tied_with_best"] = ~(adjusted < ALPHA)  # untestable differences cannot be told apart either
    return ranked
