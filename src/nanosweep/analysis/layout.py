"""The study's folders and CSV formats, shared with the notebooks' CSVs: what importing, downloading and the
analysis write and read.
"""

from __future__ import annotations

import csv
import io

import pandas as pd

from nanosweep.config import TRAIN_FIELDS

STUDY_HEADER = ["Experiment", "Train Loss", "Val Loss", "Loss Gap", "Total Params", "Config Path"]
# the hyperparameters the study varies: block_size and n_layer between members, the rest within one
HYPERPARAMETERS = ("block_size", "n_layer", "n_head", "n_embd", "batch_size", "max_iters", "dropout")
COMBINED_COLUMNS = [
    "global_id",
    "member",
    "grid_position",
    "replicate",
    "name",
    "profile",
    "run_kind",
    *TRAIN_FIELDS,
    "total_params",
    "train_loss",
    "val_loss",
    "loss_gap",
    "best_val_loss",
    "run_id",
    "config_uri",
    "checkpoint_uri",
]


def study_folder(member: str) -> str:
    """The study's folder name of a member's results."""
    return f"nanoGPT_results_vijay_{member}"


def results_csv(runs: pd.DataFrame) -> str:
    """One member's results.csv as the study wrote it (exact parameter counts): a row per run (every seed replicate),
    in grid order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(STUDY_HEADER)
    for row in runs.sort_values(["grid_position", "replicate"], kind="stable").itertuples():
        loss_gap = row.val_loss - row.train_loss
        writer.writerow(
            [
                row.name,
                f"{row.train_loss:.4f}",
                f"{row.val_loss:.4f}",
                f"{loss_gap:.4f}",
                int(row.total_params),
                row.config_uri,
            ]
        )
    return out.getvalue()


def table_csv(frame: pd.DataFrame) -> str:
    """A table as CSV, formatted the same way every time (rebuilds compare byte for byte)."""
    return frame.to_csv(index=False, lineterminator="\n", float_format="%.6g")


def combined_csv(runs: pd.DataFrame) -> str:
    """Every run of every member with every hyperparameter as a column, in global id order."""
    return table_csv(runs.sort_values("global_id", kind="stable")[COMBINED_COLUMNS])
