"""bench/gpu_check.sh, rehearsed: its --smoke run does every stage on the CPU at tiny sizes, as a GPU machine would."""

import json
import os
import subprocess
import sys

from helpers import REPO


def test_the_gpu_check_smoke_run_writes_every_stage_and_a_summary(prepared, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("MLFLOW_TRACKING_URI", None)  # the check makes its own stores
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--smoke", "--out", str(out), "--input", os.environ["NANOSWEEP_INPUT"]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else done.stderr
    assert done.returncode == 0, log[-5000:]
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["smoke"] is True and results["environment"]["torch"]
    stages = results["stages"]
    assert stages["tests"]["status"] == "skipped"  # no CUDA here: every gpu test skips
    assert stages["nanogpt"] == {**stages["nanogpt"], "status": "skipped", "reason": "no --nanogpt checkout given"}
    assert stages["compile"]["status"] == "skipped"  # minutes on a CPU; tests/test_fused.py compiles there
    probes = stages["probes"]["figures"]
    assert stages["probes"]["status"] == "ok", stages["probes"]["errors"]
    assert {name for name, probe in probes.items() if probe.get("ok")} == {
        "bf16_fused_vs_cpu_fp32_alone", "fp32_fused_vs_alone", "mixed_dropout", "fp16_scaler_isolation",
        "resume_across_devices",
    }  # fmt: skip
    assert all("CUDA" in probes[name]["skipped"] for name in ("real_out_of_memory", "peak_against_plan"))
    throughput = stages["throughput"]["figures"]
    assert stages["throughput"]["status"] == "ok" and throughput["study"]["groups_measured"] == 2
    for timing in throughput["groups"].values():
        assert set(timing["step_seconds"]) == set(timing["evaluation_seconds"]) == {"8", "4"}  # group, MI2000 half
        assert all(v > 0 for v in [*timing["step_seconds"].values(), timing["run_end_seconds"]])
    sweep = stages["sweep"]["figures"]
    assert stages["sweep"]["status"] == "ok", stages["sweep"]["errors"]
    assert sweep["runs"] == 4 and sweep["events"]["steps"] == {"4": 10, "2": 10} and "extrapolation_error" in sweep
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# nanosweep GPU check: CPU (smoke)") and "| sweep | ok |" in summary
    assert sorted(p.name for p in out.iterdir()) == ["junit.xml", "log.txt", "results.json", "summary.md"]
