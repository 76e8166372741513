"""SIGTERM and Ctrl-C at every moment a command holds a run: no run is left RUNNING, nothing is left behind (issue
17). Each window is reached by waiting for its run (or file) to appear in the store, then signalling at once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow import MlflowClient

from conftest import TINY_MEMBER
from helpers import SWEEPS, TRAIN, log_study, study_folder, write_space
from nanosweep.filelocks import OwnedFolder
from nanosweep.signals import Interrupted, stop_signals
from nanosweep.tracking.store import ensure_experiment


def nanosweep(env: dict, *args: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "nanosweep", *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def all_runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def the_moment(proc: subprocess.Popen, found, timeout: float = 300):
    """found() polled as fast as the store answers, until it returns something; the process must still run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the process ended first, with {proc.returncode}:\n{proc.communicate()[0]}")
    raise AssertionError(f"nothing appeared within {timeout} s")


def run_appears(proc: subprocess.Popen, kind: str):
    return the_moment(proc, lambda: next((r for r in all_runs() if r.data.tags.get("run_kind") == kind), None))


def stopped(proc: subprocess.Popen) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output


def assert_none_running() -> None:
    assert not [(r.info.run_name, r.data.tags.get("run_kind")) for r in all_runs() if r.info.status == "RUNNING"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_right_after_train_creates_its_run_ends_it_killed(user_env, signum):
    proc = nanosweep(user_env, "train", *TRAIN, "--max-iters", "100000")
    run = run_appears(proc, "train")
    proc.send_signal(signum)
    code, output = stopped(proc)
    name = signal.Signals(signum).name
    assert_none_running()
    ended = MlflowClient().get_run(run.info.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["nanosweep.end_reason"] == f"interrupted by {name}"
    assert code == 130 and f"train interrupted ({name}): run ended KILLED" in output, output


@pytest.mark.parametrize("kind", ["sweep", "search"])
def test_sigterm_right_after_a_driver_creates_its_parent_run_ends_it_killed(user_env, tmp_path, kind):
    args = ["--member", "tiny"] if kind == "sweep" else ["--space", str(write_space(tmp_path)), "--trials", "1"]
    proc = nanosweep(user_env, kind, *args)
    parent = run_appears(proc, kind)
    proc.send_signal(signal.SIGTERM)
    code, output = stopped(proc)
    assert_none_running()
    assert MlflowClient().get_run(parent.info.run_id).info.status == "KILLED"
    assert code == 130, output


def test_sigterm_while_a_sweep_writes_its_summary_leaves_its_parent_ended(user_env):
    (Path(user_env["NANOSWEEP_SWEEPS_DIR"]) / "tiny.yaml").write_text(TINY_MEMBER.replace("[%s, 20]", "[%s]") % (5, 5))
    proc = nanosweep(user_env, "sweep", "--member", "tiny")
    parent = run_appears(proc, "sweep")
    summary = Path(urlparse(parent.info.artifact_uri).path) / "summary.txt"
    the_moment(proc, summary.exists)  # the trials are done; the parent's metrics and its end come next
    proc.send_signal(signal.SIGTERM)
    code, output = stopped(proc)
    assert_none_running()
    assert MlflowClient().get_run(parent.info.run_id).info.status in ("FINISHED", "KILLED")
    assert code in (0, 130), output  # the signal came at the summary, or once the parent was ending


def test_sigterm_while_analyze_logs_its_run_ends_it_killed_or_whole_and_half_writes_nothing(user_env, tmp_path):
    log_study(ensure_experiment("nanosweep"))
    out = tmp_path / "results"
    proc = nanosweep(user_env, "analyze", "--member", "m1", "--out", str(out))
    run = run_appears(proc, "analysis")
    proc.send_signal(signal.SIGTERM)  # the run logs its files for some tens of ms: the signal may come at their end
    code, output = stopped(proc)
    assert_none_running()
    ended = MlflowClient().get_run(run.info.run_id)
    logged = [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "analysis-m1")]
    assert ended.info.status == "KILLED" or (ended.info.status == "FINISHED" and "analysis-m1/report.html" in logged)
    published = sorted(p.name for p in out.iterdir())
    if code == 130:  # the signal came before the analysis was published: no staging folder, nothing half-published
        assert published == [] and "analyze interrupted (SIGTERM): nothing was written to --out" in output, output
    else:  # it came once everything was done
        assert (code, ended.info.status, published) == (0, "FINISHED", ["analysis-m1", "nanoGPT_results_vijay_m1"])


def test_sigterm_during_import_results_ends_the_run_being_imported_killed(user_env, tmp_path):
    folder = study_folder(tmp_path)
    proc = nanosweep(user_env, "import-results", str(folder), "--sweeps-dir", str(SWEEPS))
    run_appears(proc, "imported")
    proc.send_signal(signal.SIGTERM)
    code, output = stopped(proc)
    assert_none_running()
    assert {r.info.status for r in all_runs()} <= {"FINISHED", "KILLED"}
    assert code == 130 and "the runs imported so far stay; rerun to import the rest" in output, output


class SignalledWhileCollected:
    """An object whose __del__ (run by the garbage collector, where Python discards exceptions) receives SIGTERM."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs between these bytecodes, inside __del__
            time.sleep(0.001)


def test_a_stop_signal_that_lands_where_python_discards_exceptions_still_stops_the_command():
    with pytest.raises(Interrupted, match="SIGTERM"), stop_signals.installed():
        SignalledWhileCollected()  # collected at once
        for _ in range(1000):
            time.sleep(0.001)  # the stop comes here at the latest


def test_a_resumed_run_that_finishes_keeps_no_end_reason_of_its_earlier_process(user_env):
    args = [*TRAIN, "--max-iters", "60", "--eval-interval", "20"]
    proc = nanosweep(user_env, "train", *args)
    run = the_moment(
        proc, lambda: next((r for r in all_runs() if "nanosweep.checkpoint_iter" in r.data.tags), None)
    )
    proc.send_signal(signal.SIGTERM)
    assert stopped(proc)[0] == 130
    killed = MlflowClient().get_run(run.info.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["nanosweep.end_reason"] == "interrupted by SIGTERM"
    code, output = stopped(nanosweep(user_env, "train", *args, "--run-id", run.info.run_id))
    assert code == 0, output
    resumed = MlflowClient().get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED" and "nanosweep.end_reason" not in resumed.data.tags


def test_a_staging_folder_that_a_killed_analysis_left_goes_with_the_next_analysis(user_env, tmp_path):
    log_study(ensure_experiment("nanosweep"))
    out = tmp_path / "results"
    proc = nanosweep(user_env, "analyze", "--member", "m1", "--out", str(out))
    # writing its files into the staging folder: killed then, before a slow machine's analysis publishes them
    the_moment(proc, lambda: out.is_dir() and any(p.name.startswith(".analysis-") for p in out.iterdir()))
    proc.kill()
    proc.communicate()
    assert [p.name for p in out.iterdir() if p.name.startswith(".analysis-")]  # SIGKILL: nobody could remove it
    code, output = stopped(nanosweep(user_env, "analyze", "--member", "m1", "--out", str(out), "--no-log-run"))
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == ["analysis-m1", "nanoGPT_results_vijay_m1"]


def test_scratch_folders_of_a_killed_trial_go_with_the_next_trial(user_env, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**user_env, "TMPDIR": str(scratch)}
    proc = nanosweep(env, "train", *TRAIN, "--max-iters", "100000", "--eval-interval", "5")
    the_moment(proc, lambda: any("nanosweep.checkpoint_iter" in r.data.tags for r in all_runs()))
    proc.kill()
    proc.communicate()
    left = sorted(p.name for p in scratch.iterdir() if p.name.startswith("nanosweep-"))
    assert left  # its checkpoints' folder: SIGKILL left it
    code, output = stopped(nanosweep(env, "train", *TRAIN, "--max-iters", "10", "--eval-interval", "5"))
    assert code == 0, output
    assert not [p for p in scratch.iterdir() if p.name in left]


def test_an_owned_folder_goes_once_its_owner_is_dead_and_never_while_it_lives(tmp_path):
    mine = OwnedFolder("work-", tmp_path)  # this process lives on
    make = "import sys, os; from nanosweep.filelocks import OwnedFolder; f = OwnedFolder('work-', sys.argv[1]); "
    abandoned = subprocess.run(
        [sys.executable, "-c", make + "print(f.path, flush=True); os.kill(os.getpid(), 9)", str(tmp_path)],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(abandoned).is_dir()  # SIGKILL: its owner never removed it
    later = subprocess.run(
        [sys.executable, "-c", make + "print(f.path); f.remove()", str(tmp_path)], capture_output=True, text=True
    )
    assert later.returncode == 0, later.stderr
    assert not Path(abandoned).exists() and not Path(later.stdout.strip()).exists()
    assert mine.path.is_dir()  # its owner lives: left alone
    mine.remove()
    assert not mine.path.exists()
