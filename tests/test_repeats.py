"""Repeats over seeds for real: a tiny grid swept with 3 seeds, its statistics checked against scipy and statsmodels."""

import io
import math

import pandas as pd
import pytest
import scipy.stats
import statsmodels.formula.api as smf
from mlflow import MlflowClient
from statsmodels.stats.anova import anova_lm

from conftest import TINY_MEMBER
from helpers import finish, study_runs, sweep
from nanosweep.analysis.pipeline import analyze

GRID = [(10, 0.0), (10, 0.1), (20, 0.0), (20, 0.1)]  # TINY_MEMBER's (max_iters, dropout), in grid order


def finished_metrics() -> pd.DataFrame:
    """The runs' own tags and final metrics, straight from MLflow."""
    rows = []
    for run in study_runs():
        assert run.info.status == "FINISHED"
        tags, metrics = run.data.tags, run.data.metrics
        position = int(tags["grid_position"])
        max_iters, dropout = GRID[position - 1]
        rows.append(
            {
                "name": run.info.run_name,
                "position": position,
                "replicate": int(tags["replicate"]),
                "seed": int(run.data.params["seed"]),
                "max_iters": max_iters,
                "dropout": dropout,
                "val_loss": metrics["val_loss"],
                "train_loss": metrics["train_loss"],
                "loss_gap": metrics["val_loss"] - metrics["train_loss"],
            }
        )
    return pd.DataFrame(rows).sort_values(["position", "replicate"]).reset_index(drop=True)


def test_three_seeds_per_point_give_scipy_intervals_a_statsmodels_anova_and_extend_by_one(store, sweeps_dir, tmp_path):
    code, output = finish(sweep(sweeps_dir, "--repeats", "3", "--workers", "2"), timeout=600)
    assert code == 0, output
    runs = finished_metrics()
    assert len(runs) == 12
    assert list(zip(runs.position, runs.replicate)) == [(p, r) for p in (1, 2, 3, 4) for r in (1, 2, 3)]
    assert list(runs.seed) == [p + 1000 * (r - 1) for p in (1, 2, 3, 4) for r in (1, 2, 3)]
    assert list(runs.name[:3]) == [f"b32_L2_H2_E32_BS8_MI10_D0_s{s}" for s in (1, 1001, 2001)]
    assert {r.data.tags["global_id"] for r in study_runs() if r.data.tags["grid_position"] == "2"} == {"202"}
    assert runs.groupby("position").val_loss.nunique().eq(3).all()  # the seeds really differ

    result = analyze("nanosweep", "tiny", "auto", tmp_path, log_run=False)
    study = tmp_path / "nanoGPT_results_vijay_tiny"
    assert len((study / "results.csv").read_text().splitlines()) == 1 + 12  # one row per run, every replicate
    points = pd.read_csv(study / "results_by_point.csv")
    assert list(points.grid_position) == [1, 2, 3, 4] and list(points.n) == [3] * 4
    assert list(points.seeds) == [f"{p} {p + 1000} {p + 2000}" for p in (1, 2, 3, 4)]
    for point in points.itertuples():
        seeds = runs[runs.position == point.grid_position]
        for metric in ("val_loss", "train_loss", "loss_gap"):
            values = seeds[metric].to_numpy()
            mean, std = values.mean(), values.std(ddof=1)
            low, high = scipy.stats.t.interval(0.95, 2, loc=mean, scale=scipy.stats.sem(values))
            shown = [getattr(point, f"{metric}_{part}") for part in ("mean", "std", "ci_low", "ci_high")]
            assert shown == pytest.approx([mean, std, low, high], rel=1e-5), metric  # the CSV keeps 6 digits

    # the same numbers through statsmodels: 2 factors x 3 seeds, so the residual is the seed-to-seed error
    fit = smf.ols("val_loss ~ C(max_iters) * C(dropout)", runs).fit()
    expected = anova_lm(fit, typ=2)
    table = pd.read_csv(io.StringIO((tmp_path / "analysis-tiny" / "anova_val_loss.csv").read_text()))
    table = table.set_index("term")
    for term, name in [
        ("max_iters", "C(max_iters)"),
        ("dropout", "C(dropout)"),
        ("max_iters:dropout", "C(max_iters):C(dropout)"),
    ]:
        row = expected.loc[name]
        got = table.loc[term, ["df", "sum_sq", "F", "p"]].tolist()
        assert got == pytest.approx([row.df, row.sum_sq, row.F, row["PR(>F)"]], rel=1e-4), term
        assert table.loc[term, "partial_eta_sq"] == pytest.approx(
            row.sum_sq / (row.sum_sq + expected.loc["Residual", "sum_sq"]), rel=1e-4
        )
    residual = table.loc["residual: seed-to-seed (replicates)"]
    assert (residual.df, residual.sum_sq) == (8, pytest.approx(expected.loc["Residual", "sum_sq"], rel=1e-4))

    # the noise floor: the within-point std pooled over the 4 points (equal n: the root of the mean variance)
    pooled = math.sqrt(runs.groupby("position").val_loss.var(ddof=1).mean())
    assert result.findings.noise.std == pytest.approx(pooled) and result.findings.noise.df == 8
    intro = (tmp_path / "analysis-tiny" / "report.md").read_text().split("\n\n")[1]
    assert "The noise floor, the seed-to-seed standard deviation of the final validation loss pooled within " in intro
    assert f"**{pooled:.4f} nats** (8 degrees of freedom)" in intro

    # rerun with the same repeats: nothing new; one more repeat: exactly one new run per grid point
    code, output = finish(sweep(sweeps_dir, "--repeats", "3"))
    assert code == 0 and output.strip().endswith("nothing to run: every grid point is finished or running elsewhere")
    assert len(study_runs()) == 12
    code, output = finish(sweep(sweeps_dir, "--repeats", "4", "--workers", "2"), timeout=600)
    assert code == 0, output
    assert "[16/16] done 4 | running 0 | skipped 12 | failed 0" in output
    runs = finished_metrics()
    new = runs[runs.replicate == 4]
    assert list(new.position) == [1, 2, 3, 4] and list(new.seed) == [3001, 3002, 3003, 3004]
    assert len(runs) == 16 and runs.groupby("position").size().eq(4).all()
    client = MlflowClient()
    assert all(client.get_run(r.info.run_id).data.tags["replicate"] in "1234" for r in study_runs())


def test_repeats_come_from_the_member_file_unless_the_command_line_says_and_bad_values_are_refused(store, sweeps_dir):
    (sweeps_dir / "tiny.yaml").write_text("repeats: 2\n" + TINY_MEMBER % (10, 10))
    code, output = finish(sweep(sweeps_dir, "--dry-run"))
    assert code == 0 and output.strip().endswith("8 run"), output
    assert "b32_L2_H2_E32_BS8_MI20_D10_s1004" in output
    code, output = finish(sweep(sweeps_dir, "--dry-run", "--repeats", "1"))
    assert code == 0 and output.strip().endswith("4 run") and "_s1001" not in output
    code, output = finish(sweep(sweeps_dir, "--repeats", "-1"))
    assert (code, output.strip().splitlines()[-1]) == (
        2,
        "Error: Invalid value for '--repeats': -1 is not in the range x>=0.",
    )
    (sweeps_dir / "tiny.yaml").write_text("repeats: 0\n" + TINY_MEMBER % (10, 10))
    code, output = finish(sweep(sweeps_dir))
    assert code == 1 and output.endswith("key 'repeats' must be an integer >= 1 (seeds per grid point), got 0\n")
    assert not study_runs() and not study_runs("sweep")
