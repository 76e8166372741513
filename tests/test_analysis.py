"""Analysis from the tracking store: study CSVs, rankings, main effects, plots, report, the analysis run, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import scipy.stats
import statsmodels.formula.api as smf
from click.testing import CliRunner
from mlflow import MlflowClient
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multitest import multipletests

from helpers import FINAL, HEADER, PARAMS, config, evals, log_study
from nanosweep.analysis import findings, layout, plots, stats
from nanosweep.analysis.pipeline import analyze
from nanosweep.cli.main import main
from nanosweep.tracking import query
from nanosweep.tracking.store import ensure_experiment
from study_fakes import artifact_uri, log_known_run, shared_store


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One store with the eight known runs, shared by the read-only tests of this module."""
    root = tmp_path_factory.mktemp("study")
    with shared_store(root):
        yield {"root": root, "run_ids": log_study(ensure_experiment("nanosweep"))}


def test_member_csv_header_rows_and_config_uri_are_exact(study):
    runs = query.select("nanosweep", "m1")
    expected = [HEADER]
    for position in (1, 2, 3, 4):
        cfg = config("m1", position)
        train, val = FINAL["m1", position]
        uri = f"{artifact_uri(study['run_ids']['m1', position])}/{cfg.run_name}.py"
        expected.append(f"{cfg.run_name},{train:.4f},{val:.4f},{val - train:.4f},{PARAMS[cfg.n_embd]},{uri}")
        assert Path(uri).read_text().startswith(f"# nanoGPT config of {cfg.run_name}")  # the URI is the artifact
    shuffled = runs.iloc[[2, 0, 3, 1]]  # rows come out in grid order whatever order they come in
    assert layout.results_csv(shuffled) == "\n".join(expected) + "\n"
    assert expected[1] == f"b32_L2_H2_E32_BS4_MI20_D10_s1,2.0000,2.1000,0.1000,30000,{expected[1].split(',')[-1]}"


def test_rows_follow_grid_order_within_a_member_and_global_id_overall(study):
    runs = query.select("nanosweep")
    assert list(zip(runs.member, runs.grid_position)) == [(m, p) for m in ("m1", "m2") for p in (1, 2, 3, 4)]
    combined = pd.read_csv(pd.io.common.StringIO(layout.combined_csv(runs)))
    assert list(combined.global_id) == list(range(1, 9))
    assert {"n_head", "n_embd", "dropout", "batch_size", "max_iters", "learning_rate", "warmup_iters"} <= set(combined)
    assert list(combined.n_embd) == [32, 32, 64, 64] * 2 and list(combined.dropout) == [0.1, 0.2] * 4


def test_rankings_by_val_loss_and_gap_on_the_hand_checked_table(study):
    runs = query.select("nanosweep")
    by_val = findings.rankings(runs, "val_loss")
    # 1.80 m2p4, 1.85 m2p3, 1.90 m1p3, 1.95 m1p4, 2.00 m2p1, 2.10 m1p1 = m2p2 (tie, global id order), 2.25 m1p2
    names = [config(m, p).run_name for m, p in [("m2", 4), ("m2", 3), ("m1", 3), ("m1", 4), ("m2", 1), ("m1", 1)]]
    assert list(by_val.name[:6]) == names
    assert list(by_val["rank"]) == [1, 2, 3, 4, 5, 6, 6, 8]
    assert list(by_val.member[5:7]) == ["m1", "m2"]
    assert list(by_val.rank_in_member) == [1, 2, 1, 2, 3, 3, 4, 4]
    by_gap = findings.rankings(runs, "loss_gap")
    # gaps m1: .10 .05 .20 .15; m2: .10 .05 .25 .08 -> .05 (m1p2, m2p2) .08 .10 .10 .15 .20 .25
    assert list(by_gap["rank"]) == [1, 1, 3, 4, 4, 6, 7, 8]
    assert by_gap.loss_gap.iloc[-1] == pytest.approx(0.25)
    best = findings.best_per_member(runs)
    assert list(best.name) == [config("m1", 3).run_name, config("m2", 4).run_name]


