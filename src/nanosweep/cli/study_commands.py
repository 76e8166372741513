"""`nanosweep sweep` and `search`: a member's grid, or an adaptive search, as child runs of one parent."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nanosweep.cli.options import (
    executor_option,
    experiment_option,
    input_option,
    ray_address_option,
    stops_cleanly,
    storage_option,
    sweeps_dir_option,
    tracking_uri_option,
    user_errors,
)
from nanosweep.tracking.names import DEFAULT_EXPERIMENT
from nanosweep.tracking.scope import chosen_experiment
from nanosweep.tracking.store import connect


@click.command("sweep")
@click.option("--member", required=True, help="a member of sweeps/ (e.g. deep_large), or all")
@click.option("--profile", default="full", show_default=True, help="full (the study's recipe) or quick (CPU-sized)")
@click.option(
    "--workers", type=int, default=0, show_default=True, help="trials at once; 0 = one per GPU slot, or 1 on CPU"
)
@click.option(
    "--trials-per-gpu", type=int, default=1, show_default=True, help="processes (fused groups) sharing each GPU"
)
@click.option(
    "--fuse",
    default="auto",
    show_default=True,
    help="at most N trials of one architecture train fused in one process; 1 = a process per trial; "
    "auto = every fusable trial on CUDA, the benchmarked size on CPU",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="seeds per grid point; 0 = the member file's `repeats` (default 1)",
)
@executor_option
@ray_address_option
@sweeps_dir_option
@click.option("--dry-run", is_flag=True, help="show what would run, resume or be skipped, and stop")
@input_option
@tracking_uri_option
@experiment_option
@user_errors
@stops_cleanly("rerun the same command to resume")
def sweep_command(
    member: str,
    profile: str,
    workers: int,
    trials_per_gpu: int,
    fuse: str,
    repeats: int,
    executor: str,
    ray_address: str | None,
    sweeps_dir: Path | None,
    dry_run: bool,
    input_path: str | None,
    tracking_uri: str | None,
    experiment: str | None,
) -> None:
    """Run a member's grid (or all): one child run per grid point under one parent run."""
    from nanosweep.study.grid import default_sweeps_dir
    from nanosweep.study.sweep import SweepOptions, fuse_limit_option, run_sweep

    opts = SweepOptions(
        member=member,
        profile=profile,
        workers=workers,
        trials_per_gpu=trials_per_gpu,
        fuse=fuse_limit_option(fuse),
        experiment=experiment,
        sweeps_dir=sweeps_dir or default_sweeps_dir(),
        input_path=input_path,
        dry_run=dry_run,
        repeats=repeats,
        executor=executor,
        ray_address=ray_address,
    )
    connect(tracking_uri)
    sys.exit(run_sweep(opts))


@click.command("search")
@click.option("--space", type=click.Path(dir_okay=False, path_type=Path), required=True, help="search-space YAML file")
@click.option("--trials", type=int, required=True, help="trials to train in total, counting earlier invocations")
@click.option("--sampler", default="tpe", show_default=True, help="Optuna sampler: tpe, random, grid or cmaes")
@click.option("--pruner", default="asha", show_default=True, help="Optuna pruner: asha, hyperband, median or none")
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="trials at once; 0 = one per GPU slot or Ray cluster CPU, or 1 on a CPU here",
)
@click.option("--sampler-seed", type=int, default=None, help="seed of the sampler, for repeatable proposals")
@executor_option
@ray_address_option
@storage_option
@input_option
@tracking_uri_option
@experiment_option
@user_errors
@stops_cleanly("rerun the same command to continue")
def search_command(
    space: Path,
    trials: int,
    sampler: str,
    pruner: str,
    workers: int,
    sampler_seed: int | None,
    executor: str,
    ray_address: str | None,
    storage: str | None,
    input_path: str | None,
    tracking_uri: str | None,
    experiment: str | None,
) -> None:
    """Adaptive search with Optuna: one child run per trial under one parent run; rerun to continue."""
    from nanosweep.study.search import SearchOptions, run_search

    connect(tracking_uri)
    experiment = chosen_experiment(experiment) or DEFAULT_EXPERIMENT  # a search is its own study: no member to find
    opts = SearchOptions(
        space, trials, sampler, pruner, workers, experiment, storage, sampler_seed, input_path, executor, ray_address
    )
    sys.exit(run_search(opts))
