"""The tiny grid swept on the server with two workers, then analysed, downloaded and sampled through it."""

from __future__ import annotations

import csv

import pytest

from nanosweep.checkpoint import load_checkpoint, model_from_checkpoint
from nanosweep.data import PreparedData
from nanosweep.sampling import SampleSettings, generate_texts

from .server_checks import missing_or_doubled

pytestmark = pytest.mark.server

NAMES = [  # the study's naming, in grid order (seed = grid position)
    "b32_L2_H2_E32_BS4_MI20_D0_s1",
    "b32_L2_H2_E32_BS4_MI20_D10_s2",
    "b32_L2_H2_E32_BS4_MI40_D0_s3",
    "b32_L2_H2_E32_BS4_MI40_D10_s4",
]


def test_sweep_nests_every_grid_point_under_one_parent(server, tiny_sweep) -> None:
    client = server.client()
    parent = tiny_sweep.parent
    assert parent.data.tags["run_kind"] == "sweep" and parent.info.status == "FINISHED"
    assert [r.info.run_name for r in tiny_sweep.children] == NAMES
    for position, run in enumerate(tiny_sweep.children, start=1):
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tags["member"], tags["grid_position"], tags["global_id"]) == ("tiny", str(position), str(position))
        assert tags["run_kind"] == "trial" and tags["config_hash"]
        assert run.info.status == "FINISHED"
        assert missing_or_doubled(client, run) == {}, run.info.run_name
    first, second = tiny_sweep.children[:2]
    assert second.info.start_time < first.info.end_time, "two workers: the first two points train together"


def test_artifacts_are_proxied_by_the_server(server, tiny_sweep) -> None:
    client = server.client()
    for run in tiny_sweep.children:
        # mlflow-artifacts: URIs go through the server; the client never sees the store behind it
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"ckpt.pt", "vocab.json", "loss_curve.png", f"{run.info.run_name}.py"} <= names


def test_rerun_skips_every_finished_point(server, tiny_sweep) -> None:
    done = server.cli(
        "sweep", "--member", "tiny", "--sweeps-dir", str(tiny_sweep.sweeps_dir), "--workers", "2",
        "--experiment", tiny_sweep.experiment_name,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout
    client = server.client()
    for run in tiny_sweep.children:
        again = client.get_run(run.info.run_id)
        assert again.info.end_time == run.info.end_time, f"{run.info.run_name} was trained again"


def test_analyze_writes_the_study_results_csv(server, tiny_sweep, tmp_path) -> None:
    out = tmp_path / "analysis"
    done = server.cli("analyze", "--member", "tiny", "--out", str(out), "--experiment", tiny_sweep.experiment_name)
    assert done.returncode == 0, done.stdout
    [results] = out.rglob("results.csv")
    rows = list(csv.reader(results.open()))
    assert rows[0] == ["Experiment", "Train Loss", "Val Loss", "Loss Gap", "Total Params", "Config Path"]
    assert [row[0] for row in rows[1:]] == NAMES
    for row, run in zip(rows[1:], tiny_sweep.children):
        assert float(row[2]) == pytest.approx(run.data.metrics["val_loss"], abs=5e-5)


def test_download_fetches_every_checkpoint_through_the_server(server, tiny_sweep, tmp_path) -> None:
    out = tmp_path / "results"
    done = server.cli("download", "--member", "tiny", "--out", str(out), "--experiment", tiny_sweep.experiment_name)
    assert done.returncode == 0, done.stdout
    checkpoints = {path.parent.name: path for path in out.rglob("ckpt.pt")}
    assert sorted(checkpoints) == NAMES
    for run in tiny_sweep.children:
        ckpt = load_checkpoint(checkpoints[run.info.run_name])  # weights_only=True
        assert ckpt["iter_num"] == int(run.data.params["max_iters"])
        assert ckpt["config"]["seed"] == int(run.data.tags["grid_position"])


def test_sample_from_a_downloaded_checkpoint(server, tiny_sweep, tmp_path, prepared: PreparedData) -> None:
    run = tiny_sweep.children[-1]
    local = server.client().download_artifacts(run.info.run_id, "ckpt.pt", str(tmp_path))
    model = model_from_checkpoint(load_checkpoint(local))
    [text] = generate_texts(model, prepared.vocab(), SampleSettings(prompt="ROMEO:", num_samples=1, max_new_tokens=30))
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30


def test_sample_command_reads_the_checkpoint_through_the_server(server, tiny_sweep) -> None:
    run = tiny_sweep.children[-1]
    args = ["--name", run.info.run_id, "--prompt", "ROMEO:", "--num-samples", "2", "--max-new-tokens", "30"]
    done = server.cli("sample", *args, "--experiment", tiny_sweep.experiment_name)
    assert done.returncode == 0, done.stdout
    assert done.stdout.count("ROMEO:") >= 2, done.stdout
