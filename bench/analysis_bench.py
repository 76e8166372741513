"""How long `nanosweep analyze --member all` takes on 128 runs with full metric histories in a SQLite store.

The runs are fabricated (losses follow a plausible curve, nothing is trained) but logged exactly as a
trial logs them: the study's grid, names and tags, every TrainConfig param, iter_loss/lr/tokens_per_sec
every 10 iterations and train/val loss every 200, up to 1000 or 2000 iterations.

    .venv/bin/python bench/analysis_bench.py           # fabricate the store under bench/out/analysis/, time it
    .venv/bin/python bench/analysis_bench.py --reuse   # time again on the store already there
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nanosweep.analysis.findings import findings
from nanosweep.analysis.pipeline import log_analysis_run, staging, write_outputs
from nanosweep.config import TrainConfig
from nanosweep.group import build_model
from nanosweep.study.grid import GridPoint, default_sweeps_dir, expand, load_members
from nanosweep.tracking.names import RUN_KIND_TAG
from nanosweep.tracking.query import histories, select
from nanosweep.tracking.run import TrackedRun
from nanosweep.tracking.store import connect, ensure_experiment

VOCAB = 65
EXPERIMENT = "nanosweep"


def total_params(cfg: TrainConfig) -> int:
    with torch.device("meta"):  # the count without allocating or initialising weights
        return build_model(cfg, VOCAB).total_params()


def fabricate(point: GridPoint, experiment_id: str, parent: str) -> None:
    """One grid point's run, logged as a trial logs it; bigger models learn faster and overfit more."""
    cfg = point.config
    rng = np.random.default_rng(point.global_id)
    params = total_params(cfg)
    floor = 1.55 - 0.08 * math.log(params / 8e5) - 0.03 * (cfg.block_size / 64 - 1)
    rate = 1 / (900 * (8 / cfg.batch_size) ** 0.3)
    gap_scale = 0.02 + 0.05 * (cfg.n_embd / 256) * (0.1 / cfg.dropout) * (cfg.n_layer / 4)
    run = TrackedRun.create(experiment_id, cfg.run_name, point.study_tags(), parent)
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
    os.chdir(root)  # the experiment's artifact root (./mlruns) is fixed where it is created
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


def phases(uri: str, root: Path) -> None:
    """The same analysis in this process, timed step by step."""
    connect(uri)
    clock = time.perf_counter()

    def lap(label: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        print(f"  {label:<56} {now - clock:6.2f} s")
        clock = now

    runs = select(EXPERIMENT)
    lap(f"read {len(runs)} runs (search, paginated)")
    history = histories(list(runs["run_id"]))
    lap(f"read {len(history)} evaluation points (train/val histories)")
    found = findings(runs, history)
    lap("rankings, main effects, overfitting")
    with staging(root / "phases") as stage:
        write_outputs(found, history, stage, "all", uri)
        lap("CSVs, 12 PNG plots, report (md + html)")
        log_analysis_run(stage, ensure_experiment(EXPERIMENT), "all", found)
        lap("log the analysis run with its artifacts")
    every = histories(list(runs["run_id"]), ("iter_loss", "lr", "tokens_per_sec", "train_loss", "val_loss"))
    lap(f"(not needed by analyze) read all {len(every)} history points")


def metric_points(store: Path) -> int:
    with sqlite3.connect(store / "mlflow.db") as db:
        return db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent / "out" / "analysis")
    parser.add_argument("--repeat", type=int, default=3, help="timed analyses (the store is built once)")
    parser.add_argument("--reuse", action="store_true", help="analyse the store already under --root")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
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
    print(f"the store holds {metric_points(store)} metric points; one analysis in process:")
    phases(uri, args.root)


if __name__ == "__main__":
    main()
