"""`nanosweep import-results`: an existing study folder (results.csv, run folders, samples/) into MLflow runs.

The whole folder is checked before the first run is written, so a malformed CSV imports nothing.
Imported runs carry the same tags and params as a sweep's trials (profile `full`: the study ran the
recipe) plus run_kind `imported`, so the analysis and the UI show them beside trained ones.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from nanosweep.analysis.layout import STUDY_HEADER
from nanosweep.checkpoint import load_checkpoint
from nanosweep.config import ConfigError
from nanosweep.data import Vocab
from nanosweep.group import build_model
from nanosweep.study.grid import GridPoint, expand, load_members
from nanosweep.textfiles import read_text
from nanosweep.tracking.names import CHECKPOINT, IMPORTED_FROM_TAG, IMPORTED_RUN
from nanosweep.tracking.query import as_scope, finished_runs
from nanosweep.tracking.run import TrackedRun
from nanosweep.tracking.scope import StudyScope
from nanosweep.tracking.store import ensure_store

STUDY_FOLDER = re.compile(r"nanoGPT_results_vijay_(?P<member>\w+)")
PROFILE = "full"  # the study ran nanoGPT's recipe unchanged
# the loss nanoGPT stored in ckpt.pt as best_val_loss: with always_save_checkpoint=True, the latest evaluation's
CHECKPOINT_VAL_LOSS = "checkpoint_val_loss"


class StudyFormatError(ConfigError):
    """A study folder or its results.csv is malformed; the message names the file, line and value."""


@dataclass(frozen=True)
class StudyRow:
    """One line of a study's results.csv, checked."""

    line: int
    point: GridPoint
    train_loss: float
    val_loss: float
    loss_gap: float
    total_params: str  # as the study wrote it (nanoGPT's rounded count, e.g. 800000.0)
    config_path: str


@dataclass(frozen=True)
class Imported:
    """What an import did: new runs by name, rows skipped as already imported, warnings to show."""

    runs: dict[str, str]  # run name -> new run id
    experiment_id: str  # where new runs went
    skipped: list[str]  # names already imported into the experiment
    warnings: list[str]


def member_of(folder: Path, member: str | None) -> str:
    """The member given, else the one in the folder's name (nanoGPT_results_vijay_{member})."""
    if member:
        return member
    match = STUDY_FOLDER.fullmatch(folder.resolve().name)
    if not match:
        raise StudyFormatError(
            f"cannot tell the member from the folder name {folder.resolve().name!r} "
            "(the study's are nanoGPT_results_vijay_<member>): pass --member"
        )
    return match["member"]


