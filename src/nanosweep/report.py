"""The study report: what wins, what matters, where overfitting sets in, as Markdown and as one HTML file.

The report is a list of blocks rendered twice, so the Markdown and the HTML always say the same thing;
the HTML embeds its figures and opens anywhere without the output folder.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from nanosweep.analysis import HYPERPARAMETERS, OVERFIT_TOLERANCE, Findings

TOP = 10  # rows of each ranking shown in the report (the CSVs hold them all)
BEST_COLUMNS = ["member", "name", "val_loss", "train_loss", "loss_gap", "total_params"]  # the name says the rest
RANKED = ["rank", "rank_in_member", *BEST_COLUMNS]


@dataclass(frozen=True)
class Heading:
    """A section title (level 1 is the report's title)."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """Prose; **bold** and `code` are the only markup."""

    text: str


@dataclass(frozen=True)
class Table:
    """A DataFrame shown with its caption."""

    frame: pd.DataFrame
    caption: str


@dataclass(frozen=True)
class Image:
    """A PNG beside the report: linked from the Markdown, embedded in the HTML."""

    path: str  # relative to the report
    caption: str


Block = Heading | Paragraph | Table | Image


def cell(value: Any) -> str:
    """A table cell: losses to 4 decimals, integers with thousands separators, no 'nan'."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def level(value: Any) -> str:
    """A hyperparameter value as written in a config: 64, 0.1, 2000."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers."""
    return value.item() if hasattr(value, "item") else value


def _rows(frame: pd.DataFrame) -> list[list[str]]:
    settings = [c in HYPERPARAMETERS or str(c).endswith("level") for c in frame.columns]
    return [
        [level(_plain(v)) if setting else cell(_plain(v)) for v, setting in zip(row, settings)]
        for row in frame.itertuples(index=False)
    ]


def to_markdown(blocks: list[Block]) -> str:
    """GitHub-flavoured Markdown; figures are linked beside the file."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            header = [str(c) for c in block.frame.columns]
            lines = [f"*{block.caption}*", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in _rows(block.frame)]
            parts.append("\n".join(lines))
        else:
            parts.append(f"![{block.caption}]({block.path})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .15em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0 0 1.5em; font-size: .88em; }
.caption { font-style: italic; margin: 1.2em 0 .3em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #f0f0f0; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.wide { overflow-x: auto; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-style: italic; color: #555; }
code { background: #f4f4f4; padding: 0 .25em; }
"""


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` in a paragraph, as HTML; everything else escaped."""
    out, bold, code = [], False, False
    for i, piece in enumerate(html.escape(text).replace("**", "\0").split("\0")):
        if i:
            bold = not bold
            out.append("<strong>" if bold else "</strong>")
        chunks = piece.split("`")
        for j, chunk in enumerate(chunks):
            if j:
                code = not code
                out.append("<code>" if code else "</code>")
            out.append(chunk)
    return "".join(out)


def _html_table(table: Table) -> str:
    """A table whose numeric columns align right, scrolling sideways rather than overflowing the page."""
    numeric = [pd.api.types.is_numeric_dtype(table.frame[c]) for c in table.frame.columns]

    def row(tag: str, cells: list[str]) -> str:
        return (
            "<tr>"
            + "".join(f"<{tag}{' class=num' if n else ''}>{html.escape(c)}</{tag}>" for c, n in zip(cells, numeric))
            + "</tr>"
        )

    head = row("th", [str(c) for c in table.frame.columns])
    body = "".join(row("td", cells) for cells in _rows(table.frame))
    return (
        f'<p class="caption">{html.escape(table.caption)}</p>'
        f'<div class="wide"><table><thead>{head}</thead><tbody>{body}</tbody></table></div>'
    )


def to_html(blocks: list[Block], root: Path, title: str) -> str:
    """One self-contained HTML page: figures embedded as base64 PNG, styles inline."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        else:
            data = base64.b64encode((root / block.path).read_bytes()).decode("ascii")
            caption = html.escape(block.caption)
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _describe(run: Any) -> str:
    return (
        f"**{run['name']}** ({run['member']}): validation loss {run['val_loss']:.4f}, train loss "
        f"{run['train_loss']:.4f}, gap {run['loss_gap']:+.4f}, {int(run['total_params']):,} parameters"
    )


def _scope(f: Findings) -> str:
    return "all" if len(f.members) > 1 else f.members[0]


def _winner(f: Findings) -> list[Block]:
    ranked = f.by_val_loss
    best = ranked.iloc[0]
    text = f"The best run is {_describe(best)}."
    if len(ranked) > 1:
        second = ranked.iloc[1]
        text += (
            f" The runner-up, **{second['name']}**, is {second['val_loss'] - best['val_loss']:.4f} nats behind; "
            f"the worst run reaches {ranked.iloc[-1]['val_loss']:.4f}."
        )
    return [
        Heading("Which configuration wins"),
        Paragraph(text),
        Table(f.best[BEST_COLUMNS], "Best run of each member (lowest final validation loss)"),
        Table(
            ranked[RANKED].head(TOP), f"Top {min(TOP, len(ranked))} runs by validation loss (rank overall, in member)"
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
        Image("plots/main_effects_val_loss.png", "Main effects on validation loss (mean ± 1 std per level)"),
        Table(effect_table(f.importance_val, scope), caption),
    ]


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
    blocks.append(Image("plots/main_effects_loss_gap.png", "Main effects on the loss gap (mean ± 1 std per level)"))
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
    """The report's blocks: winner, hyperparameter effects, overfitting, model size, members, files."""
    n = len(f.runs)
    profile = f.runs["profile"].iloc[0]
    intro = (
        f"{n} finished runs of {', '.join(f.members)} (profile `{profile}`) from {source}. Losses are "
        "cross-entropy in nats per character at the last evaluation (iteration max_iters); "
        "the loss gap is validation minus train loss."
    )
    blocks: list[Block] = [Heading(title, 1), Paragraph(intro)]
    blocks += _winner(f) + _importance(f) + _overfitting(f) + _size_and_members(f)
    blocks += [Heading("Files"), Paragraph("Beside this report: " + ", ".join(f"`{name}`" for name in files) + ".")]
    return blocks
