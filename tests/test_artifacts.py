"""Checkpoints and samples out of the artifact store: the study's layout, skip-if-present, sampling any run."""

from __future__ import annotations

import os

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import tiny_config
from nanosweep.checkpoint import load_checkpoint, model_from_checkpoint
from nanosweep.cli.main import main
from nanosweep.data import Vocab
from nanosweep.models.download import download, load_run_model
from nanosweep.sampling import SampleSettings, format_samples, generate_texts
from nanosweep.tracking import query
from nanosweep.tracking.store import ensure_experiment
from study_fakes import log_known_run, shared_store, train_study_run

TRAINED = tiny_config(seed=2).run_name  # grid point 2 is trained for real; point 1 has numbers only


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prepared) -> dict:
    """One store for the module (the tests only read it): a trained run and a run without artifacts."""
    with shared_store(tmp_path_factory.mktemp("store")):
        experiment_id = ensure_experiment("nanosweep")
        run_id = train_study_run("nanosweep", experiment_id, "m1", 2)
        log_known_run(experiment_id, "m1", 1, 1, tiny_config(seed=1), {20: (3.0, 3.1)})
        yield {"run_id": run_id}


def test_download_writes_the_study_layout_and_skips_files_already_present(trained, tmp_path):
    out = tmp_path / "results"
    runs = query.select("nanosweep", "m1")
    assert download(runs, out) == (2, 0)  # ckpt.pt and the samples file of the trained run
    folder = out / "nanoGPT_results_vijay_m1"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [f"{TRAINED}/ckpt.pt", "results.csv", f"samples/{TRAINED}.txt"]
    lines = (folder / "results.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["Experiment", tiny_config(seed=1).run_name, TRAINED]
    client = MlflowClient()
    sizes = {a.path: a.file_size for a in client.list_artifacts(trained["run_id"])}
    assert (folder / TRAINED / "ckpt.pt").stat().st_size == sizes["ckpt.pt"]
    assert load_checkpoint(folder / TRAINED / "ckpt.pt")["iter_num"] == 20
    samples = folder / "samples" / f"{TRAINED}.txt"
    assert samples.read_text() == mlflow.artifacts.load_text(f"runs:/{trained['run_id']}/samples/{TRAINED}.txt")

    os.utime(samples, (1, 1))  # a file that is skipped keeps its old timestamp
    assert download(runs, out) == (0, 2)
    assert samples.stat().st_mtime == 1

    (folder / TRAINED / "ckpt.pt").write_bytes(b"truncated")  # a different size is fetched again
    assert download(runs, out) == (1, 1)
    assert (folder / TRAINED / "ckpt.pt").stat().st_size == sizes["ckpt.pt"]
    assert not [p for p in folder.rglob(".*")]  # no temporary files left behind


def test_download_command_reports_and_refuses_an_unknown_member(trained, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["download", "--member", "m1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "2 runs: 2 files downloaded, 0 already present (same size)" in result.output
    result = runner.invoke(main, ["download", "--member", "nobody", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "member='nobody'" in result.output and "choose one of m1 or all" in result.output
    assert not (tmp_path / "x").exists()


def test_sample_regenerates_the_runs_own_samples_from_its_downloaded_checkpoint(trained, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["sample", "--name", TRAINED, "--num-samples", "2", "--max-new-tokens", "40"])
    assert result.exit_code == 0, result.output
    logged = mlflow.artifacts.load_text(f"runs:/{trained['run_id']}/samples/{TRAINED}.txt")
    assert result.stdout == logged  # nanoGPT's defaults reproduce what the run wrote at the end of training

    download(query.select("nanosweep", "m1"), tmp_path / "results")
    checkpoint = load_checkpoint(tmp_path / "results" / "nanoGPT_results_vijay_m1" / TRAINED / "ckpt.pt")
    _, vocab = load_run_model(trained["run_id"])
    settings = SampleSettings(prompt="ROMEO:", num_samples=3, max_new_tokens=25, temperature=1.2, top_k=5, seed=7)
    expected = format_samples(generate_texts(model_from_checkpoint(checkpoint), vocab, settings))
    args = ["--prompt", "ROMEO:", "--num-samples", "3", "--max-new-tokens", "25", "--temperature", "1.2"]
    result = runner.invoke(main, ["sample", "--name", trained["run_id"], *args, "--top-k", "5", "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected and result.stdout.startswith("ROMEO:")
    assert isinstance(vocab, Vocab) and vocab.size == 65


def test_sample_refuses_unknown_runs_runs_without_checkpoint_and_unknown_characters(trained):
    runner = CliRunner()
    result = runner.invoke(main, ["sample", "--name", "b1_L1_nope"])
    assert result.exit_code == 1 and "no finished run named 'b1_L1_nope'" in result.output
    result = runner.invoke(main, ["sample", "--name", tiny_config(seed=1).run_name])
    assert result.exit_code == 1 and "has no ckpt.pt or vocab.json artifact" in result.output
    result = runner.invoke(main, ["sample", "--name", TRAINED, "--prompt", "é"])
    assert result.exit_code == 1 and "not in the vocabulary" in result.output
