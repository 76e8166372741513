"""The study report: what wins, what matters, where overfitting sets in, as Markdown and as one HTML file.

The report is a list of blocks (document.py) rendered twice, so the Markdown and the HTML always say the same
thing; the HTML embeds its figures and opens anywhere without the output folder.
"""

from __future__ import annotations

import math

import pandas as pd

from nanosweep.analysis import stats
from nanosweep.analysis.document import Block, Heading, Image, Paragraph, Table, cell, level
from nanosweep.analysis.findings import OVERFIT_TOLERANCE, Findings

TOP = 10  # rows of each ranking shown in the report (the CSVs hold them all)
BEST_COLUMNS = ["member", "name", "val_loss", "train_loss", "loss_gap", "total_params"]  # the name says the rest
RANKED = ["rank", "rank_in_member", *BEST_COLUMNS]
BY_MEAN = [
    "rank",
    "member",
    "point",
    "n",
    "val_loss_mean",
    "val_loss_ci_low",
    "val_loss_ci_high",
    "behind_best",
    "test",
    "p_holm",
    "tied_with_best",
]


ANOVA_SHOWN = ["term", "df", "sum_sq", "F", "p", "eta_sq", "partial_eta_sq", "significant"]


def _scope(f: Findings) -> str:
    return "all" if len(f.members) > 1 else f.members[0]


def p_values(frame: pd.DataFrame) -> pd.DataFrame:
    """p values to two significant digits (a fixed 4 decimals would show small ones as 0.0000)."""
    columns = [c for c in ("p", "p_holm") if c in frame.columns]
    return frame.assign(**{c: [cell(v) if math.isnan(v) else f"{v:.2g}" for v in frame[c]] for c in columns})


def _seeds(f: Findings) -> str:
    low, high = int(f.points["n"].min()), int(f.points["n"].max())
    return f"{low} seed{'s' if high > 1 else ''}" if low == high else f"{low}-{high} seeds"


def _dof(df: int) -> str:
    return f"{df} degree{'s' if df != 1 else ''} of freedom"


def noise_sentence(f: Findings) -> str:
    """The noise floor in one or two sentences: the report's yardstick for every difference."""
    noise = f.noise
    if noise.source == stats.REPLICATES:
        return (
            f"Each of the {len(f.points)} grid points was trained with {_seeds(f)}. The noise floor, the "
            f"seed-to-seed standard deviation of the final validation loss pooled within grid points, is "
            f"**{noise.std:.4f} nats** ({_dof(noise.df)}): two runs of the same configuration "
            f"typically differ by up to {1.96 * math.sqrt(2) * noise.std:.4f} nats (95 %)."
        )
    text = (
        f"Each of the {len(f.points)} grid points was trained with one seed, so there is **no noise estimate**: "
        "how much a result moves with the seed is unknown. "
    )
    if noise.source == stats.INTERACTIONS:
        return text + (
            f"As a stand-in the report uses the residual of the factorial ANOVA (the highest-order interactions), "
            f"a standard deviation of **{noise.std:.4f} nats** ({_dof(noise.df)}); rerun with "
            "`--repeats 3` to measure the real noise."
        )
    return text + "Nothing is left over to stand in for it either: rerun with `--repeats 3` to measure it."


