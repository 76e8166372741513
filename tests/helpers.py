"""Helpers that several test modules share (fixtures stay in conftest.py): the repository's paths, nanosweep
commands started as subprocesses and polled, the tiny search space, the claim race at a barrier, the known study
logged for the analysis, and a study folder in the study's format for import-results."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient

from conftest import tiny_config
from nanosweep.model import GPTConfig, init_weights
from nanosweep.tracking.claims import Claims
from study_fakes import log_known_run

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"

# ---- commands as subprocesses -------------------------------------------------------------------------------------

TRAIN = [
    *("--block-size", "32", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4"),
    *("--eval-iters", "2", "--gradient-accumulation-steps", "1", "--num-samples", "1", "--max-new-tokens", "20"),
]


def sweep(sweeps_dir: Path, *args: str, **popen) -> subprocess.Popen:
    """`nanosweep sweep --member tiny` on sweeps_dir, started; stdout and stderr together, as text."""
    argv = [sys.executable, "-m", "nanosweep", "sweep", "--member", "tiny", "--sweeps-dir", str(sweeps_dir), *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Wait for proc to end: its exit status and its output."""
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def study_runs(kind: str = "trial") -> list:
    """The runs of experiment nanosweep tagged run_kind=kind (none while the experiment does not exist)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("nanosweep")
    return client.search_runs([experiment.experiment_id], f"tags.run_kind = '{kind}'") if experiment else []


def wait_for(predicate, timeout: float = 300.0, every: float = 0.1):
    """predicate() polled every `every` s until it returns something true, which is returned; fails after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


# ---- the tiny search space ----------------------------------------------------------------------------------------

TINY_SPACE = """\
profile: full
objective: val_loss
fixed: {block_size: 32, n_layer: 2, n_embd: 32, batch_size: 8, eval_interval: %(every)s, eval_iters: 2,
        gradient_accumulation_steps: 1, log_interval: 5, warmup_iters: 10, num_samples: 1, max_new_tokens: 20,
        max_iters: %(iters)s}
params:
  n_head: {choices: [2, 4]}
  learning_rate: %(lr)s
"""
LR_RANGE = "{low: 1.0e-5, high: 1.0e-2, log: true}"
PATIENCE = 900  # seconds a search may take on a loaded machine (about a minute when the CPU is free)


def write_space(folder: Path, name: str = "tiny", iters: int = 40, every: int = 10, lr: str = LR_RANGE) -> Path:
    """The tiny search space written to folder/NAME.yaml: its path."""
    path = folder / f"{name}.yaml"
    path.write_text(TINY_SPACE % {"iters": iters, "every": every, "lr": lr})
    return path


# ---- claims taken together ----------------------------------------------------------------------------------------

TWO_POINTS = """\
member: tiny
global_id_offset: 200
fixed: {block_size: 32, n_layer: 2, n_head: 2, n_embd: 32, batch_size: 8, max_iters: 5}
grid:
  dropout: [0.0, 0.1]
overrides: {device: cpu, eval_interval: 5, eval_iters: 1, gradient_accumulation_steps: 1, log_interval: 5,
            warmup_iters: 2, num_samples: 1, max_new_tokens: 10}
"""
ROUNDS = 5


def _take_at_barrier(uri: str, experiment_id: str, driver: str, barrier, results) -> None:
    """One racer: every round, read the claims, wait for the others, take claim 1 of that round's point."""
    mlflow.set_tracking_uri(uri)
    for round in range(ROUNDS):
        try:
            claims = Claims()  # every racer read the claims before any took one: all try claim number 1
            barrier.wait(timeout=120)
            results.put((round, driver, claims.take(experiment_id, "full", f"hash{round}", driver)))
        except Exception as exc:
            results.put((round, driver, f"{type(exc).__name__}: {exc}"))


