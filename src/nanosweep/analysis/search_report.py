"""`nanosweep analyze --search NAME`: a search's trials from its Optuna study -> CSV, Optuna's figures, a report.

Written like the grid's analysis: staged, then moved into place whole (analyze.staging / analyze.publish).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines and CI
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import optuna.visualization.matplotlib as optuna_plots  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from nanosweep.analysis import document, plots  # noqa: E402
from nanosweep.analysis.pipeline import publish, staging  # noqa: E402
from nanosweep.filelocks import database_exists, sqlite_file  # noqa: E402
from nanosweep.study.optuna_study import ITERATIONS_ATTR, RUN_ID_ATTR, RUN_NAME_ATTR, SearchError, launched
from nanosweep.study.pruning import open_storage  # noqa: E402
from nanosweep.study.search import redacted

TOP_TRIALS = 10  # trials shown in the report's ranking (the CSV holds them all)


@dataclass(frozen=True)
class SearchAnalysis:
    """What the analysis of one search wrote."""

    trials: pd.DataFrame  # one row per launched trial
    folder: Path  # out/analysis-search-{name}
    files: list[Path]


def load_study(name: str, storage: str) -> optuna.Study:
    """The search's Optuna study; a name with no study is refused, listing those there are. A SQLite database that
    is not there holds none (and is not made by looking)."""
    database = sqlite_file(storage)
    opened = None if database is not None and not database_exists(database) else open_storage(storage)
    names = optuna.get_all_study_names(opened) if opened else []
    if name not in names:
        known = ", ".join(sorted(names)) or "none yet"
        raise SearchError(f"search={name!r} has no study in {storage}: choose one of {known} (the space file stems)")
    return optuna.load_study(study_name=name, storage=opened)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every launched trial: number, state, val_loss (the last reported one for a pruned trial), params, run."""
    params = sorted({p for t in launched(study) for p in t.params})
    rows = []
    for t in sorted(launched(study), key=lambda t: t.number):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "val_loss": t.value,
                "iterations": t.user_attrs.get(ITERATIONS_ATTR),
                **{p: t.params.get(p) for p in params},
                "run_name": t.user_attrs.get(RUN_NAME_ATTR, ""),
                "run_id": t.user_attrs[RUN_ID_ATTR],
                "seconds": seconds,
            }
        )
    return pd.DataFrame(rows)


def _figure(axes: object) -> Figure:
    """The Figure behind what an Optuna matplotlib plot returns (one Axes or an array of them)."""
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


def write_figures(study: optuna.Study, folder: Path) -> dict[str, str]:
    """Optuna's figures as PNGs in folder; returns name -> why it was left out, for those it could not draw."""
    folder.mkdir(parents=True)
    figures = {
        "optimization_history": lambda: optuna_plots.plot_optimization_history(study),
        "pruned_vs_completed": lambda: optuna_plots.plot_intermediate_values(study),
        "param_importances": lambda: optuna_plots.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        ),
        "parallel_coordinates": lambda: optuna_plots.plot_parallel_coordinate(study),
    }
    missing = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        for name, draw in figures.items():
            try:
                fig = _figure(draw())
            except (ValueError, RuntimeError) as exc:  # e.g. importances need two complete trials
                missing[name] = str(exc)
                continue
            fig.set_size_inches(10, 6)
            fig.tight_layout()
            plots.save(fig, folder / f"{name}.png")
            plt.close(fig)
    return missing


def build_report(study: optuna.Study, trials: pd.DataFrame, source: str, missing: dict[str, str]) -> list:
    """The report's blocks: the best trial, what pruning saved, Optuna's figures."""
    name = study.study_name
    complete = trials[trials["state"] == "COMPLETE"].sort_values("val_loss", kind="stable")
    counts = trials["state"].value_counts()
    summary = ", ".join(f"{counts.get(s.name, 0)} {s.name.lower()}" for s in TrialState if counts.get(s.name, 0))
    blocks: list = [
        document.Heading(f"nanosweep search report: {name}", 1),
        document.Paragraph(f"From Optuna study `{name}` in {source}: {len(trials)} trials trained ({summary})."),
        document.Heading("Best trial"),
    ]
    if complete.empty:
        blocks.append(document.Paragraph("No trial has completed yet."))
    else:
        best = complete.iloc[0]
        params = ", ".join(f"`{p}` = {document.level(study.best_trial.params[p])}" for p in study.best_trial.params)
        blocks += [
            document.Paragraph(
                f"Trial {best['trial']} reached validation loss **{best['val_loss']:.4f}** "
                f"(run **{best['run_name']}**, `{best['run_id']}`) with {params}."
            ),
            document.Table(
                complete.head(TOP_TRIALS).drop(columns=["run_id"]), f"Top {min(TOP_TRIALS, len(complete))} trials"
            ),
        ]
    pruned = trials[trials["state"] == "PRUNED"]
    if len(pruned):
        trained, stopped = int(trials["iterations"].fillna(0).sum()), int(pruned["iterations"].sum())
        blocks += [
            document.Heading("Pruned vs completed"),
            document.Paragraph(
                f"{len(pruned)} of {len(trials)} trials were stopped by the pruner, after {stopped} "
                f"iterations together; the search trained {trained} iterations in all."
            ),
        ]
    captions = {
        "pruned_vs_completed": "Validation loss at every evaluation of every trial: pruned trials stop early",
        "optimization_history": "Final validation loss per trial, and the best so far",
        "param_importances": "How much each parameter explains of the final validation loss (fANOVA)",
        "parallel_coordinates": "Each complete trial's parameters, coloured by its validation loss",
    }
    blocks.append(document.Heading("Figures"))
    for figure, caption in captions.items():
        if figure in missing:
            blocks.append(document.Paragraph(f"{caption}: not drawn ({missing[figure]})."))
        else:
            blocks.append(document.Image(f"plots/{figure}.png", caption))
    return blocks


def analyze_search(name: str, storage: str, out: Path) -> SearchAnalysis:
    """Analyse one search from its Optuna study into out/analysis-search-{name}/."""
    study = load_study(name, storage)
    trials = trials_frame(study)
    if trials.empty:
        raise SearchError(f"search={name!r} has no trained trials yet: run `nanosweep search` first")
    label = f"analysis-search-{name}"
    with staging(out) as stage:
        folder = stage / label
        folder.mkdir()
        trials.to_csv(folder / "trials.csv", index=False, float_format="%.6g")
        missing = write_figures(study, folder / "plots")
        blocks = build_report(study, trials, f"`{redacted(storage)}`", missing)
        (folder / "report.md").write_text(document.to_markdown(blocks), encoding="utf-8")
        (folder / "report.html").write_text(document.to_html(blocks, folder, f"search {name}"), encoding="utf-8")
        files = publish(stage, out)
    return SearchAnalysis(trials, out / label, files)
