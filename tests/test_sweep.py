"""Real sweeps as subprocesses on a tiny grid: parent/child runs, resume after SIGKILL, workers, crashes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from conftest import TINY_MEMBER, heartbeat_stopped
from helpers import REPO, finish, study_runs, sweep, wait_for


def wait_until_started(proc: subprocess.Popen) -> None:
    """Read the sweep's output up to its first progress line: the store exists then (no creation race with it)."""
    while "grid points" not in (line := proc.stdout.readline()):
        assert line, "the sweep ended before it started"


def test_sweep_nests_tagged_children_under_one_parent_and_a_rerun_skips_them_all(store, sweeps_dir):
    code, output = finish(sweep(sweeps_dir))
    assert code == 0, output
    [parent] = study_runs("sweep")
    children = study_runs()
    assert parent.info.run_name == "sweep-tiny-full" and parent.info.status == "FINISHED"
    assert sorted(int(r.data.tags["grid_position"]) for r in children) == [1, 2, 3, 4]
    by_position = {int(r.data.tags["grid_position"]): r for r in children}
    assert by_position[1].info.run_name == "b32_L2_H2_E32_BS8_MI10_D0_s1"
    assert by_position[4].data.tags["global_id"] == "204"
    for run in children:
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tags["member"], tags["profile"], run.data.params["profile"]) == ("tiny", "full", "full")
        assert run.info.status == "FINISHED"
    assert "[4/4] done 4 | running 0 | skipped 0 | failed 0" in output

    code, output = finish(sweep(sweeps_dir))
    assert code == 0
    assert output.strip().endswith("sweep-tiny-full: nothing to run: every grid point is finished or running elsewhere")
    assert len(study_runs()) == 4 and len(study_runs("sweep")) == 1  # no empty parent for a sweep that did nothing

    code, output = finish(sweep(sweeps_dir, "--dry-run"))
    assert code == 0 and output.strip().endswith("4 skip")


def test_sigkill_of_the_whole_sweep_then_rerun_resumes_the_cut_off_run_from_its_checkpoint(store, sweeps_dir):
    (sweeps_dir / "tiny.yaml").write_text(TINY_MEMBER % (400, 50))  # the first point trains long enough to kill
    proc = sweep(sweeps_dir, start_new_session=True)  # its own process group, like a terminal job
    wait_until_started(proc)

    def cut_off_run():
        runs = [r for r in study_runs() if r.info.status == "RUNNING"]
        return next((r for r in runs if int(r.data.tags.get("nanosweep.checkpoint_iter", 0)) >= 50), None)

    victim = wait_for(cut_off_run)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: heartbeat_stopped(victim.info.run_id))  # a rerun takes it over once it is stale
    assert MlflowClient().get_run(victim.info.run_id).info.status == "RUNNING"  # nobody could end it
    [first_parent] = study_runs("sweep")

    code, output = finish(sweep(sweeps_dir, "--dry-run"))
    assert f"{victim.info.run_name:<40} resume  from iteration" in output

    code, output = finish(sweep(sweeps_dir))
    assert code == 0, output
    runs = study_runs()
    assert sorted(int(r.data.tags["grid_position"]) for r in runs) == [1, 2, 3, 4]  # each point exactly once
    assert all(r.info.status == "FINISHED" for r in runs)
    client = MlflowClient()
    resumed = client.get_run(victim.info.run_id)
    assert resumed.info.status == "FINISHED"
    killed_parent = client.get_run(first_parent.info.run_id)
    assert killed_parent.info.status == "KILLED"  # its process is gone: the rerun ends it
    [second_parent] = [r for r in study_runs("sweep") if r.info.run_id != first_parent.info.run_id]
    assert resumed.data.tags["mlflow.parentRunId"] == second_parent.info.run_id
    for key, every in (("iter_loss", 5), ("val_loss", 50)):
        steps = [m.step for m in client.get_metric_history(victim.info.run_id, key)]
        expected = list(range(0, 400, every)) + ([400] if key == "val_loss" else [])
        assert sorted(steps) == expected  # no gap and no duplicate across the kill
    log = [a.path for a in client.list_artifacts(victim.info.run_id, "logs")]
    fused_group = resumed.data.tags["fused_group"]  # the log of the process that trained it last
    assert log == [f"logs/{fused_group}.log"] and fused_group.startswith(second_parent.info.run_id[:8])
    trial_log = Path(client.download_artifacts(victim.info.run_id, log[0])).read_text()
    assert "FINISHED" in trial_log


def test_two_workers_on_a_new_sqlite_store_finish_without_lock_errors(store, sweeps_dir):
    code, output = finish(sweep(sweeps_dir, "--workers", "2"))
    assert code == 0, output
    assert "locked" not in output.lower()
    assert "2 at a time on CPU, 1 thread(s) per trial" in output
    assert sorted(r.info.status for r in study_runs()) == ["FINISHED"] * 4