def test_main_effects_means_spread_and_balance_on_the_hand_checked_table(study):
    runs = query.select("nanosweep")
    effects = findings.main_effects(runs, "val_loss").set_index(["scope", "factor", "level"])
    assert set(effects.index.get_level_values("factor")) == {"n_embd", "dropout", "n_layer"}
    assert effects.loc[("m1", "n_embd", 32), "mean"] == pytest.approx((2.1 + 2.25) / 2)
    assert effects.loc[("m1", "n_embd", 32), "std"] == pytest.approx(0.15 / math.sqrt(2))
    assert effects.loc[("m1", "n_embd", 64), ["min", "max", "runs"]].tolist() == pytest.approx([1.9, 1.95, 2])
    assert effects.loc[("m1", "n_embd", 64), "effect"] == pytest.approx(0.25)
    assert effects.loc[("m1", "dropout", 0.2), "mean"] == pytest.approx((2.25 + 1.95) / 2)
    assert effects.loc[("all", "n_layer", 2), "mean"] == pytest.approx(2.05)
    assert effects.loc[("all", "n_layer", 3), "mean"] == pytest.approx(1.9375)
    assert effects.loc[("all", "n_layer", 3), "effect"] == pytest.approx(0.1125)
    assert effects["balanced"].all()
    ranked = findings.importance(findings.main_effects(runs, "val_loss"))
    assert list(ranked[ranked.scope == "all"].factor) == ["n_embd", "n_layer", "dropout"]
    # without m1's last run the grid is no longer balanced for any factor
    partial = runs.drop(index=runs.index[(runs.member == "m1") & (runs.grid_position == 4)])
    partial_effects = findings.main_effects(partial, "val_loss")
    assert not partial_effects[partial_effects.scope == "m1"]["balanced"].any()


def test_overfitting_onset_from_the_evaluation_history(study):
    runs = query.select("nanosweep")
    table = findings.overfitting(runs, query.histories(list(runs.run_id))).set_index("name")
    onset = table.loc[config("m1", 3).run_name]
    assert bool(onset.overfits) and onset.best_step == 10 and onset.rise_after_best == pytest.approx(0.1)
    assert table.overfits.sum() == 1 and (table.evaluations == 3).all()


def test_every_plot_shows_the_runs_data(study):
    runs = query.select("nanosweep")
    history = query.histories(list(runs.run_id))
    f = findings.findings(runs, history)
    m1 = runs[runs.member == "m1"]

    curves = plots.loss_curves("m1", m1, history)
    assert len([ax for ax in curves.axes if ax.get_visible()]) == 2  # two architectures: n_embd 32 and 64
    for run in m1.itertuples():
        lines = [line for ax in curves.axes for line in ax.get_lines() if line.get_gid() == run.name]
        assert [list(line.get_ydata()) for line in lines] == [
            [evals("m1", run.grid_position)[s][i] for s in (0, 10, 20)] for i in (0, 1)
        ]
        assert list(lines[0].get_xdata()) == [0, 10, 20]

    gaps = plots.loss_gaps("m1", m1)
    bars = gaps.axes[0].patches
    expected_gaps = [FINAL["m1", p][1] - FINAL["m1", p][0] for p in (1, 2, 3, 4)]
    assert [bar.get_width() for bar in bars] == pytest.approx(expected_gaps)
    assert [bar.get_y() for bar in bars] == sorted((bar.get_y() for bar in bars), reverse=True)  # grid order, top down
    assert [t.get_text() for t in gaps.axes[0].get_yticklabels()] == list(m1.name)

    scatter = plots.params_vs_val_loss(runs, f.members)
    shown = {c.get_gid(): c.get_offsets() for c in scatter.axes[0].collections}
    for member in ("m1", "m2"):
        chosen = runs[runs.member == member]
        assert list(shown[f"{member}:20"][:, 1]) == pytest.approx(list(chosen.val_loss))
        x = shown[f"{member}:20"][:, 0]
        assert list(x / x[0]) == pytest.approx(list(chosen.total_params / chosen.total_params.iloc[0]))

    effects = plots.main_effects(f.effects, f.members, "val_loss")
    line = next(line for ax in effects.axes for line in ax.get_lines() if line.get_gid() == "m1:n_embd")
    assert list(line.get_ydata()) == pytest.approx([(2.1 + 2.25) / 2, (1.9 + 1.95) / 2])
    assert [ax.get_xlabel() for ax in effects.axes if ax.get_visible()] == ["n_layer", "n_embd", "dropout"]

    comparison = plots.member_comparison(runs, f.members)
    offsets = {c.get_gid(): c.get_offsets()[:, 1].tolist() for ax in comparison.axes for c in ax.collections}
    assert offsets["m2:val_loss"] == pytest.approx([FINAL["m2", p][1] for p in (1, 2, 3, 4)])
    assert offsets["best:m1"] == pytest.approx([1.9]) and offsets["best:m2"] == pytest.approx([1.8])