def claim_together(uri: str, experiment_id: str, racers: int) -> dict[int, dict[str, str]]:
    """racers processes take the same claim at once, ROUNDS times: round -> {driver: the winner it was told}."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(racers), context.Queue()
    procs = [
        context.Process(target=_take_at_barrier, args=(uri, experiment_id, f"d{i}", barrier, results))
        for i in range(racers)
    ]
    for proc in procs:
        proc.start()
    told: dict[int, dict[str, str]] = {}
    for _ in range(ROUNDS * racers):
        round, driver, winner = results.get(timeout=300)
        told.setdefault(round, {})[driver] = winner
    for proc in procs:
        proc.join(timeout=60)
    return told


def assert_one_winner_each_round(told: dict[int, dict[str, str]]) -> None:
    """Every round of claim_together has one winner, and every racer of the round was told that one."""
    assert sorted(told) == list(range(ROUNDS))
    for round in told.values():
        assert len(set(round.values())) == 1, round  # every racer names the same winner ...
        assert sum(driver == winner for driver, winner in round.items()) == 1, round  # ... and it is one of them


# ---- the known study (logged directly) ----------------------------------------------------------------------------

HEADER = "Experiment,Train Loss,Val Loss,Loss Gap,Total Params,Config Path"  # the study's results.csv
# two members x (n_embd 32/64) x (dropout 0.1/0.2): final (train, val) at step 20, hand-chosen
FINAL = {
    ("m1", 1): (2.0, 2.1),
    ("m1", 2): (2.2, 2.25),
    ("m1", 3): (1.7, 1.9),
    ("m1", 4): (1.8, 1.95),
    ("m2", 1): (1.9, 2.0),
    ("m2", 2): (2.05, 2.1),
    ("m2", 3): (1.6, 1.85),
    ("m2", 4): (1.72, 1.8),
}
LAYERS = {"m1": 2, "m2": 3}
PARAMS = {32: 30_000, 64: 110_000}


def config(member: str, position: int):
    """The tiny config of the known study's grid point `position` of member."""
    n_embd = 32 if position <= 2 else 64
    dropout = 0.1 if position % 2 else 0.2
    return tiny_config(n_layer=LAYERS[member], n_embd=n_embd, dropout=dropout, seed=position)


def evals(member: str, position: int) -> dict[int, tuple[float, float]]:
    """The known study's evaluations of that grid point: step -> (train loss, val loss)."""
    train, val = FINAL[member, position]
    history = {0: (4.2, 4.2), 10: (train + 0.3, val + 0.3), 20: (train, val)}
    if (member, position) == ("m1", 3):
        history[10] = (1.75, 1.8)  # validation bottoms out at step 10, then rises 0.1: overfitting
    return history


def log_study(experiment_id: str) -> dict[tuple[str, int], str]:
    """The eight runs, logged out of grid order (the analysis must sort them)."""
    run_ids = {}
    for member, position in [("m2", 3), ("m1", 4), ("m1", 1), ("m2", 1), ("m1", 3), ("m2", 4), ("m1", 2), ("m2", 2)]:
        cfg = config(member, position)
        global_id = position + (4 if member == "m2" else 0)
        run_ids[member, position] = log_known_run(
            experiment_id, member, position, global_id, cfg, evals(member, position), total_params=PARAMS[cfg.n_embd]
        )
    return run_ids


# ---- a study folder for import-results ----------------------------------------------------------------------------

# shallow_small's grid points 1-3: the study's names, numbers and (rounded) parameter counts
ROWS = [
    ("b64_L4_H4_E128_BS8_MI1000_D10_s1", 2.2018, 2.2313, 0.0295),
    ("b64_L4_H4_E128_BS8_MI1000_D20_s2", 2.2510, 2.2601, 0.0091),
    ("b64_L4_H4_E128_BS8_MI2000_D10_s3", 1.9101, 1.9702, 0.0601),
]


def nanogpt_checkpoint(path: Path, iter_num: int, best_val_loss: float) -> None:
    """A checkpoint as nanoGPT writes it (best_val_loss a 0-d tensor) for the study's L4/E128 model."""
    config = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.1)
    path.parent.mkdir(parents=True)
    torch.save(
        {
            "model": init_weights(config, seed=1),
            "model_args": config.to_model_args(),
            "iter_num": iter_num,
            "best_val_loss": torch.tensor(best_val_loss),
            "config": {"dataset": "shakespeare_char", "max_iters": 2000},
        },
        path,
    )


def study_folder(root: Path) -> Path:
    """nanoGPT_results_vijay_shallow_small with results.csv, checkpoints for points 1 and 3 (2 is missing), samples."""
    folder = root / "nanoGPT_results_vijay_shallow_small"
    (folder / "samples").mkdir(parents=True)
    lines = [HEADER] + [f"{n},{t},{v},{g},800000.0,/content/nanoGPT/{n}.py" for n, t, v, g in ROWS]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    nanogpt_checkpoint(folder / ROWS[0][0] / "ckpt.pt", 1000, 2.2313)
    nanogpt_checkpoint(folder / ROWS[2][0] / "ckpt.pt", 1800, 1.9650)  # the study's MI2000 runs stopped at 1800
    for name, *_ in ROWS:
        (folder / "samples" / f"{name}.txt").write_text(f"ROMEO: samples of {name}\n")
    (folder / "samples" / f"{ROWS[0][0]}0.txt").write_text("another run's file\n")  # a name prefix is not a match
    return folder