def _ties(f: Findings) -> str:
    """Which configurations are within noise of the best, in words."""
    ranked = f.by_mean
    tied = int(ranked["tied_with_best"].sum())
    if len(ranked) == 1:
        return "There is only one configuration."
    if (ranked["test"] == "none").iloc[1:].all():
        return "No comparison with the best can be tested (no replicates and no residual): the ranking is unsure."
    how = (
        "Welch's t-test between their seeds"
        if (ranked["test"] == "Welch").any()
        else "a t-test on the ANOVA residual, as there are no replicates"
    )
    if tied == 1:
        runner = ranked.iloc[1]
        return (
            f"It is ahead of every other configuration at the 95 % level ({how}, Holm-corrected): the runner-up "
            f"**{runner['point']}** is {runner['behind_best']:.4f} nats behind (corrected p = {runner['p_holm']:.3g})."
        )
    if tied == len(ranked):
        return (
            f"All {tied} configurations are within noise of each other: none differs from the best at 95 % "
            f"({how}, Holm-corrected)."
        )
    return (
        f"The top {tied} are within noise of each other: {tied - 1} configuration{'s' if tied > 2 else ''} "
        f"cannot be told apart from the best at the 95 % level ({how}, Holm-corrected over the {len(ranked) - 1} "
        f"comparisons); the first one that can is {ranked.loc[~ranked['tied_with_best'], 'behind_best'].iloc[0]:.4f} "
        "nats behind."
    )


def _winner(f: Findings) -> list[Block]:
    best = f.by_mean.iloc[0]
    interval = (
        f", 95 % CI {best['val_loss_ci_low']:.4f}-{best['val_loss_ci_high']:.4f}"
        if not math.isnan(best["val_loss_ci_low"])
        else ""
    )
    text = (
        f"The best configuration is **{best['point']}** ({best['member']}): mean validation loss "
        f"{best['val_loss_mean']:.4f} over {int(best['n'])} seed{'s' if best['n'] > 1 else ''}{interval}, "
        f"train loss {best['train_loss_mean']:.4f}, gap {best['loss_gap_mean']:+.4f}. " + _ties(f)
    )
    shown = p_values(f.by_mean[BY_MEAN].head(TOP))
    return [
        Heading("Which configuration wins"),
        Paragraph(text),
        Table(shown, f"Top {len(shown)} configurations by mean validation loss; tied = cannot be told from the best"),
        Table(f.best[BEST_COLUMNS], "Best single run of each member (lowest final validation loss)"),
        Table(
            f.by_val_loss[RANKED].head(TOP),
            f"Top {min(TOP, len(f.by_val_loss))} runs by validation loss (rank overall, in member)",
        ),
    ]


def _effect_sentence(importance: pd.DataFrame, scope: str, what: str) -> str:
    rows = importance[importance["scope"] == scope]
    if rows.empty:
        return f"No hyperparameter varies among these runs, so none can be credited with the {what}."
    pieces = [
        f"`{r.factor}` {r.effect:.4f} ({level(r.best_level)}: {r.best_mean:.4f} vs {level(r.worst_level)}: "
        f"{r.worst_mean:.4f})"
        for r in rows.itertuples()
    ]
    text = f"Ranked by how far the mean {what} moves between a hyperparameter's levels: " + "; ".join(pieces) + "."
    unbalanced = [r.factor for r in rows.itertuples() if not r.balanced]
    if unbalanced:
        text += (
            f" The grid is incomplete for {', '.join(f'`{u}`' for u in unbalanced)}: other factors do not average "
            "out of those differences, read them with care."
        )
    else:
        text += " The grid is complete, so each difference averages over the same mix of the other factors."
    return text


def effect_table(importance: pd.DataFrame, scope: str) -> pd.DataFrame:
    """Factors down, scopes across: each cell the effect and its best level (* where the grid is unbalanced)."""
    cells = importance.assign(
        cell=[f"{r.effect:.4f} ({level(r.best_level)}){'' if r.balanced else ' *'}" for r in importance.itertuples()]
    )
    table = cells.pivot(index="factor", columns="scope", values="cell")
    order = list(importance[importance["scope"] == scope]["factor"])
    table = table.reindex(index=order, columns=list(dict.fromkeys(importance["scope"])))
    return table.reset_index().fillna("–")


