"""What Ray adds per trial against the local process pool, on the same tiny grid and the same CPUs.

Sweeps one tiny grid (--fuse 1: one process per trial) with `--executor local --workers W` and with
`--executor ray` on a local Ray the sweep starts for itself (as many CPUs as the machine, so W trials at a time
too), alternating, each time into a fresh SQLite store. Reports the seconds per trial as the sweep measured them
(launch to exit: process start, imports, training, ending the run) and each sweep's wall time, which for Ray
includes starting and stopping Ray. Ray's traffic is kept on loopback as in the tests.

    .venv/bin/python bench/bench_ray.py --rounds 2 --input PATH/input.txt
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEMBER = """\
member: tiny
global_id_offset: 0
fixed: {block_size: 32, n_layer: 2}
grid:
  n_head: [2]
  n_embd: [32, 48]
  batch_size: [4]
  max_iters: [20, 40]
  dropout: [0.0, 0.1]
overrides: {eval_interval: 10, eval_iters: 4, gradient_accumulation_steps: 1, log_interval: 5, warmup_iters: 10,
            num_samples: 1, max_new_tokens: 20}
"""
LOOPBACK_ONLY = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    **{proxy: "http://127.0.0.1:9" for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    **{no_proxy: "127.0.0.1,localhost,::1" for no_proxy in ("NO_PROXY", "no_proxy")},
}
TRIAL_LINE = re.compile(r"\] done .*  (\S+) FINISHED in ([0-9.]+)s")


def sweep(executor: str, workers: int, sweeps_dir: Path, input_path: str | None) -> tuple[float, list[float]]:
    """(wall seconds, seconds of each trial) of one sweep into a fresh store."""
    with tempfile.TemporaryDirectory() as store:
        argv = [sys.executable, "-m", "nanosweep", "sweep", "--member", "tiny", "--sweeps-dir", str(sweeps_dir)]
        argv += ["--fuse", "1", "--executor", executor, "--tracking-uri", f"sqlite:///{store}/mlflow.db"]
        argv += ["--workers", str(workers)] if executor == "local" else []
        argv += ["--input", input_path] if input_path else []
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, cwd=store, env={**os.environ, **LOOPBACK_ONLY})
        wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{executor} sweep failed:\n{done.stdout}{done.stderr}")
    trials = [float(m.group(2)) for m in TRIAL_LINE.finditer(done.stderr)]
    return wall, trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="local and ray sweeps each, alternating")
    parser.add_argument("--input", default=None, help="tiny Shakespeare input.txt (else the usual places)")
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as sweeps:
        (Path(sweeps) / "tiny.yaml").write_text(MEMBER)
        results: dict[str, list[tuple[float, list[float]]]] = {"local": [], "ray": []}
        for _ in range(args.rounds):
            for executor in results:
                results[executor].append(sweep(executor, workers, Path(sweeps), args.input))
                wall, trials = results[executor][-1]
                print(f"{executor}: {len(trials)} trials, {wall:.1f} s wall, {statistics.mean(trials):.2f} s/trial")
    print(f"\n{workers} trials at a time, 8 trials per sweep, {args.rounds} sweeps each")
    print("| executor | s per trial (mean) | sweep wall s (mean) |\n|---|---|---|")
    means = {}
    for executor, runs in results.items():
        per_trial = statistics.mean(t for _, trials in runs for t in trials)
        means[executor] = (per_trial, statistics.mean(wall for wall, _ in runs))
        print(f"| {executor} | {per_trial:.2f} | {means[executor][1]:.1f} |")
    added = means["ray"][0] - means["local"][0]
    print(f"Ray adds {added:.2f} s per trial ({means['ray'][0] / means['local'][0]:.2f}x the local pool's)")


if __name__ == "__main__":
    main()
