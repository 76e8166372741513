"""Adaptive search against the grid: TPE with ASHA, random without pruning, and the full grid of the same space.

Each arm is `nanosweep search` as a user runs it, into its own fresh SQLite store under bench/out/search/,
on the dimensions of shallow_small at width 128 (block 64, 4 layers, n_embd 128; heads, batch, length,
dropout: 16 configurations) with the quick profile. Reported per arm: trials, pruned, total trained
iterations, iterations weighted by each configuration's cost per iteration, best final validation loss, wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna

SPACE = """\
profile: quick
objective: val_loss
fixed: {block_size: 64, n_layer: 4, n_embd: 128}
params:
  n_head: {choices: [4, 8]}
  batch_size: {choices: [8, 16]}
  max_iters: {choices: [1000, 2000]}
  dropout: {choices: [0.1, 0.2]}
"""
ARMS = {
    "grid": ["--sampler", "grid", "--pruner", "none", "--trials", "16"],
    "tpe_asha": ["--sampler", "tpe", "--pruner", "asha"],
    "random": ["--sampler", "random", "--pruner", "none"],
}


def cost(params: dict) -> float:
    """Relative cost of one iteration: its batch size (batch 8 = 1; the heads barely change the cost)."""
    return params["batch_size"] / 8


def run_arm(name: str, extra: list[str], trials: int, seed: int, out: Path) -> dict:
    folder = out.resolve() / name
    folder.mkdir(parents=True, exist_ok=False)
    space = folder / "shallow_small_space.yaml"
    space.write_text(SPACE)
    args = extra if name == "grid" else [*extra, "--trials", str(trials)]
    argv = [sys.executable, "-m", "nanosweep", "search", "--space", str(space), "--sampler-seed", str(seed), *args]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    started = time.monotonic()
    with open(folder / "search.log", "w") as log:
        subprocess.run(argv, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    seconds = time.monotonic() - started
    study = optuna.load_study(study_name=space.stem, storage=f"sqlite:///{folder / 'optuna.db'}")
    trials = [t for t in study.trials if "run_id" in t.user_attrs]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {
        "arm": name,
        "trials": len(trials),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        "iterations": sum(t.user_attrs["iterations"] for t in trials),
        "weighted": sum(t.user_attrs["iterations"] * cost(t.params) for t in trials),
        "best": min(t.value for t in complete),
        "best_params": min(complete, key=lambda t: t.value).params,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials of the tpe_asha and random arms")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "search")
    opts = parser.parse_args()
    results = [run_arm(a, ARMS[a], opts.trials, opts.seed, opts.out) for a in opts.arms.split(",")]
    grid = next((r for r in results if r["arm"] == "grid"), None)
    print("| arm | trials | pruned | trained iterations | cost-weighted iterations | best val_loss | wall |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        share = f" ({r['weighted'] / grid['weighted']:.0%} of grid)" if grid else ""
        print(
            f"| {r['arm']} | {r['trials']} | {r['pruned']} | {r['iterations']} | {r['weighted']:.0f}{share} | "
            f"{r['best']:.4f} | {r['seconds'] / 60:.1f} min |"
        )
    for r in results:
        print(f"{r['arm']} best: {r['best_params']}")


if __name__ == "__main__":
    main()
