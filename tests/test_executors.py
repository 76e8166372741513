"""Placing trials: GPU slots, CPU thread shares, and a real process pool's start/wait/stop."""

import signal
import sys

from nanosweep.executors import LocalProcessPool, TrialLaunch, plan_slots


def test_gpu_slots_pack_trials_per_gpu_and_workers_cap_them():
    assert plan_slots(0, [0, 1], 1, 16) == (["0", "1"], 8)
    assert plan_slots(0, [0, 1], 3, 16) == (["0", "0", "0", "1", "1", "1"], 2)
    assert plan_slots(2, [0, 1], 3, 16) == (["0", "0"], 8)


def test_cpu_runs_one_trial_by_default_and_splits_cores_between_workers():
    assert plan_slots(0, [], 1, 2) == ([None], 2)
    assert plan_slots(2, [], 1, 2) == ([None, None], 1)
    assert plan_slots(4, [], 1, 2) == ([None] * 4, 1)


def test_pool_runs_processes_with_their_gpu_and_thread_share_and_stops_them(tmp_path):
    pool = LocalProcessPool(["3", None], threads_per_trial=2)
    show = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'), os.environ['OMP_NUM_THREADS'])"
    pool.start(TrialLaunch(("a",), "a", [sys.executable, "-c", show], tmp_path / "a.log"))
    pool.start(TrialLaunch(("b",), "b", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "b.log"))
    assert [launch.name for launch in pool.running()] == ["a", "b"]
    exits = []
    while not exits:
        exits = pool.wait(timeout=10)
    assert [(e.launch.name, e.returncode) for e in exits] == [("a", 0)]
    assert (tmp_path / "a.log").read_text() == "3 2\n"
    [stopped] = pool.stop(signal.SIGTERM, grace=5)
    assert (stopped.launch.name, stopped.returncode) == ("b", -signal.SIGTERM)
    assert pool.running() == []