def test_a_trial_that_dies_fails_alone_and_the_sweep_exits_non_zero_naming_it(store, sweeps_dir):
    (sweeps_dir / "tiny.yaml").write_text(TINY_MEMBER % (400, 50))
    proc = sweep(sweeps_dir, "--fuse", "1")  # a process per trial: a crash takes only its own run

    def first_trial_pid():
        runs = [r for r in study_runs() if r.data.tags.get("grid_position") == "1" and "nanosweep.pid" in r.data.tags]
        return runs[0] if runs else None

    victim = wait_for(first_trial_pid)
    os.kill(int(victim.data.tags["nanosweep.pid"]), signal.SIGKILL)  # what the out-of-memory killer does
    code, output = finish(proc)
    assert code == 1
    name = victim.info.run_name
    assert f"sweep-tiny-full: 1 trial(s) failed: {name}" in output
    statuses = {r.info.run_name: r.info.status for r in study_runs()}
    assert statuses.pop(name) == "FAILED" and set(statuses.values()) == {"FINISHED"} and len(statuses) == 3
    failed = MlflowClient().get_run(victim.info.run_id)
    assert failed.data.tags["nanosweep.end_reason"].startswith("trial process exited with -9")
    [parent] = study_runs("sweep")
    assert parent.info.status == "FAILED"


def test_bad_sweep_input_is_refused_before_anything_starts(store, sweeps_dir):
    code, output = finish(sweep(sweeps_dir, "--profile", "slow"))
    assert (code, output) == (1, "Error: profile='slow' is unknown: choose one of full, quick\n")
    argv = [sys.executable, "-m", "nanosweep", "sweep", "--member", "huge", "--sweeps-dir", str(sweeps_dir)]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == "Error: member='huge' is unknown: choose one of tiny or all\n"
    (sweeps_dir / "tiny.yaml").write_text(TINY_MEMBER.replace("n_embd: 32", "n_embd: 31") % (10, 10))
    code, output = finish(sweep(sweeps_dir))
    assert code == 1 and "grid point 1 {'max_iters': 10, 'dropout': 0.0}: n_embd=31 is not divisible" in output
    assert not study_runs() and not study_runs("sweep")


def test_mlflow_run_main_entry_point_makes_its_run_the_parent(store, sweeps_dir):
    env = {
        **os.environ,
        "NANOSWEEP_SWEEPS_DIR": str(sweeps_dir),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    mlflow_run = [
        str(Path(sys.executable).parent / "mlflow"),
        "run",
        str(REPO),
        "--env-manager",
        "local",
        "--experiment-name",
        "nanosweep",
        "-P",
        "member=tiny",
    ]
    subprocess.run(mlflow_run, check=True, env=env, capture_output=True, timeout=300)
    [parent] = study_runs("sweep")
    assert parent.data.params["member"] == "tiny" and parent.info.run_name == "sweep-tiny-full"
    children = study_runs()
    assert len(children) == 4 and {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}


def test_a_run_whose_heartbeat_stopped_is_taken_over_wherever_it_ran_and_a_fresh_one_is_left_alone(
    store, sweeps_dir
):
    (sweeps_dir / "tiny.yaml").write_text(TINY_MEMBER % (400, 50))
    frozen = sweep(sweeps_dir, start_new_session=True)
    wait_until_started(frozen)
    try:

        def with_a_checkpoint():
            runs = [r for r in study_runs() if r.info.status == "RUNNING"]
            return next((r for r in runs if int(r.data.tags.get("nanosweep.checkpoint_iter", 0)) >= 50), None)

        victim = wait_for(with_a_checkpoint)
        code, output = finish(sweep(sweeps_dir, "--dry-run"))  # its heartbeat is fresh: nobody touches it
        assert f"{victim.info.run_name:<40} busy    running on " in output and "heartbeat" in output

        # the machine freezes (or its network goes): the driver and the trial stop beating, and the run claims
        # to live on another machine, so only the heartbeat can tell it is gone
        os.killpg(frozen.pid, signal.SIGSTOP)
        client = MlflowClient()
        client.set_tag(victim.info.run_id, "nanosweep.host", "a-machine-that-died")
        wait_for(lambda: heartbeat_stopped(victim.info.run_id), timeout=60)

        code, output = finish(sweep(sweeps_dir))
        assert code == 0, output
    finally:
        os.killpg(frozen.pid, signal.SIGKILL)
        frozen.wait()
    runs = study_runs()
    assert sorted(int(r.data.tags["grid_position"]) for r in runs) == [1, 2, 3, 4]  # each point exactly once
    assert all(r.info.status == "FINISHED" for r in runs)
    resumed = client.get_run(victim.info.run_id)
    assert int(resumed.data.tags["nanosweep.resumed_from"]) >= 50
    assert [p.info.status for p in study_runs("sweep")].count("KILLED") == 1  # the frozen sweep's parent
