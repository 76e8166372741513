"""The study's figures (nanosweep analyze) as PNG files, headless (the Agg backend); each returns its Figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd

matplotlib.use("Agg")  # no display on training machines and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from nanosweep.analysis import stats  # noqa: E402
from nanosweep.analysis.layout import HYPERPARAMETERS  # noqa: E402

LOSS_UNITS = "nats per character"
MEMBER_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
METRIC_LABELS = {"val_loss": "validation loss", "loss_gap": "loss gap (validation - train)"}


def save(fig: Figure, path: Path) -> None:
    """Write fig as a PNG (no timestamps in it: rebuilding gives the same bytes)."""
    fig.savefig(path, dpi=100)


def member_colors(members: list[str]) -> dict[str, str]:
    """One fixed color per member, in the study's member order, shared by every figure."""
    return {member: MEMBER_COLORS[i % len(MEMBER_COLORS)] for i, member in enumerate(members)}


def _architecture_label(arch: tuple[int, int, int, int]) -> str:
    block, layers, heads, embd = arch
    return f"{heads} heads, n_embd {embd} (block {block}, {layers} layers)"


def _run_label(run: Any) -> str:
    return f"batch {run.batch_size}, {run.max_iters} iters, dropout {run.dropout:g}"


def loss_curves(member: str, runs: pd.DataFrame, history: pd.DataFrame) -> Figure:
    """Train (dashed) and validation (solid) loss at every evaluation, one panel per architecture."""
    archs = list(dict.fromkeys(zip(runs.block_size, runs.n_layer, runs.n_head, runs.n_embd)))
    ncols = min(2, len(archs))
    nrows = math.ceil(len(archs) / ncols)
    fig = Figure(figsize=(6.5 * ncols + 2.9, 4.2 * nrows + 0.8))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    labels = list(dict.fromkeys(_run_label(run) for run in runs.itertuples()))
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    color = {label: palette(i % palette.N) for i, label in enumerate(labels)}
    for ax, arch in zip(axes, archs):
        chosen = runs[(runs.block_size == arch[0]) & (runs.n_layer == arch[1])]
        chosen = chosen[(chosen.n_head == arch[2]) & (chosen.n_embd == arch[3])]
        # longer runs first: a shorter run retraces the start of its longer twin and must stay visible on top
        for run in chosen.sort_values("max_iters", ascending=False, kind="stable").itertuples():
            points = history[history.run_id == run.run_id]
            label = _run_label(run)
            for key, style in (("train_loss", "--"), ("val_loss", "-")):
                curve = points[points.key == key].sort_values("step")
                ax.plot(curve.step, curve.value, style, marker=".", color=color[label], linewidth=1.4, gid=run.name)
        ax.set_title(_architecture_label(arch), fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in axes[len(archs) :]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel(f"loss ({LOSS_UNITS})")
    handles = [Line2D([], [], color=color[label], linewidth=2, label=label) for label in labels]
    handles += [
        Line2D([], [], color="0.3", linestyle="-", label="validation (solid)"),
        Line2D([], [], color="0.3", linestyle="--", label="train (dashed)"),
    ]
    fig.legend(handles=handles, loc="center right", fontsize=9, frameon=False)
    fig.suptitle(f"{member}: train and validation loss at each evaluation")
    fig.tight_layout(rect=(0, 0, 1 - 2.9 / fig.get_figwidth(), 1))
    return fig


def loss_gaps(member: str, runs: pd.DataFrame) -> Figure:
    """Final loss gap of every run as horizontal bars in grid order, colored by dropout."""
    ordered = runs.sort_values("grid_position", kind="stable")
    dropouts = sorted(ordered.dropout.unique())
    palette = dict(zip(dropouts, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    fig = Figure(figsize=(9, max(3.2, 1.4 + 0.28 * len(ordered))))
    ax = fig.subplots()
    y = list(range(len(ordered)))[::-1]  # the first grid point on top
    gaps = (ordered.val_loss - ordered.train_loss).to_numpy()
    ax.barh(y, gaps, color=[palette[d] for d in ordered.dropout], height=0.7)
    for yi, gap in zip(y, gaps):
        ax.annotate(
            f"{gap:+.3f}",
            (gap, yi),
            xytext=(3 if gap >= 0 else -3, 0),
            textcoords="offset points",
            ha="left" if gap >= 0 else "right",
            va="center",
            fontsize=7,
        )
    ax.set_yticks(y, ordered.name, fontsize=8)
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.margins(x=0.15)
    ax.set_xlabel(f"loss gap = validation - train ({LOSS_UNITS})")
    ax.set_title(f"{member}: generalization gap at the end of training (larger = more overfitting)")
    handles = [Patch(color=palette[d], label=f"dropout {d:g}") for d in dropouts]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def params_vs_val_loss(runs: pd.DataFrame, members: list[str]) -> Figure:
    """Validation loss against model size, one color per member and one marker per training length."""
    colors = member_colors(members)
    lengths = sorted(runs.max_iters.unique())
    markers = dict(zip(lengths, "o^sDv<>p"))
    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    for i, member in enumerate(members):
        shift = 1 + 0.025 * (i - (len(members) - 1) / 2)  # members of equal size side by side, not on top
        for length in lengths:
            chosen = runs[(runs.member == member) & (runs.max_iters == length)]
            ax.scatter(
                chosen.total_params / 1e6 * shift,
                chosen.val_loss,
                color=colors[member],
                marker=markers[length],
                s=36,
                alpha=0.8,
                edgecolors="none",
                gid=f"{member}:{length}",
            )
    ax.set_xlabel("parameters (millions, nanoGPT's count)")
    ax.set_ylabel(f"final validation loss ({LOSS_UNITS})")
    ax.set_title("Model size against validation loss")
    handles = [Line2D([], [], color=colors[m], marker="o", linestyle="", label=m) for m in members]
    handles += [Line2D([], [], color="0.3", marker=markers[n], linestyle="", label=f"{n} iterations") for n in lengths]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main_effects(effects: pd.DataFrame, members: list[str], metric: str) -> Figure:
    """Mean metric at each level of each hyperparameter with its 95 % interval, per member and overall."""
    effects = effects[effects.metric == metric]
    factors = [h for h in HYPERPARAMETERS if h in set(effects.factor)]
    scopes = list(dict.fromkeys(effects.scope))
    colors = {**member_colors(members), "all": "black"}
    ncols = min(4, len(factors))
    nrows = math.ceil(len(factors) / ncols)
    fig = Figure(figsize=(3.2 * ncols + 2.0, 3.6 * nrows + 0.7))
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, factor in zip(axes, factors):
        rows = effects[effects.factor == factor]
        levels = sorted(rows.level.unique())
        for k, scope in enumerate(scopes):
            part = rows[rows.scope == scope].set_index("level").reindex(levels).dropna(subset=["mean"])
            if part.empty:
                continue
            x = [levels.index(level) + 0.06 * (k - (len(scopes) - 1) / 2) for level in part.index]
            ax.errorbar(
                x,
                part["mean"],
                yerr=(part["mean"] - part["ci_low"]).fillna(0),  # no error term, no interval: a bare line
                color=colors.get(scope, "0.5"),
                marker="o",
                capsize=3,
                linewidth=2.2 if scope == "all" else 1.3,
                label=scope,
                gid=f"{scope}:{factor}",
            )
        ax.set_xticks(range(len(levels)), [f"{level:g}" for level in levels])
        ax.set_xlim(-0.5, len(levels) - 0.5)
        ax.set_xlabel(factor)
        ax.grid(alpha=0.3)
    for ax in axes[len(factors) :]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel(f"mean {METRIC_LABELS[metric]}\n({LOSS_UNITS}), 95 % CI")
    # a factor may miss from some scopes (block_size varies only across members): one entry per scope, in order
    entries = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend([entries[s] for s in scopes], scopes, loc="center right", frameon=False)
    fig.suptitle(f"Main effects on {METRIC_LABELS[metric]}: mean over the runs at each level")
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    return fig


def member_comparison(runs: pd.DataFrame, members: list[str]) -> Figure:
    """Validation loss and loss gap of every run, side by side per member; the best run of each is starred."""
    colors = member_colors(members)
    fig = Figure(figsize=(max(8, 2.6 * len(members) + 1), 8.8))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, metric in zip(axes, ("val_loss", "loss_gap")):
        values = [runs[runs.member == m][metric].to_numpy() for m in members]
        ax.boxplot(values, positions=range(len(members)), widths=0.5, showfliers=False, medianprops={"color": "black"})
        for i, (member, vals) in enumerate(zip(members, values)):
            offsets = [i + 0.2 * ((j % 9) / 8 - 0.5) for j in range(len(vals))]  # spread the dots, no randomness
            ax.scatter(offsets, vals, color=colors[member], s=18, alpha=0.8, zorder=3, gid=f"{member}:{metric}")
        ax.set_ylabel(f"{METRIC_LABELS[metric]}\n({LOSS_UNITS})")
        ax.grid(axis="y", alpha=0.3)
    for i, member in enumerate(members):
        chosen = runs[runs.member == member]
        best = chosen.loc[chosen.val_loss.idxmin()]
        axes[0].scatter(
            [i], [best.val_loss], marker="*", s=220, color="gold", edgecolors="black", zorder=4, gid=f"best:{member}"
        )
    axes[1].axhline(0, color="0.3", linewidth=0.8)
    axes[1].set_xticks(range(len(members)), [f"{m}\n({(runs.member == m).sum()} runs)" for m in members])
    axes[1].set_xlabel("member")
    star = Line2D([], [], marker="*", color="gold", markeredgecolor="black", markersize=13, linestyle="")
    fig.legend([star], ["best run of the member (lowest validation loss)"], loc="lower center", frameon=False)
    fig.suptitle("Members compared: final validation loss (top) and loss gap (bottom) of every run")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def interaction(runs: pd.DataFrame, factors: tuple[str, str], error: stats.Anova, metric: str = "val_loss") -> Figure:
    """Mean metric over the levels of one factor, a line per level of the other, with 95 % intervals of each mean.

    Parallel lines: no interaction; lines that converge or cross: the effect of one factor depends on the other.
    """
    across, lines = factors
    cells = runs.groupby([lines, across])[metric].agg(["count", "mean"]).reset_index()
    levels = sorted(runs[across].unique())
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    palette = plt.get_cmap("tab10")
    for i, (value, part) in enumerate(cells.groupby(lines)):
        half = [stats.level_half_width(error, int(count)) for count in part["count"]]
        ax.errorbar(
            [levels.index(level) for level in part[across]],
            part["mean"],
            yerr=[0 if math.isnan(h) else h for h in half],
            color=palette(i % palette.N),
            marker="o",
            capsize=3,
            label=f"{lines} {value:g}",
            gid=f"{lines}={value:g}",
        )
    ax.set_xticks(range(len(levels)), [f"{level:g}" for level in levels])
    ax.set_xlim(-0.5, len(levels) - 0.5)
    ax.set_xlabel(across)
    ax.set_ylabel(f"mean {METRIC_LABELS[metric]}\n({LOSS_UNITS}), 95 % CI")
    ax.set_title(f"Interaction of {across} and {lines} on {METRIC_LABELS[metric]}")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def replicate_spread(runs: pd.DataFrame, ranked: pd.DataFrame, metric: str = "val_loss") -> Figure:
    """Every seed's final metric per grid point (dots), its mean and 95 % t interval, best configuration on top.

    Points that cannot be told apart from the best are drawn in color, the others in grey.
    """
    fig = Figure(figsize=(10, max(3.2, 1.4 + 0.26 * len(ranked))))
    ax = fig.subplots()
    values = {key: group[metric].to_numpy() for key, group in runs.groupby(stats.POINT)}
    for y, row in zip(range(len(ranked) - 1, -1, -1), ranked.itertuples()):
        color = "tab:blue" if row.tied_with_best else "0.55"
        seeds = values[(row.member, row.grid_position)]
        ax.scatter(seeds, [y] * len(seeds), s=14, color=color, alpha=0.7, zorder=3, gid=row.point)
        mean, low, high = (getattr(row, f"{metric}_{part}") for part in ("mean", "ci_low", "ci_high"))
        if not math.isnan(low):
            ax.plot([low, high], [y, y], color=color, linewidth=1.6, zorder=2)
        ax.scatter([mean], [y], marker="|", s=160, color="black", zorder=4)
    labels = [f"{row.point} ({row.member})" for row in ranked.itertuples()][::-1]
    ax.set_yticks(range(len(ranked)), labels, fontsize=7)
    ax.set_xlabel(f"final {METRIC_LABELS[metric]} ({LOSS_UNITS})")
    ax.set_title("Seeds per grid point: dots = runs, bar = mean, line = 95 % CI (blue: tied with the best)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