def _importance(f: Findings) -> list[Block]:
    scope = _scope(f)
    caption = "Effect on validation loss: range of the level means (best level); * = other factors not balanced"
    return [
        Heading("How much each hyperparameter matters"),
        Paragraph(_effect_sentence(f.importance_val, scope, "validation loss")),
        Paragraph(_significance(f.anova_val, "validation loss")),
        Image("plots/main_effects_val_loss.png", "Main effects on validation loss (mean per level, 95 % CI)"),
        Table(effect_table(f.importance_val, scope), caption),
    ]


def _error_words(anova: stats.Anova) -> str:
    if anova.error_source == stats.REPLICATES:
        return "error term: the seed-to-seed variance within grid points"
    if anova.error_source == stats.INTERACTIONS:
        return "error term: the highest-order interactions; one seed per point, so no noise estimate"
    return "no error term is left, so nothing can be tested"


def _significance(anova: stats.Anova, what: str) -> str:
    """Which effects the ANOVA tells apart from noise, with F, p and partial eta squared."""
    effects = anova.table[anova.table["kind"].isin(["main", "interaction"])]
    if effects.empty:
        return f"No hyperparameter varies, so there is no analysis of variance of the {what}."
    if anova.error_source == stats.NO_ERROR:
        return f"The factorial ANOVA of the {what} has no error term left: none of its effects can be tested."
    real = effects[effects["significant"]].sort_values("F", ascending=False, kind="stable")
    pieces = [
        f"`{r.term}` (F = {r.F:.1f}, p = {r.p:.2g}, partial η² = {r.partial_eta_sq:.2f})" for r in real.itertuples()
    ]
    text = f"Factorial ANOVA of the {what} ({_error_words(anova)}): "
    text += ("significant at 95 %: " + "; ".join(pieces) + ".") if pieces else "no effect is significant at 95 %."
    noise = effects[~effects["significant"]]
    if len(noise):
        text += " Within noise: " + ", ".join(f"`{t}`" for t in noise["term"]) + "."
    if not anova.balanced:
        text += " The grid is not balanced (missing points or unequal seeds): type II sums of squares, read with care."
    return text


def _certainty(f: Findings) -> list[Block]:
    """How sure each conclusion is: the noise floor, ties with the best, the ANOVA tables, seeds per point."""
    blocks: list[Block] = [
        Heading("How sure each conclusion is"),
        Paragraph(
            noise_sentence(f) + " Intervals are 95 % Student-t intervals of a mean (scipy); a level mean's interval "
            "in the main-effects plots uses the ANOVA's error term."
        ),
        Paragraph("**Which configuration wins.** " + _ties(f)),
        Paragraph("**Which hyperparameters matter.** " + _significance(f.anova_val, "validation loss")),
        Table(
            p_values(f.anova_val.table[ANOVA_SHOWN]),
            "ANOVA of the final validation loss (statsmodels, type II; η² = share of all variation)",
        ),
    ]
    if f.interaction:
        first, second = f.interaction
        row = f.anova_val.table.set_index("term").loc[f"{first}:{second}"]
        verdict = "significant" if row["significant"] else "within noise"
        blocks.append(
            Paragraph(
                f"The strongest two-way interaction is `{first}:{second}` (F = {row['F']:.2f}, p = {row['p']:.2g}: "
                f"{verdict}): where its lines are not parallel, the effect of `{first}` depends on `{second}`."
            )
        )
        blocks.append(Image("plots/interaction_val_loss.png", f"Interaction of {first} and {second} (95 % CI)"))
    blocks += [
        Paragraph("**What drives the gap.** " + _significance(f.anova_gap, "loss gap")),
        Table(p_values(f.anova_gap.table[ANOVA_SHOWN]), "ANOVA of the final loss gap (statsmodels, type II)"),
        Image("plots/replicate_spread.png", "Final validation loss of every seed per grid point, best on top"),
    ]
    return blocks