def test_analyze_writes_csvs_plots_report_and_logs_an_analysis_run(study, tmp_path):
    result = analyze("nanosweep", "all", "auto", tmp_path)
    folder = tmp_path / "analysis-all"
    assert (tmp_path / "nanoGPT_results_vijay_m1" / "results.csv").read_text().startswith(HEADER + "\n")
    pngs = sorted(p.name for p in (folder / "plots").iterdir())
    assert pngs == sorted(
        [f"loss_curves_{m}.png" for m in ("m1", "m2")]
        + [f"loss_gap_{m}.png" for m in ("m1", "m2")]
        + ["main_effects_loss_gap.png", "main_effects_val_loss.png", "member_comparison.png", "params_vs_val_loss.png"]
        + ["interaction_val_loss.png", "replicate_spread.png"]
    )
    points = (tmp_path / "nanoGPT_results_vijay_m2" / "results_by_point.csv").read_text()
    assert points.startswith("member,global_id,grid_position,point,")
    for png in (folder / "plots").iterdir():
        height, width, _ = matplotlib.image.imread(png).shape
        assert height > 300 and width > 500
    markdown = (folder / "report.md").read_text()
    winner = config("m2", 4).run_name
    assert f"The best configuration is **{winner[:-3]}** (m2): mean validation loss 1.8000 over 1 seed" in markdown
    assert "`n_embd` 0.2375 (64: 1.8750 vs 32: 2.1125)" in markdown  # the largest overall effect, with its levels
    assert "overfitting set in at iteration 10" in markdown
    html = (folder / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == markdown.count("![") and 'src="plots/' not in html
    assert not list(tmp_path.glob(".analysis-*"))  # the staging folder is gone

    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.run_name == "analysis-all" and run.info.status == "FINISHED"
    assert run.data.tags["run_kind"] == "analysis" and run.data.tags["member"] == "all"
    logged = {a.path for a in client.list_artifacts(result.run_id, "analysis-all")}
    assert {"analysis-all/report.html", "analysis-all/runs.csv", "analysis-all/plots"} <= logged
    assert len(query.select("nanosweep")) == 8  # the analysis run is not mistaken for a result


def test_rebuilding_gives_byte_identical_files(study, tmp_path):
    analyze("nanosweep", "all", "auto", tmp_path / "a", log_run=False)
    analyze("nanosweep", "all", "auto", tmp_path / "b", log_run=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert any(f.suffix == ".csv" for f in files) and len(files) == 25
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    stale = tmp_path / "b" / "analysis-all" / "plots" / "loss_curves_gone.png"
    stale.write_bytes(b"from an older analysis")
    analyze("nanosweep", "all", "auto", tmp_path / "b", log_run=False)  # the folder is replaced whole
    assert not stale.exists() and (tmp_path / "b" / "analysis-all" / "plots" / "loss_curves_m1.png").is_file()


def test_latest_finished_run_per_grid_point_and_profiles_are_never_mixed(store, tmp_path):
    experiment_id = ensure_experiment("nanosweep")
    cfg = config("m1", 1)
    log_known_run(experiment_id, "m1", 1, 1, cfg, {20: (2.0, 2.1)})
    rerun = log_known_run(experiment_id, "m1", 1, 1, cfg, {20: (1.5, 1.6)})
    log_known_run(experiment_id, "m1", 1, 1, cfg, {20: (1.0, 1.1)}, status="FAILED")
    log_known_run(experiment_id, "m1", 2, 2, config("m1", 2), {20: (1.0, 1.1)}, kind="sweep")
    runs = query.select("nanosweep")
    assert list(runs.run_id) == [rerun]

    log_known_run(experiment_id, "m1", 1, 1, cfg, {20: (1.9, 2.0)}, profile="full")
    with pytest.raises(query.SelectionError, match="profiles full, quick: choose one with --profile"):
        query.select("nanosweep")
    assert list(query.select("nanosweep", profile="full").val_loss) == [2.0]


def test_cli_prints_tables_and_refuses_unknown_member_without_writing(study, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["analyze", "--member", "m1", "--out", str(tmp_path / "out"), "--no-log-run"])
    assert result.exit_code == 0, result.output
    assert "Top 10 by validation loss" in result.output and config("m1", 3).run_name in result.output
    assert (tmp_path / "out" / "analysis-m1" / "report.html").is_file()

    result = runner.invoke(main, ["analyze", "--member", "m9", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: member='m9' has no finished quick runs in any experiment of the tracking store: "
        "choose one of m1, m2 or all"
    )
    assert not (tmp_path / "bad").exists()
    result = runner.invoke(main, ["analyze", "--profile", "full", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 1 and "profile='full' has no finished runs" in result.output


def test_one_seed_per_point_says_there_is_no_noise_estimate_and_tests_against_the_interactions(study, tmp_path):
    runs = query.select("nanosweep")
    f = findings.findings(runs, query.histories(list(runs.run_id)))
    assert (f.noise.source, f.noise.df) == (stats.INTERACTIONS, 1) and f.anova_val.balanced
    # the same numbers through statsmodels: main effects + two-way interactions, the three-way one is the residual
    expected = anova_lm(smf.ols("val_loss ~ (C(n_layer) + C(n_embd) + C(dropout))**2", runs).fit(), typ=2)
    table = f.anova_val.table.set_index("term")
    for name, row in expected.drop(index="Residual").iterrows():
        term = name.replace("C(", "").replace(")", "")
        assert table.loc[term, ["df", "sum_sq", "F", "p"]].tolist() == pytest.approx(
            [row.df, row.sum_sq, row.F, row["PR(>F)"]]
        )
    [residual] = table.index[table.kind == "error"]
    assert residual == "residual: interactions of 3+ factors (no replicates, so no noise estimate)"
    assert table.loc[residual, "sum_sq"] == pytest.approx(expected.loc["Residual", "sum_sq"])
    assert f.noise.std == pytest.approx(math.sqrt(expected.loc["Residual", "sum_sq"]))
    # one member: two factors, so its residual is their interaction (what main effects leave of 0.075)
    m1 = stats.anova(runs[runs.member == "m1"], "val_loss", ["n_embd", "dropout"]).table.set_index("term")
    assert list(m1.index[:2]) == ["n_embd", "dropout"] and m1.sum_sq.iloc[2] == pytest.approx(0.075 - 0.0625 - 0.01)
    # a level mean's 95 % interval from the error term: 4 runs per level, 1 degree of freedom
    level = f.effects.set_index(["scope", "metric", "factor", "level"]).loc[("all", "val_loss", "n_embd", 64)]
    half = scipy.stats.t.ppf(0.975, 1) * math.sqrt(expected.loc["Residual", "sum_sq"] / 4)
    assert (level.ci_low, level.ci_high) == pytest.approx((1.875 - half, 1.875 + half))
    # without replicates the comparison with the best is a t-test on that residual, Holm-corrected
    ranked = f.by_mean
    assert list(ranked.test) == ["best"] + ["t on ANOVA error"] * 7 and ranked.tied_with_best.all()
    t = 0.05 / math.sqrt(expected.loc["Residual", "sum_sq"] / 1 * 2)
    assert ranked.p.iloc[1] == pytest.approx(2 * scipy.stats.t.sf(t, 1))
    assert list(ranked.p_holm.iloc[1:]) == pytest.approx(list(multipletests(ranked.p.iloc[1:], method="holm")[1]))

    analyze("nanosweep", "all", "auto", tmp_path, log_run=False)
    markdown = (tmp_path / "analysis-all" / "report.md").read_text()
    intro = markdown.split("\n\n")[1]
    assert "Each of the 8 grid points was trained with one seed, so there is **no noise estimate**" in intro
    assert f"a standard deviation of **{f.noise.std:.4f} nats** (1 degree of freedom)" in intro
    assert "All 8 configurations are within noise of each other" in markdown
    assert "error term: the highest-order interactions; one seed per point, so no noise estimate" in markdown
    assert "significant at 95 %: `n_embd` (F = 361.0, p = 0.033" in markdown


def test_replicates_rank_by_mean_and_ties_with_the_best_come_from_welch_and_holm(store, tmp_path):
    experiment_id = ensure_experiment("nanosweep")
    means = {1: 1.80, 2: 1.81, 3: 1.82, 4: 2.50}  # the top three within noise, the last far behind
    offsets = (-0.02, 0.0, 0.025)
    for position, mean in means.items():
        for replicate, offset in enumerate(offsets, start=1):
            cfg = config("m1", position).replace(seed=position + 1000 * (replicate - 1))
            value = mean + offset * (1 + position / 10)
            log_known_run(experiment_id, "m1", position, position, cfg, {20: (value - 0.1, value)}, replicate=replicate)
    runs = query.select("nanosweep")
    assert list(zip(runs.grid_position, runs.replicate)) == [(p, r) for p in (1, 2, 3, 4) for r in (1, 2, 3)]
    f = findings.findings(runs, query.histories(list(runs.run_id)))
    values = {p: runs[runs.grid_position == p].val_loss.to_numpy() for p in means}
    assert list(f.by_mean.grid_position) == [1, 2, 3, 4] and list(f.by_mean.test[1:]) == ["Welch"] * 3
    welch = [scipy.stats.ttest_ind(values[p], values[1], equal_var=False).pvalue for p in (2, 3, 4)]
    assert list(f.by_mean.p[1:]) == pytest.approx(welch)
    assert list(f.by_mean.p_holm[1:]) == pytest.approx(list(multipletests(welch, method="holm")[1]))
    assert list(f.by_mean.tied_with_best) == [True, True, True, False]
    pooled = math.sqrt(sum(v.var(ddof=1) for v in values.values()) / 4)
    assert (f.noise.source, f.noise.df, f.noise.std) == (stats.REPLICATES, 8, pytest.approx(pooled))

    spread = plots.replicate_spread(f.runs, f.by_mean)
    dots = {c.get_gid(): list(c.get_offsets()[:, 0]) for c in spread.axes[0].collections if c.get_gid()}
    for position in means:
        assert dots[config("m1", position).run_name[:-3]] == pytest.approx(list(values[position]))
    assert f.interaction == ("n_embd", "dropout")
    lines = plots.interaction(runs, f.interaction, f.anova_val).axes[0].get_lines()
    means_line = next(line for line in lines if line.get_gid() == "dropout=0.1")  # the caps come after it
    assert list(means_line.get_ydata()) == pytest.approx([values[1].mean(), values[3].mean()])  # n_embd 32, 64

    analyze("nanosweep", "m1", "auto", tmp_path, log_run=False)
    markdown = (tmp_path / "analysis-m1" / "report.md").read_text()
    assert f"pooled within grid points, is **{pooled:.4f} nats** (8 degrees of freedom)" in markdown.split("\n\n")[1]
    assert "The top 3 are within noise of each other: 2 configurations cannot be told apart from the best" in markdown
    assert "Welch's t-test between their seeds, Holm-corrected over the 3 comparisons" in markdown
    assert "residual: seed-to-seed (replicates)" in markdown
    points = pd.read_csv(tmp_path / "nanoGPT_results_vijay_m1" / "results_by_point.csv")
    assert list(points.n) == [3] * 4 and list(points.seeds) == [f"{p} {p + 1000} {p + 2000}" for p in means]
    results = (tmp_path / "nanoGPT_results_vijay_m1" / "results.csv").read_text().splitlines()
    assert len(results) == 13 and results[2].startswith(config("m1", 1).run_name[:-1] + "1001,")


def test_select_keeps_every_replicate_and_the_latest_run_of_each(store):
    experiment_id = ensure_experiment("nanosweep")
    cfg = config("m1", 1)
    first = log_known_run(experiment_id, "m1", 1, 1, cfg, {20: (2.0, 2.1)})  # no replicate tag: replicate 1
    log_known_run(experiment_id, "m1", 1, 1, cfg.replace(seed=1001), {20: (2.0, 2.2)}, replicate=2)
    rerun = log_known_run(experiment_id, "m1", 1, 1, cfg.replace(seed=1001), {20: (2.0, 2.3)}, replicate=2)
    runs = query.select("nanosweep")
    assert list(runs.replicate) == [1, 2] and list(runs.run_id) == [first, rerun]
