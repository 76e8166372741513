"""MLflow's system metrics for the runs one trial process trains: one monitor per process, for its own GPUs.

MLflow's SystemMetricsMonitor is a thread per run and reports every GPU that NVML sees, by the machine's index; a
fused group trains many runs on one GPU, often not GPU 0. So one thread here samples MLflow's own monitors (CPU
and memory, disk, network, and its GPU monitor narrowed to this process's GPUs, gpu_0 being this process's cuda:0)
and logs each sample to every run still training; ending a run logs one more sample to it, so that a run shorter
than the sampling interval has its system metrics too.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from nanosweep.tracking.run import TrackedRun

PREFIX = "system/"  # MLflow's own prefix for system metrics
SAMPLING_SECONDS = 10.0  # MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it, as in MLflow

_log = logging.getLogger(__name__)


def own_gpu_monitor(devices: list[int]) -> Any:
    """MLflow's GPU monitor over this process's CUDA devices alone, found in NVML by their UUIDs."""
    import pynvml
    import torch
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    monitor = GPUMonitor()  # initialises NVML, with a handle on every GPU of the machine
    handles = []
    for device in devices:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        for name in (f"GPU-{uuid}", f"MIG-{uuid}"):  # a whole GPU, or a MIG slice of one
            try:
                handles.append(pynvml.nvmlDeviceGetHandleByUUID(name))
                break
            except pynvml.NVMLError:
                continue
        else:
            raise RuntimeError(f"NVML knows no GPU with the UUID of cuda:{device} ({uuid})")
    monitor.gpu_handles, monitor.num_gpus = handles, len(handles)
    return monitor


class SystemMonitor:
    """Samples the machine every SAMPLING_SECONDS on one thread and logs each sample to every attached run."""

    def __init__(self, gpus: list[int]) -> None:
        from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        if gpus:
            try:
                self.monitors.append(own_gpu_monitor(gpus))
            except Exception as exc:  # no NVML, an unknown device: training goes on without GPU metrics
                _log.warning("no GPU system metrics: %s", exc)
        self.seconds = float(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or SAMPLING_SECONDS)
        self._runs: dict[str, tuple[TrackedRun, int]] = {}  # run id -> (run, its next step)
        self._lock = threading.Lock()  # runs attach and detach from the training thread while samples go out
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="system-metrics", daemon=True)

    def attach(self, run: TrackedRun) -> None:
        """Log samples to this run from now on; a resumed run's series goes on after its last step."""
        with self._lock:
            self._runs[run.run_id] = (run, run.next_step(PREFIX))

    def detach(self, run: TrackedRun) -> None:
        """One last sample to this run (a short run gets one at least), and none after it."""
        with self._lock:
            entry = self._runs.pop(run.run_id, None)
            if entry is not None:
                run.log_metrics(self._sample(), step=entry[1])

    def _sample(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        return {PREFIX + key: value for key, value in metrics.items()}

    def _sample_until_stopped(self) -> None:
        while not self._stopped.wait(self.seconds):
            with self._lock:
                if not self._runs:
                    continue
                metrics = self._sample()
                for run_id, (run, step) in list(self._runs.items()):
                    try:
                        run.log_metrics(metrics, step=step)
                    except Exception as exc:  # a store briefly away: the run's own flush reports what matters
                        _log.warning("system metrics of run %s not logged: %s", run_id, exc)
                    self._runs[run_id] = (run, step + 1)

    def __enter__(self) -> SystemMonitor:
        self._sample()  # the CPU's utilisation is measured from one call to the next: the first one only starts it
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._thread.join()