def _csv_number(path: Path, line: int, column: str, text: str) -> float:
    """A number of the CSV: a loss or a parameter count is finite (float() also reads nan and inf)."""
    try:
        value = float(text)
    except ValueError:
        raise StudyFormatError(f"{path}, line {line}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise StudyFormatError(f"{path}, line {line}: {column} {text!r} is not allowed: it must be a finite number")
    return value


def read_results(path: Path, points: dict[str, GridPoint], member: str) -> list[StudyRow]:
    """Parse and check results.csv against the member's grid; the first problem is refused with its line."""
    if not path.is_file():
        raise StudyFormatError(f"{path} is missing: a study folder holds results.csv with the runs' losses")
    # read_text drops a spreadsheet's byte-order mark, which is no part of the header
    lines = list(csv.reader(io.StringIO(read_text(path, StudyFormatError), newline="")))
    if not lines or lines[0] != STUDY_HEADER:
        got = ",".join(lines[0]) if lines else "nothing"
        raise StudyFormatError(f"{path}, line 1: header is {got!r}, expected {','.join(STUDY_HEADER)!r}")
    rows, seen = [], set()
    for number, fields in enumerate(lines[1:], start=2):
        if not fields:
            continue  # a blank line
        if len(fields) != len(STUDY_HEADER):
            raise StudyFormatError(f"{path}, line {number}: {len(fields)} fields, expected {len(STUDY_HEADER)}")
        name = fields[0]
        if name not in points:
            example = next(iter(points))
            raise StudyFormatError(
                f"{path}, line {number}: {name!r} is not one of member {member}'s {len(points)} grid points as the "
                f"study ran them (names like {example})"
            )
        if name in seen:
            raise StudyFormatError(f"{path}, line {number}: {name} appears twice")
        seen.add(name)
        train, val, gap = (_csv_number(path, number, c, t) for c, t in zip(STUDY_HEADER[1:4], fields[1:4]))
        _csv_number(path, number, STUDY_HEADER[4], fields[4])
        rows.append(StudyRow(number, points[name], train, val, gap, fields[4], fields[5]))
    if not rows:
        raise StudyFormatError(f"{path}: no runs below the header")
    return rows


def _checkpoint_facts(path: Path) -> tuple[int, float]:
    """(iter_num, stored val loss) of a study checkpoint; nanoGPT stores it as a 0-d tensor named best_val_loss,
    but with always_save_checkpoint=True (the study's setting) it is the latest evaluation's loss, not the best."""
    checkpoint = load_checkpoint(path)
    return int(checkpoint["iter_num"]), float(checkpoint["best_val_loss"])


def _total_params(row: StudyRow, vocab: Vocab) -> int:
    with torch.device("meta"):  # the exact count without allocating weights
        return build_model(row.point.config, vocab.size).total_params()


def _import_row(row: StudyRow, folder: Path, experiment_id: str, vocab: Vocab) -> tuple[str, list[str]]:
    """One row as one FINISHED run; returns its id and any warnings."""
    cfg = row.point.config
    warnings = []
    checkpoint = folder / cfg.run_name / CHECKPOINT
    step, stored = cfg.max_iters, None
    if not checkpoint.is_file():
        warnings.append(f"{cfg.run_name}: no {checkpoint.relative_to(folder)}; imported without a checkpoint")
        checkpoint = None
    else:
        try:
            step, stored = _checkpoint_facts(checkpoint)
        except Exception as exc:  # a truncated or foreign file: keep the numbers, drop the file
            warnings.append(f"{cfg.run_name}: {checkpoint.name} is unreadable ({exc}); imported without it")
            checkpoint = None
    tags = {**row.point.study_tags(IMPORTED_RUN), IMPORTED_FROM_TAG: str(folder.resolve())}
    run = TrackedRun.create(experiment_id, cfg.run_name, tags)
    # an error or a stop signal from here on ends the run FAILED or KILLED with the command (tracking.open_runs)
    run.log_params(
        {
            **cfg.to_dict(),
            "total_params": _total_params(row, vocab),
            "tokens_per_iter": cfg.tokens_per_iter,
            "member": row.point.member,
            "profile": PROFILE,
            "study_total_params": row.total_params,
            "study_config_path": row.config_path,
        }
    )
    # the study's figures are from its last evaluation: the checkpoint's iteration (1800 for its MI2000 runs)
    run.log_metrics({"train_loss": row.train_loss, "val_loss": row.val_loss}, step=step)
    run.log_metrics({"loss_gap": row.loss_gap}, step=step)
    if stored is not None:  # the checkpoint's own figure, under an honest name (the best is unknown)
        run.log_metrics({CHECKPOINT_VAL_LOSS: stored}, step=step)
    run.log_text(vocab.to_json(), "vocab.json")
    run.log_text(cfg.nanogpt_config(out_dir=cfg.run_name), f"{cfg.run_name}.py")
    if checkpoint is not None:
        run.log_file(checkpoint)
    for sample in sorted((folder / "samples").glob(f"{cfg.run_name}*")):
        if sample.is_file() and re.fullmatch(rf"{re.escape(cfg.run_name)}(\W.*)?", sample.name):
            run.log_file(sample, "samples")
    run.finish("FINISHED")
    return run.run_id, warnings


def import_study(
    folder: Path, member: str | None, where: StudyScope | str, vocab: Vocab, sweeps_dir: Path
) -> Imported:
    """Import every row of folder's results.csv not yet imported where the scope looks, in grid order.

    New runs go where the member's finished runs already are (tracking.StudyScope.home).
    """
    name = member_of(folder, member)
    if name == "all":
        raise StudyFormatError("member='all' is not allowed here: a study folder holds one member's runs")
    (chosen,) = load_members(sweeps_dir, name)
    points = {point.config.run_name: point for point in expand(chosen, PROFILE)}
    rows = read_results(folder / "results.csv", points, chosen.name)
    ensure_store()  # the folder is sound: now the store may be made
    scope = as_scope(where)
    done = finished_runs(scope)
    if len(done):
        done = done[done["member"] == chosen.name]
    experiment_id = scope.home(set(done["experiment_id"]) if len(done) else set(), f"member {chosen.name!r}")
    if len(done):
        done = done[done["run_kind"] == IMPORTED_RUN]
    already = set(done["name"]) if len(done) else set()
    imported, warnings = {}, []
    for row in sorted(rows, key=lambda r: r.point.position):
        if row.point.config.run_name in already:
            continue
        run_id, notes = _import_row(row, folder, experiment_id, vocab)
        imported[row.point.config.run_name] = run_id
        warnings += notes
    skipped = [r.point.config.run_name for r in rows if r.point.config.run_name in already]
    return Imported(imported, experiment_id, skipped, warnings)
