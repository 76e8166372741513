"""A report as blocks (headings, paragraphs, tables, figures) and its Markdown and HTML renderings."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from nanosweep.analysis.layout import HYPERPARAMETERS


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
