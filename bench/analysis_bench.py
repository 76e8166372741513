"""How long `nanosweep analyze --member all` takes on 128 runs with full metric histories in a SQLite store.

The runs are fabricated (losses follow a plausible curve, nothing is trained) but logged exactly as a
trial logs them: the study's grid, names and tags, every TrainConfig param, iter_loss/lr/tokens_per_sec
every 10 iterations and train/val loss every 200, up to 1000 or 2000 iterations.

    .venv/bin/python bench/analysis_bench.py            # fabricate into bench/out/, then time the CLI
    .venv/bin/python bench/analysis_bench.py --repeat 3
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from nanosweep.config import TrainConfig  # noqa: E402
from nanosweep.grid import GridPoint, default_sweeps_dir, expand, load_members  # noqa: E402
from nanosweep.tracking import (  # noqa: E402
    CONFIG_HASH_TAG,
    GLOBAL_ID_TAG,
    GRID_POSITION_TAG,
    MEMBER_TAG,
    PROFILE_TAG,
    RUN_KIND_TAG,
    TrackedRun,
    connect,
    ensure_experiment,
)
from nanosweep.train import build_model  # noqa: E402

VOCAB = 65
EXPERIMENT = "nanosweep"


def total_params(cfg: TrainConfig) -> int:
    with torch.device("meta"):  # the count without allocating or initialising weights
        return build_model(cfg, VOCAB).total_params()


def curves(cfg: TrainConfig, rng: np.random.Generator) -> tuple[float, float]:
    """A plausible final (train, val): bigger and longer-trained models learn more, and overfit more."""
    size = math.log(total_params(cfg) / 8e5)
    rate = 1 / (900 * (8 / cfg.batch_size) ** 0.3)
    floor = 1.55 - 0.08 * size - 0.03 * (cfg.block_size / 64 - 1)
    return floor, rate


def fabricate(point: GridPoint, experiment_id: str, parent: str) -> None:
    cfg = point.config
    rng = np.random.default_rng(point.global_id)
    floor, rate = curves(cfg, rng)
    params = total_params(cfg)
    gap_scale = 0.02 + 0.05 * (cfg.n_embd / 256) * (0.1 / cfg.dropout) * (cfg.n_layer / 4)
    tags = {
        MEMBER_TAG: point.member,
        PROFILE_TAG: point.profile,
        GRID_POSITION_TAG: str(point.position),
        GLOBAL_ID_TAG: str(point.global_id),
        CONFIG_HASH_TAG: cfg.config_hash,
        RUN_KIND_TAG: "trial",
    }
    run = TrackedRun.create(experiment_id, cfg.run_name, tags, parent)
    run.log_params({**cfg.to_dict(), "total_params": params, "tokens_per_iter": cfg.tokens_per_iter})
    run.log_params({"train_device": "cpu", "train_dtype": "float32", "member": point.member, "profile": "full"})

    def train_loss(it: int) -> float:
        return floor + (4.17 - floor) * math.exp(-it * rate)

    for it in range(0, cfg.max_iters, cfg.log_interval):
        lr = cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
        noise = rng.normal(0, 0.05)
        run.log_metrics({"iter_loss": train_loss(it) + noise, "lr": lr, "tokens_per_sec": 9000 + 500 * noise}, it)
    train = val = 0.0
    best = math.inf
    for it in [*range(0, cfg.max_iters, cfg.eval_interval), cfg.max_iters]:
        train = train_loss(it) + rng.normal(0, 0.004)
        val = train + gap_scale * (it / 2000) ** 2 + rng.normal(0, 0.004)
        best = min(best, val)
        run.log_metrics({"train_loss": train, "val_loss": val}, it)
    run.log_metrics({"loss_gap": val - train, "best_val_loss": best}, cfg.max_iters)
    run.finish("FINISHED")


def build_store(root: Path) -> str:
    """A fresh SQLite store with the full study (4 members x 32 runs) fabricated into it."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    connect(uri)
    experiment_id = ensure_experiment(EXPERIMENT)
    for member in load_members(default_sweeps_dir(), "all"):
        parent = TrackedRun.create(experiment_id, f"sweep-{member.name}", {RUN_KIND_TAG: "sweep"})
        for point in expand(member, "full"):
            fabricate(point, experiment_id, parent.run_id)
        parent.finish("FINISHED")
    return uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent / "out" / "analysis")
    parser.add_argument("--repeat", type=int, default=3, help="timed analyses (the store is built once)")
    parser.add_argument("--reuse", action="store_true", help="analyse the store already under --root")
    args = parser.parse_args()
    store = args.root / "store"
    if args.reuse:
        uri = f"sqlite:///{store / 'mlflow.db'}"
    else:
        start = time.perf_counter()
        uri = build_store(store)
        print(f"fabricated 128 runs in {time.perf_counter() - start:.1f} s: {uri}")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    nanosweep = Path(sys.executable).with_name("nanosweep")
    for i in range(args.repeat):
        out = args.root / f"results{i}"
        start = time.perf_counter()
        subprocess.run(
            [str(nanosweep), "analyze", "--member", "all", "--out", str(out)],
            check=True,
            env=env,
            cwd=args.root,
            stdout=subprocess.DEVNULL,
        )
        print(f"analyze --member all, run {i + 1}: {time.perf_counter() - start:.1f} s (process start to exit)")


if __name__ == "__main__":
    main()
