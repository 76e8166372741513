"""Adaptive search against the grid: TPE with ASHA, random without pruning, and the full grid of the same space.

Each arm is `nanosweep search` as a user runs it, into its own fresh SQLite store under --out, with the quick
profile, on one of two spaces of 16 configurations (--space):
  width_length  shallow_small at width 128 (block 64, 4 layers, n_embd 128); heads, batch, length, dropout
  lr_batch      the same model at the longer length; peak learning rate (4 values), batch, dropout
Reported per arm: trials, pruned, total trained iterations, iterations weighted by each configuration's cost per
iteration, best final validation loss, wall time.

--ray runs the same arms with `--executor ray` on a two-node Ray cluster started here on loopback (one CPU per
node), logging to the tracking server and the Optuna database that MLFLOW_TRACKING_URI and
NANOSWEEP_OPTUNA_STORAGE name (eval "$(bash scripts/tracking-stack.sh env)"), and prints both tables and the
trial-by-trial comparison of proposals and results.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna

MODEL = "block_size: 64, n_layer: 4, n_embd: 128"
SPACES = {
    "width_length": f"""\
profile: quick
objective: val_loss
fixed: {{{MODEL}}}
params:
  n_head: {{choices: [4, 8]}}
  batch_size: {{choices: [8, 16]}}
  max_iters: {{choices: [1000, 2000]}}
  dropout: {{choices: [0.1, 0.2]}}
""",
    # length is a budget, not a hyperparameter: fixed here (100 iterations in quick, out of warmup after 10), so
    # the search is about what changes the loss at equal length, and ASHA can stop the bad learning rates early
    "lr_batch": f"""\
profile: quick
objective: val_loss
fixed: {{{MODEL}, n_head: 4, max_iters: 2000, warmup_iters: 200}}
params:
  learning_rate: {{choices: [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3]}}
  batch_size: {{choices: [8, 16]}}
  dropout: {{choices: [0.0, 0.2]}}
""",
}
ARMS = {
    "grid": ["--sampler", "grid", "--pruner", "none", "--trials", "16"],
    "tpe_asha": ["--sampler", "tpe", "--pruner", "asha"],
    "random": ["--sampler", "random", "--pruner", "none"],
}
LOOPBACK_ONLY = {  # as in the tests: Ray's nodes on 127.0.0.1, its start-up probes to a closed loopback port
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    **{proxy: "http://127.0.0.1:9" for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    **{no_proxy: "127.0.0.1,localhost,::1" for no_proxy in ("NO_PROXY", "no_proxy")},
}


def cost(params: dict) -> float:
    """Relative cost of one iteration: its batch size (batch 8 = 1; the heads barely change the cost)."""
    return params["batch_size"] / 8


def run_arm(name: str, space_name: str, trials: int, seed: int, out: Path, ray_address: str | None) -> dict:
    """One arm as a user runs it; on Ray, into the server's experiment and Optuna database of the environment."""
    folder = out.resolve() / name
    folder.mkdir(parents=True, exist_ok=False)
    # the study is named after the file: on a shared database, a name of its own
    stem = f"{space_name}_{name}_{uuid.uuid4().hex[:6]}" if ray_address else f"{space_name}_space"
    space = folder / f"{stem}.yaml"
    space.write_text(SPACES[space_name])
    args = ARMS[name] if name == "grid" else [*ARMS[name], "--trials", str(trials)]
    argv = [sys.executable, "-m", "nanosweep", "search", "--space", str(space), "--sampler-seed", str(seed), *args]
    if ray_address:
        argv += ["--executor", "ray", "--ray-address", ray_address, "--experiment", f"bench-search-{stem}"]
        env, storage = {**os.environ, **LOOPBACK_ONLY}, os.environ["NANOSWEEP_OPTUNA_STORAGE"]
    else:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
        env.pop("NANOSWEEP_OPTUNA_STORAGE", None)  # optuna.db beside the store
        storage = f"sqlite:///{folder / 'optuna.db'}"
    started = time.monotonic()
    with open(folder / "search.log", "w") as log:
        subprocess.run(argv, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    seconds = time.monotonic() - started
    study = optuna.load_study(study_name=stem, storage=storage)
    trials = sorted((t for t in study.trials if "run_id" in t.user_attrs), key=lambda t: t.number)
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
        "sequence": [(t.params, t.state.name, t.value) for t in trials],  # proposals and outcomes, in order
    }


def print_table(title: str, results: list[dict]) -> None:
    grid = next((r for r in results if r["arm"] == "grid"), None)
    print(f"\n{title}\n")
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


def compare(local: list[dict], remote: list[dict]) -> None:
    """Trial by trial: the same proposals, outcomes and validation losses on Ray as on the local pool?"""
    print("\nlocal pool against Ray, trial by trial:")
    for a, b in zip(local, remote):
        same_path = [(p, s) for p, s, _ in a["sequence"]] == [(p, s) for p, s, _ in b["sequence"]]
        values = zip((v for _, _, v in a["sequence"]), (v for _, _, v in b["sequence"]))
        gaps = [abs(x - y) for x, y in values if x is not None and y is not None]
        print(
            f"{a['arm']}: {'the same' if same_path else 'DIFFERENT'} proposals and states "
            f"({len(a['sequence'])} and {len(b['sequence'])} trials), largest val_loss difference "
            f"{max(gaps, default=0.0):.2e}"
        )


def two_node_cluster():  # -> ray.cluster_utils.Cluster
    os.environ.update(LOOPBACK_ONLY)  # before Ray is imported: it reads them then
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", choices=SPACES, default="width_length", help="the 16-configuration space")
    parser.add_argument("--trials", type=int, default=8, help="trials of the tpe_asha and random arms")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run")
    parser.add_argument("--ray", action="store_true", help="the arms again on a two-node Ray cluster, compared")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "search")
    opts = parser.parse_args()
    arms = opts.arms.split(",")
    local = [run_arm(a, opts.space, opts.trials, opts.seed, opts.out / "local", None) for a in arms]
    print_table(f"space {opts.space}, local pool, --workers 1", local)
    if opts.ray:
        cluster = two_node_cluster()
        try:
            remote = [run_arm(a, opts.space, opts.trials, opts.seed, opts.out / "ray", cluster.address) for a in arms]
        finally:
            cluster.shutdown()
        print_table(f"space {opts.space}, Ray cluster of 2 nodes, --workers 1", remote)
        compare(local, remote)


if __name__ == "__main__":
    main()
