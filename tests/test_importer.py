"""import-results: a study folder written by the test (the study's format) into MLflow runs, and read back."""

from __future__ import annotations

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from helpers import HEADER, ROWS, SWEEPS, study_folder
from nanosweep.cli.main import main
from nanosweep.models.download import download, load_run_model
from nanosweep.models.importer import StudyFormatError, import_study
from nanosweep.sampling import SampleSettings, generate_texts
from nanosweep.tracking import query


def test_import_creates_runs_with_the_studys_params_metrics_and_artifacts(store, prepared, tmp_path):
    folder = study_folder(tmp_path)
    result = import_study(folder, None, "nanosweep", prepared.vocab(), SWEEPS)
    assert list(result.runs) == [name for name, *_ in ROWS] and result.skipped == []
    assert result.warnings == [f"{ROWS[1][0]}: no {ROWS[1][0]}/ckpt.pt; imported without a checkpoint"]

    runs = query.select("nanosweep", "shallow_small", "full")
    assert list(runs.name) == [name for name, *_ in ROWS]
    assert list(runs.grid_position) == [1, 2, 3] and list(runs.global_id) == [1, 2, 3]
    assert set(runs.run_kind) == {"imported"} and list(runs.total_params) == [795_904] * 3  # nanoGPT's exact count
    assert list(runs.train_loss) == [t for _, t, _, _ in ROWS] and list(runs.val_loss) == [v for _, _, v, _ in ROWS]

    client = MlflowClient()
    run = client.get_run(result.runs[ROWS[2][0]])
    assert run.data.tags["nanosweep.imported_from"] == str(folder.resolve())
    params = run.data.params
    assert (params["n_head"], params["n_embd"], params["max_iters"], params["dropout"], params["seed"]) == (
        "4", "128", "2000", "0.1", "3",
    )  # fmt: skip
    assert params["study_total_params"] == "800000.0"
    assert params["study_config_path"] == f"/content/nanoGPT/{ROWS[2][0]}.py"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss")] == [(1800, 1.9702)]
    assert run.data.metrics["loss_gap"] == 0.0601
    # nanoGPT with always_save_checkpoint=True stores the latest evaluation's loss, not the best: named for what it is
    assert run.data.metrics["checkpoint_val_loss"] == pytest.approx(1.965) and "best_val_loss" not in run.data.metrics
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert paths == {"ckpt.pt", "vocab.json", f"{ROWS[2][0]}.py", "samples"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == [f"samples/{ROWS[2][0]}.txt"]
    assert "ckpt.pt" not in {a.path for a in client.list_artifacts(result.runs[ROWS[1][0]])}
    config = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{ROWS[2][0]}.py")
    assert "n_layer = 4" in config and "max_iters = 2000" in config

    # an imported checkpoint samples like any run's
    model, vocab = load_run_model(run.info.run_id)
    [text] = generate_texts(model, vocab, SampleSettings(prompt="ROMEO:", num_samples=1, max_new_tokens=10))
    assert text.startswith("ROMEO:") and len(text) == 16

    # and downloads back into the study's layout, checkpoint bytes unchanged
    download(runs, tmp_path / "back")
    back = tmp_path / "back" / "nanoGPT_results_vijay_shallow_small"
    assert (back / ROWS[2][0] / "ckpt.pt").read_bytes() == (folder / ROWS[2][0] / "ckpt.pt").read_bytes()
    assert [line.split(",")[:4] for line in (back / "results.csv").read_text().splitlines()[1:]] == [
        [n, f"{t:.4f}", f"{v:.4f}", f"{g:.4f}"] for n, t, v, g in ROWS
    ]

    again = import_study(folder, None, "nanosweep", prepared.vocab(), SWEEPS)
    assert again.runs == {} and again.skipped == [name for name, *_ in ROWS]


def test_a_malformed_csv_is_refused_with_its_line_and_nothing_is_imported(store, prepared, tmp_path):
    first, second = ROWS[0][0], ROWS[1][0]
    cases = [
        (["Experiment,Train Loss,Val Loss"], "line 1: header is 'Experiment,Train Loss,Val Loss', expected"),
        ([HEADER, f"{first},2.2,2.3,0.1,800000.0,/c/x.py", f"{second},2.2,2.3"], "line 3: 3 fields, expected 6"),
        ([HEADER, f"{first},2.2,abc,0.1,800000.0,/c/x.py"], "line 2: Val Loss 'abc' is not a number"),
        ([HEADER, f"{first},2.2,2.3,0.1,1,/c/x.py", "b64_L9_H4_E128_BS8_MI1000_D10_s1,2,2,0,1,x"], "line 3: 'b64_L9_"),
        ([HEADER, f"{first},2,2,0,1,x", f"{first},2,2,0,1,x"], f"line 3: {first} appears twice"),
        ([HEADER], "no runs below the header"),
        ([HEADER, f"{first},nan,2.3,0.1,1,x"], "line 2: Train Loss 'nan' is not allowed: it must be a finite number"),
        ([HEADER, f"{first},2.2,inf,-inf,1,x"], "line 2: Val Loss 'inf' is not allowed: it must be a finite number"),
        ([HEADER, f"{first},2.2,2.3,0.1,-inf,x"], "line 2: Total Params '-inf' is not allowed"),
        ([HEADER, f"{first},2.2,2.3,0.1,1,/caf\udce9.py"], "results.csv: line 2 holds byte 0xe9, which is not UTF-8"),
    ]
    for i, (lines, message) in enumerate(cases):
        folder = tmp_path / str(i) / "nanoGPT_results_vijay_shallow_small"
        folder.mkdir(parents=True)
        # surrogateescape writes the \udce9 above as the byte 0xe9 (latin-1's e-acute), no UTF-8
        (folder / "results.csv").write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
        with pytest.raises(StudyFormatError) as refused:
            import_study(folder, None, "nanosweep", prepared.vocab(), SWEEPS)
        assert str(refused.value).startswith(f"{folder / 'results.csv'}") and message in str(refused.value)
    assert MlflowClient().get_experiment_by_name("nanosweep") is None  # nothing was written, not even the experiment


def test_import_command_warns_and_refuses_with_one_line_errors(store, tmp_path):
    folder = study_folder(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["import-results", str(folder), "--sweeps-dir", str(SWEEPS)])
    assert result.exit_code == 0, result.output
    assert f"warning: {ROWS[1][0]}: no {ROWS[1][0]}/ckpt.pt" in result.output
    assert "imported 3 runs into experiment 'nanosweep'" in result.output

    renamed = folder.rename(tmp_path / "old_study")
    result = runner.invoke(main, ["import-results", str(renamed), "--sweeps-dir", str(SWEEPS)])
    assert result.exit_code == 1 and "cannot tell the member from the folder name 'old_study'" in result.output
    result = runner.invoke(main, ["import-results", str(renamed), "--member", "tall", "--sweeps-dir", str(SWEEPS)])
    assert result.exit_code == 1
    assert (
        "member='tall' is unknown: choose one of shallow_small, deep_small, shallow_large, deep_large" in result.output
    )
