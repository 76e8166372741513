"""`nanosweep analyze` end to end: runs from the store -> CSVs, plots, report -> the output folder and an MLflow run.

Everything is written into a staging folder first and moved into place only when all of it exists,
so an interrupted analysis never leaves a half-written CSV or report behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from nanosweep.analysis import document, plots, report
from nanosweep.analysis.findings import Findings, findings
from nanosweep.analysis.layout import combined_csv, results_csv, study_folder, table_csv
from nanosweep.filelocks import OwnedFolder
from nanosweep.tracking.names import ANALYSIS_RUN, MEMBER_TAG, PROFILE_TAG, RUN_KIND_TAG
from nanosweep.tracking.query import as_scope, histories, select
from nanosweep.tracking.run import TrackedRun
from nanosweep.tracking.scope import StudyScope
from nanosweep.tracking.store import experiment_name, tracking_uri

REPORT_TITLE = "nanosweep study report"
POINTS_CSV = "results_by_point.csv"  # beside results.csv: per grid point n, mean, std, 95 % CI of each loss


@dataclass(frozen=True)
class Analysis:
    """What one analysis computed and wrote, and the run it logged."""

    findings: Findings
    folder: Path  # out/analysis-{member}
    files: list[Path]  # every file written, under out
    run_id: str | None  # the analysis run, when logged


def staging(out: Path) -> OwnedFolder:
    """A scratch folder .analysis-*/ inside out (same file system, so the final moves are renames), removed at the
    end of its `with` block; one that a killed analysis left behind goes when the next one starts."""
    return OwnedFolder(".analysis-", out)


def publish(stage: Path, out: Path) -> list[Path]:
    """Move every staged file into out: a staged analysis-* folder replaces the old one whole (no stale plots)."""
    moved = []
    replaced = stage / ".replaced"  # old analysis folders, removed with the stage
    for entry in sorted(p for p in stage.iterdir() if p != replaced):
        target = out / entry.name
        if entry.name.startswith("analysis-"):
            if target.exists():
                replaced.mkdir(exist_ok=True)
                os.replace(target, replaced / entry.name)
            os.replace(entry, target)
            moved += sorted(p for p in target.rglob("*") if p.is_file())
        else:  # a member's study folder: download may keep checkpoints and samples there
            for source in sorted(p for p in entry.rglob("*") if p.is_file()):
                dest = target / source.relative_to(entry)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, dest)
                moved.append(dest)
    return moved


def write_plots(f: Findings, history: pd.DataFrame, folder: Path) -> None:
    """Every figure of the report as PNG in folder."""
    folder.mkdir(parents=True)
    figures = {
        "params_vs_val_loss": plots.params_vs_val_loss(f.runs, f.members),
        "main_effects_val_loss": plots.main_effects(f.effects, f.members, "val_loss"),
        "main_effects_loss_gap": plots.main_effects(f.effects, f.members, "loss_gap"),
        "replicate_spread": plots.replicate_spread(f.runs, f.by_mean),
    }
    if f.interaction:
        figures["interaction_val_loss"] = plots.interaction(f.runs, f.interaction, f.anova_val)
    if len(f.members) > 1:
        figures["member_comparison"] = plots.member_comparison(f.runs, f.members)
    for member in f.members:
        runs = f.runs[f.runs["member"] == member]
        figures[f"loss_curves_{member}"] = plots.loss_curves(member, runs, history)
        figures[f"loss_gap_{member}"] = plots.loss_gaps(member, runs)
    for name, fig in figures.items():
        plots.save(fig, folder / f"{name}.png")


def write_outputs(f: Findings, history: pd.DataFrame, stage: Path, label: str, source: str) -> None:
    """The study CSVs per member and the analysis folder (tables, plots, report) under stage."""
    for member in f.members:
        folder = stage / study_folder(member)
        folder.mkdir()
        (folder / "results.csv").write_text(results_csv(f.runs[f.runs["member"] == member]), encoding="utf-8")
        points = table_csv(f.points[f.points["member"] == member])
        (folder / POINTS_CSV).write_text(points, encoding="utf-8")
    folder = stage / f"analysis-{label}"
    folder.mkdir()
    tables = {
        "runs.csv": combined_csv(f.runs),
        "ranking_val_loss.csv": table_csv(f.by_val_loss),
        "ranking_loss_gap.csv": table_csv(f.by_loss_gap),
        "best_per_member.csv": table_csv(f.best),
        "ranking_mean_val_loss.csv": table_csv(f.by_mean),
        "main_effects.csv": table_csv(f.effects),
        "anova_val_loss.csv": table_csv(f.anova_val.table),
        "anova_loss_gap.csv": table_csv(f.anova_gap.table),
        "overfitting.csv": table_csv(f.overfitting),
    }
    for name, text in tables.items():
        (folder / name).write_text(text, encoding="utf-8")
    write_plots(f, history, folder / "plots")
    blocks = report.build(f, f"{REPORT_TITLE}: {label}", source, [*tables, "plots/"])
    (folder / "report.md").write_text(document.to_markdown(blocks), encoding="utf-8")
    (folder / "report.html").write_text(document.to_html(blocks, folder, f"{REPORT_TITLE}: {label}"), encoding="utf-8")


def log_analysis_run(stage: Path, experiment_id: str, label: str, f: Findings, run_id: str | None = None) -> str:
    """The analysis as MLflow run analysis-{member} (or into run_id, made by `mlflow run`), files as artifacts."""
    profile = str(f.runs["profile"].iloc[0])
    tags = {RUN_KIND_TAG: ANALYSIS_RUN, MEMBER_TAG: label, PROFILE_TAG: profile}
    if run_id:
        run = TrackedRun(run_id)
        run.take_over()
        run.set_tags({"mlflow.runName": f"analysis-{label}", **tags})
    else:
        run = TrackedRun.create(experiment_id, f"analysis-{label}", tags)
    # an error or a stop signal from here on ends the run FAILED or KILLED with the command (tracking.open_runs)
    run.log_params({"member": label, "profile": profile, "runs": len(f.runs), "members": ",".join(f.members)})
    run.log_metrics({"best_val_loss": float(f.runs["val_loss"].min()), "runs": len(f.runs)}, step=0)
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        parent = path.parent.relative_to(stage).as_posix()
        run.log_file(path, None if parent == "." else parent)
    run.finish("FINISHED")
    return run.run_id


def analyze(where: StudyScope | str, member: str, profile: str, out: Path, log_run: bool = True) -> Analysis:
    """Analyse one member (or all) of one profile from the tracking store into out, and log it as a run.

    The analysis run goes where `mlflow run . -e analyze` made it, else beside the runs analysed
    (the named experiment, or the one holding them all, else nanosweep).
    """
    scope = as_scope(where)
    attached = os.environ.get("MLFLOW_RUN_ID")  # under `mlflow run . -e analyze`: its run and experiment
    runs = select(scope, member, profile)
    history = histories(list(runs["run_id"]))
    f = findings(runs, history)
    holders = set(runs["experiment_id"])
    names = ", ".join(f"`{experiment_name(i)}`" for i in sorted(holders))
    source = f"experiment{'s' if len(holders) > 1 else ''} {names} of `{tracking_uri()}`"
    with staging(out) as stage:
        write_outputs(f, history, stage, member, source)
        home = scope.home(holders if len(holders) == 1 else set()) if log_run else None
        run_id = log_analysis_run(stage, home, member, f, attached) if log_run else None
        files = publish(stage, out)
    return Analysis(f, out / f"analysis-{member}", files, run_id)


def _table(frame: pd.DataFrame) -> str:
    levels = {c: frame[c].map(document.level) for c in frame.columns if str(c).endswith("level")}
    return frame.assign(**levels).to_string(index=False, float_format=lambda v: f"{v:.4f}")


def summary(f: Findings, top: int = 10) -> str:
    """The findings for the terminal: the noise floor, best runs, top runs and configurations, effects, ANOVA."""
    scope = f.importance_val["scope"].iloc[-1] if len(f.importance_val) else None
    effects = f.importance_val[f.importance_val["scope"] == scope].drop(columns="scope")
    ranked = ["rank", "rank_in_member", "member", "name", "val_loss", "train_loss", "loss_gap"]
    sections = [
        (
            "Best run per member (lowest validation loss)",
            f.best[["member", "name", "val_loss", "train_loss", "loss_gap", "total_params"]],
        ),
        (f"Top {top} by validation loss", f.by_val_loss[ranked].head(top)),
        (f"Top {top} by loss gap (smallest gap = best generalization)", f.by_loss_gap[ranked].head(top)),
        (f"Hyperparameter effects on validation loss ({scope}: range of level means)", effects),
        (f"Top {top} configurations by mean validation loss", report.p_values(f.by_mean[report.BY_MEAN].head(top))),
        ("ANOVA of validation loss", report.p_values(f.anova_val.table[report.ANOVA_SHOWN])),
    ]
    noise = report.noise_sentence(f).replace("**", "").replace("`", "")
    return noise + "\n\n" + "\n\n".join(f"{title}\n{_table(frame)}" for title, frame in sections) + "\n"
