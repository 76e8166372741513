"""The user's commands one after another, as real processes on a SQLite store: where a study lives, any run
by name, progress, and nothing half-done after a fault (issue 9)."""

import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from conftest import TINY_MEMBER, heartbeat_stopped
from helpers import REPO, wait_for
from nanosweep.tracking.run import TrackedRun
from nanosweep.tracking.store import ensure_experiment

BIN = Path(sys.executable).parent
ONE_LONG_POINT = """\
member: tiny
global_id_offset: 200
fixed: {block_size: 32, n_layer: 2, n_head: 2, n_embd: 32, batch_size: 8, dropout: 0.0}
grid:
  max_iters: [%s]
overrides: {eval_interval: %s, eval_iters: 2, gradient_accumulation_steps: 1, log_interval: %s, warmup_iters: 10,
            num_samples: 1, max_new_tokens: 20}
"""
TRAIN_ARGS = [
    *("--block-size", "32", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4"),
    *("--max-iters", "10", "--eval-interval", "5", "--eval-iters", "2", "--gradient-accumulation-steps", "1"),
    *("--num-samples", "1", "--max-new-tokens", "20", "--seed", "7"),
]


def nanosweep(env: dict, *args: str, **popen) -> subprocess.Popen:
    argv = [sys.executable, "-m", "nanosweep", *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def done(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_while_running(proc: subprocess.Popen, predicate, timeout: float = 300.0):
    """wait_for(predicate), refused at once with the process's output when the process ends first."""

    def check():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended with {proc.returncode} first:\n{out}{err}")
        return predicate()

    return wait_for(check, timeout=timeout, every=0.5)


def all_runs(kind: str | None = None) -> list:
    """Every run of every experiment (optionally of one run_kind)."""
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, f"tags.run_kind = '{kind}'" if kind else "", max_results=1000)


def checkpoint_file(run_id: str) -> Path:
    return Path(urlparse(MlflowClient().get_run(run_id).info.artifact_uri).path) / "ckpt.pt"


def test_the_users_commands_without_flags_find_the_study_and_duplicate_nothing(user_env):
    # mlflow run without --experiment-name: the parent and its trials land in Default
    mlflow_run = [str(BIN / "mlflow"), "run", str(REPO), "--env-manager", "local", "-P", "member=tiny"]
    subprocess.run(mlflow_run, check=True, env=user_env, capture_output=True, timeout=300)
    trials = all_runs("trial")
    default = MlflowClient().get_experiment_by_name("Default").experiment_id
    assert len(trials) == 4 and {r.info.experiment_id for r in trials} == {default}
    assert {r.info.status for r in trials} == {"FINISHED"}

    code, out, err = done(nanosweep(user_env, "analyze", "--member", "tiny"))
    assert code == 0, err
    assert "b32_L2_H2_E32_BS8_MI10_D0_s1" in out

    code, out, err = done(nanosweep(user_env, "sweep", "--member", "tiny"))
    assert code == 0, err
    assert "nothing to run" in err
    assert len(all_runs("trial")) == 4  # nothing trained again, in no experiment

    code, out, err = done(nanosweep(user_env, "train", *TRAIN_ARGS))
    assert code == 0, err
    # not a terminal: plain progress lines (a trial's log file reads the same)
    assert "b32_L2_H2_E32_BS4_MI10_D10_s7 iter 10/10 (100%) | loss " in err and "tok/s | ETA" in err
    [train_run] = all_runs("train")
    assert train_run.info.run_name == "b32_L2_H2_E32_BS4_MI10_D10_s7"
    # the MLflow UI's compare view preselects the first metric the runs share: val_loss comes first
    assert next(iter(MlflowClient().get_run(train_run.info.run_id).data.metrics)) == "val_loss"

    sample = ("--num-samples", "1", "--max-new-tokens", "10")
    for name in ("b32_L2_H2_E32_BS8_MI10_D0_s1", "b32_L2_H2_E32_BS4_MI10_D10_s7"):
        code, out, err = done(nanosweep(user_env, "sample", "--name", name, *sample))
        assert code == 0, err
        assert f"# {name} (run " in err and out.strip()

    code, out, err = done(nanosweep(user_env, "analyze", "--member", "tiny", "--experiment", "nanosweep"))
    assert code == 1
    assert "experiment 'nanosweep' holds no finished trial or imported runs" in err  # named: only there


def test_new_runs_go_where_the_member_is_and_a_member_spread_over_two_experiments_is_named(user_env):
    member_file = Path(user_env["NANOSWEEP_SWEEPS_DIR"]) / "tiny.yaml"
    code, _, err = done(nanosweep(user_env, "sweep", "--member", "tiny", "--experiment", "first"))
    assert code == 0, err
    member_file.write_text(TINY_MEMBER % (15, 10))  # two new grid points, two already finished
    code, _, err = done(nanosweep(user_env, "sweep", "--member", "tiny"))
    assert code == 0, err
    first = MlflowClient().get_experiment_by_name("first").experiment_id
    trials = all_runs("trial")
    assert len(trials) == 6 and {r.info.experiment_id for r in trials} == {first}

    member_file.write_text(ONE_LONG_POINT % ("10, 20", 10, 5))  # two points of the same member
    code, _, err = done(nanosweep(user_env, "sweep", "--member", "tiny", "--experiment", "second"))
    assert code == 0, err  # named: only 'second' is looked at, so the point trains there too

    code, _, err = done(nanosweep(user_env, "analyze", "--member", "tiny"))
    assert (code, err.strip().splitlines()) == (
        1,
        ["Error: member 'tiny' (full) has runs in experiments 'first', 'second': choose one with --experiment NAME "
         "(or MLFLOW_EXPERIMENT_NAME)"],
    )  # fmt: skip
    code, _, err = done(nanosweep(user_env, "analyze", "--member", "tiny", "--experiment", "second"))
    assert code == 0, err


def test_a_cut_off_run_with_an_unreadable_checkpoint_ends_failed_and_the_point_trains_in_a_new_run(user_env):
    (Path(user_env["NANOSWEEP_SWEEPS_DIR"]) / "tiny.yaml").write_text(ONE_LONG_POINT % (300, 50, 5))
    proc = nanosweep(user_env, "sweep", "--member", "tiny", start_new_session=True)
    victim = wait_while_running(
        proc, lambda: next((r for r in all_runs("trial") if "nanosweep.checkpoint_iter" in r.data.tags), None)
    )
    os.killpg(proc.pid, signal.SIGKILL)  # cut off: the run stays RUNNING with its checkpoint
    proc.communicate()
    wait_for(lambda: heartbeat_stopped(victim.info.run_id))  # until then a rerun leaves it alone
    ckpt = checkpoint_file(victim.info.run_id)
    wait_for(lambda: ckpt.is_file())
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a truncated upload

    code, _, err = done(nanosweep(user_env, "sweep", "--member", "tiny"))
    assert code == 0, err
    assert "cannot be read" in err and "training the grid point in a new run" in err
    client = MlflowClient()
    old = client.get_run(victim.info.run_id)
    assert old.info.status == "FAILED"
    assert old.data.tags["nanosweep.end_reason"].startswith(f"CheckpointUnreadable: ckpt.pt of run {old.info.run_id}")
    [new] = [r for r in all_runs("trial") if r.info.run_id != old.info.run_id]
    assert new.info.status == "FINISHED" and new.info.run_name == old.info.run_name
    steps = sorted(m.step for m in client.get_metric_history(new.info.run_id, "val_loss"))
    assert steps == list(range(0, 301, 50))  # one training from iteration 0, not two mixed
    assert not [r for r in all_runs() if r.info.status == "RUNNING"]


def test_ctrl_c_to_the_sweeps_process_group_leaves_no_run_running_and_keeps_the_checkpoints(user_env):
    (Path(user_env["NANOSWEEP_SWEEPS_DIR"]) / "tiny.yaml").write_text(TINY_MEMBER % (400, 50))
    proc = nanosweep(user_env, "sweep", "--member", "tiny", "--workers", "2", start_new_session=True)
    wait_while_running(proc, lambda: any("nanosweep.checkpoint_iter" in r.data.tags for r in all_runs("trial")))
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends: the sweep and every trial at once
    code, _, err = done(proc, timeout=120)
    assert code == 130, err
    runs = all_runs()
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    [parent] = all_runs("sweep")
    assert parent.info.status == "KILLED"
    interrupted = [r for r in all_runs("trial") if r.info.status == "KILLED"]
    assert interrupted and all(r.data.tags["nanosweep.end_reason"] == "interrupted by SIGINT" for r in interrupted)
    for run in interrupted:
        if "nanosweep.checkpoint_iter" in run.data.tags:
            assert checkpoint_file(run.info.run_id).is_file()  # nothing lost: a rerun resumes from here
    code, _, err = done(nanosweep(user_env, "sweep", "--member", "tiny", "--dry-run"))
    assert code == 0 and "resume" in err


def test_a_run_whose_final_flush_or_upload_fails_ends_failed_never_finished(store, tmp_path):
    client = MlflowClient()
    experiment_id = ensure_experiment("nanosweep")
    run = TrackedRun.create(experiment_id, "refused-metric", {})
    run.log_metrics({"val_loss": 2.0, "k" * 300: 1.0}, step=0)  # MLflow refuses keys over 250 characters
    with pytest.raises(MlflowException):
        run.finish("FINISHED")
    refused = client.get_run(run.run_id)
    assert refused.info.status == "FAILED"
    assert refused.data.tags["nanosweep.end_reason"].startswith("final metric flush or upload failed: MlflowException")

    run = TrackedRun.create(experiment_id, "refused-upload", {})
    artifacts = Path(urlparse(run.info().info.artifact_uri).path)
    artifacts.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_text("a file where the artifact folder should be")  # the upload's destination is unusable
    run.log_checkpoint({"iter_num": 10, "model": {}})
    with pytest.raises(OSError):
        run.finish("FINISHED")
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert not [r for r in client.search_runs([experiment_id]) if r.info.status == "RUNNING"]


def test_metrics_of_a_running_trial_reach_the_store_before_its_first_checkpoint(user_env):
    # the first checkpoint comes at iteration 100000; 500 buffered points would take 8000 iterations
    (Path(user_env["NANOSWEEP_SWEEPS_DIR"]) / "tiny.yaml").write_text(ONE_LONG_POINT % (100000, 100000, 50))
    proc = nanosweep(user_env, "sweep", "--member", "tiny", start_new_session=True)
    try:
        client = MlflowClient()

        def live_metrics():
            runs = [r for r in all_runs("trial") if r.info.status == "RUNNING"]
            return next((r for r in runs if {"val_loss", "iter_loss"} <= set(r.data.metrics)), None)

        run = wait_while_running(proc, live_metrics, timeout=120)
        assert "nanosweep.checkpoint_iter" not in run.data.tags
        # seconds after training began, not once 500 points had piled up (about iteration 8300 here)
        assert max(m.step for m in client.get_metric_history(run.info.run_id, "iter_loss")) < 5000
        assert not [a for a in client.list_artifacts(run.info.run_id) if a.path == "ckpt.pt"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=120)
    assert not [r for r in all_runs() if r.info.status == "RUNNING"]


def test_train_on_a_terminal_shows_a_progress_bar(user_env):
    primary, replica = pty.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal window's size
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanosweep", "train", *TRAIN_ARGS],
        stdout=subprocess.DEVNULL,
        stderr=replica,
        env=user_env,
    )
    os.close(replica)
    output = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=60) == 0
    os.close(primary)
    text = output.decode(errors="replace")
    assert "10/10" in text and "100%|" in text  # tqdm's bar, redrawn in place
    assert "val " in text and "tok/s" in text and "loss " in text
