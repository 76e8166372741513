"""System metrics: one monitor thread per trial process, logged to each of its runs, even the shortest."""

import threading
import time

from mlflow import MlflowClient

from nanosweep.tracking.run import TrackedRun
from nanosweep.tracking.store import ensure_experiment
from nanosweep.tracking.system_metrics import SystemMonitor

CPU_METRIC = "system/cpu_utilization_percentage"


def steps(run: TrackedRun) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run.run_id, CPU_METRIC))


def test_one_monitor_samples_for_all_of_a_process_runs_and_a_run_shorter_than_a_sample_still_gets_one(
    store, monkeypatch
):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's variable, as MLflow reads it
    experiment = ensure_experiment("nanosweep")
    long, other, short = (TrackedRun.create(experiment, name, {}) for name in ("long", "other", "short"))
    with SystemMonitor(gpus=[]) as monitor:
        for run in (long, other, short):
            monitor.attach(run)
        monitor.detach(short)  # its run ends before the first sample is due
        short.finish("FINISHED")
        time.sleep(1.5)
        assert sum(t.name == "system-metrics" for t in threading.enumerate()) == 1  # one thread for three runs
        for run in (long, other):
            monitor.detach(run)
            run.finish("FINISHED")
    assert steps(short) == [0]
    for run in (long, other):
        assert len(steps(run)) >= 3 and steps(run) == list(range(len(steps(run))))
    metrics = MlflowClient().get_run(long.run_id).data.metrics
    assert {"system/system_memory_usage_megabytes", "system/disk_usage_percentage"} <= set(metrics)


def test_a_resumed_runs_system_metrics_go_on_after_its_last_step(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "60")  # no sample but the one at each end
    run = TrackedRun.create(ensure_experiment("nanosweep"), "resumed", {})
    for _ in range(2):  # two processes, one after the other
        process_run = TrackedRun(run.run_id)
        with SystemMonitor(gpus=[]) as monitor:
            monitor.attach(process_run)
            monitor.detach(process_run)
        process_run.flush_and_wait()
    assert steps(run) == [0, 1]
