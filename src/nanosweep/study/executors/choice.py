"""The executors a sweep or search can ask for by name, and the one it gets."""

from __future__ import annotations

import os

from nanosweep.study.executors.base import Executor, ExecutorError
from nanosweep.study.executors.local import LocalProcessPool, plan_slots, visible_gpus

EXECUTORS = ("local", "ray")


def make_executor(
    kind: str, workers: int, trials_per_gpu: int, input_path: str | None = None, ray_address: str | None = None
) -> Executor:
    """The executor a sweep asked for: the local pool over this machine's GPUs (or CPU), or a Ray cluster
    (which sends the text --input or the usual places give, checked, to nodes that lack it)."""
    if kind == "local":
        import torch  # CUDA is looked at only where trials run locally

        gpus = visible_gpus(torch.cuda.device_count())
        slots, threads = plan_slots(workers, gpus, trials_per_gpu, os.cpu_count() or 1)
        return LocalProcessPool(slots, threads)
    if kind == "ray":
        try:
            import ray  # noqa: F401  (an optional extra)
        except ImportError:
            missing = "executor='ray' needs Ray, which is not installed: pip install 'nanosweep[ray]'"
            raise ExecutorError(missing) from None
        from nanosweep.data import find_input
        from nanosweep.study.executors.ray import RayExecutor

        return RayExecutor(ray_address, workers, trials_per_gpu, find_input(input_path))
    raise ExecutorError(f"executor={kind!r} is not allowed: choose one of {', '.join(EXECUTORS)}")