def _overfitting(f: Findings) -> list[Block]:
    scope = _scope(f)
    gaps = f.runs["loss_gap"]
    blocks: list[Block] = [
        Heading("Where overfitting sets in"),
        Paragraph(
            f"The final loss gap (validation - train) averages {gaps.mean():+.4f} nats and ranges from "
            f"{gaps.min():+.4f} to {gaps.max():+.4f}. " + _effect_sentence(f.importance_gap, scope, "loss gap")
        ),
    ]
    over = f.overfitting[f.overfitting["overfits"]] if not f.overfitting.empty else f.overfitting
    if f.overfitting.empty:
        blocks.append(Paragraph("No evaluation histories were found, so the onset of overfitting is unknown."))
    elif over.empty:
        blocks.append(
            Paragraph(
                f"In none of the {len(f.overfitting)} runs did validation loss rise more than {OVERFIT_TOLERANCE} "
                "nats above its best evaluation: within these training lengths no configuration has started to "
                "overfit yet (validation loss was still at or near its best at the end)."
            )
        )
    else:
        blocks.append(
            Paragraph(
                f"Validation loss rose more than {OVERFIT_TOLERANCE} nats above its best evaluation in {len(over)} of "
                f"{len(f.overfitting)} runs: overfitting set in at iteration {int(over['best_step'].median())} "
                f"(median; earliest {int(over['best_step'].min())}), after which validation loss rose by "
                f"{over['rise_after_best'].mean():.4f} nats on average by the end."
            )
        )
        columns = ["member", "name", "best_step", "best_val_loss", "final_step", "final_val_loss", "rise_after_best"]
        blocks.append(Table(over.sort_values("best_step")[columns], "Runs whose validation loss rose after its best"))
    blocks.append(Image("plots/main_effects_loss_gap.png", "Main effects on the loss gap (mean per level, 95 % CI)"))
    caption = "Effect on the loss gap: range of the level means (level with the smallest gap); * = not balanced"
    blocks.append(Table(effect_table(f.importance_gap, scope), caption))
    worst = f.by_loss_gap[RANKED].iloc[::-1].head(TOP)
    blocks.append(Table(worst, f"The {len(worst)} largest loss gaps (rank 1 = smallest gap)"))
    for member in f.members:
        blocks.append(Image(f"plots/loss_gap_{member}.png", f"{member}: loss gap per run"))
        blocks.append(Image(f"plots/loss_curves_{member}.png", f"{member}: train and validation loss curves"))
    return blocks


def _size_and_members(f: Findings) -> list[Block]:
    by_size = (
        f.runs.groupby(["n_layer", "n_embd", "total_params"])["val_loss"]
        .agg(["count", "mean", "min"])
        .reset_index()
        .rename(columns={"count": "runs", "mean": "mean_val_loss", "min": "best_val_loss"})
    )
    blocks: list[Block] = [
        Heading("Model size"),
        Image("plots/params_vs_val_loss.png", "Parameters against validation loss"),
        Table(by_size, "Validation loss by model size (nanoGPT's parameter count)"),
    ]
    if len(f.members) > 1:
        blocks += [
            Heading("Members compared"),
            Image("plots/member_comparison.png", "Validation loss and loss gap of every run, per member"),
        ]
    return blocks


def build(f: Findings, title: str, source: str, files: list[str]) -> list[Block]:
    """The report's blocks: winner, hyperparameter effects, how sure they are, overfitting, model size, files."""
    n = len(f.runs)
    profile = f.runs["profile"].iloc[0]
    intro = (
        f"{n} finished runs of {', '.join(f.members)} (profile `{profile}`) from {source}. Losses are "
        "cross-entropy in nats per character at the last evaluation (iteration max_iters); "
        "the loss gap is validation minus train loss. " + noise_sentence(f)
    )
    blocks: list[Block] = [Heading(title, 1), Paragraph(intro)]
    blocks += _winner(f) + _importance(f) + _certainty(f) + _overfitting(f) + _size_and_members(f)
    blocks += [Heading("Files"), Paragraph("Beside this report: " + ", ".join(f"`{name}`" for name in files) + ".")]
    return blocks
