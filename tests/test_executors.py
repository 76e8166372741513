"""Placing trials: GPU slots over the parent's own GPUs, CPU thread shares, and a real process pool at work."""

import signal
import sys

import pytest

from nanosweep.memory import PROCESSES_PER_GPU_ENV
from nanosweep.study.executors.base import TrialLaunch
from nanosweep.study.executors.local import LocalProcessPool, plan_slots, visible_gpus


@pytest.mark.parametrize(
    ("workers", "gpus", "trials_per_gpu", "slots", "threads"),
    [
        (0, ["0", "1"], 1, ["0", "1"], 8),  # every slot
        (0, ["0", "1"], 3, ["0", "1", "0", "1", "0", "1"], 2),  # round-robin: GPU 1 is used before GPU 0 twice
        (2, ["0", "1"], 3, ["0", "1"], 8),  # two workers on two GPUs: one on each
        (3, ["0", "1"], 1, ["0", "1", "0"], 5),  # more workers than slots are honoured, not capped
        (4, ["0"], 1, ["0", "0", "0", "0"], 4),  # --workers 4 on one GPU: four processes share it
        (0, ["2", "3"], 2, ["2", "3", "2", "3"], 4),  # a parent restricted to GPUs 2 and 3 sends children there
        (0, ["GPU-8a1f", "MIG-77c0"], 1, ["GPU-8a1f", "MIG-77c0"], 8),  # UUIDs and MIG devices by their names
    ],
)
def test_gpu_slots_are_dealt_round_robin_over_the_parents_own_gpus(workers, gpus, trials_per_gpu, slots, threads):
    assert plan_slots(workers, gpus, trials_per_gpu, 16) == (slots, threads)


@pytest.mark.parametrize(
    ("environ", "count", "names"),
    [
        ({}, 2, ["0", "1"]),  # no restriction: CUDA's indices
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, 2, ["2", "3"]),  # the parent's cuda:0 is the machine's GPU 2
        ({"CUDA_VISIBLE_DEVICES": "GPU-8a1f, GPU-c2d4"}, 2, ["GPU-8a1f", "GPU-c2d4"]),
        ({"CUDA_VISIBLE_DEVICES": "MIG-77c0"}, 1, ["MIG-77c0"]),
        ({"CUDA_VISIBLE_DEVICES": "1,7,0"}, 1, ["1"]),  # CUDA stops at an entry that does not exist (7)
        ({"CUDA_VISIBLE_DEVICES": ""}, 0, []),  # GPUs hidden
    ],
)
def test_children_name_their_gpus_as_the_parent_sees_them(environ, count, names):
    assert visible_gpus(count, environ) == names


def test_cpu_runs_one_trial_by_default_and_splits_cores_between_workers():
    assert plan_slots(0, [], 1, 2) == ([None], 2)
    assert plan_slots(2, [], 1, 2) == ([None, None], 1)
    assert plan_slots(4, [], 1, 2) == ([None] * 4, 1)


def test_pool_runs_processes_with_their_gpu_its_sharers_and_thread_share_and_stops_them(tmp_path):
    pool = LocalProcessPool(["GPU-8a1f", None, "GPU-8a1f"], threads_per_trial=2)
    show = (
        "import os; e = os.environ; "
        f"print(e.get('CUDA_VISIBLE_DEVICES'), e.get('{PROCESSES_PER_GPU_ENV}'), e['OMP_NUM_THREADS'])"
    )
    pool.start(TrialLaunch(("a",), "a", [sys.executable, "-c", show], tmp_path / "a.log"))
    pool.start(TrialLaunch(("b",), "b", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "b.log"))
    assert [launch.name for launch in pool.running()] == ["a", "b"]
    exits = []
    while not exits:
        exits = pool.wait(timeout=10)
    assert [(e.launch.name, e.returncode) for e in exits] == [("a", 0)]
    assert (tmp_path / "a.log").read_text() == "GPU-8a1f 2 2\n"
    [stopped] = pool.stop(signal.SIGTERM, grace=5)
    assert (stopped.launch.name, stopped.returncode) == ("b", -signal.SIGTERM)
    assert pool.running() == []
