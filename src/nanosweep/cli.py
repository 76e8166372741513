"""`nanosweep` command line: thin wrappers over the package, one-line errors, non-zero exits."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from nanosweep.config import ConfigError, TrainConfig
from nanosweep.data import DataError, prepare
from nanosweep.executors import EXECUTORS, ExecutorError
from nanosweep.stopping import Interrupted, signal_name, stop_signals
from nanosweep.tracking import (
    DEFAULT_EXPERIMENT,
    TrackingError,
    chosen_experiment,
    connect,
    experiment_name,
    first_line,
    open_runs,
    store_failure,
    study_scope,
)

USER_ERRORS = (ConfigError, DataError, TrackingError, ExecutorError)  # importer.StudyFormatError is a ConfigError


def failure_line(exc: Exception) -> str | None:
    """What slipped past the checks (a store, a disk or a file failing underneath) as one line naming what failed;
    None for anything else, a bug, which keeps its traceback."""
    if isinstance(exc, UnicodeDecodeError):  # nanosweep's own reads of the user's files name them (textfiles)
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8"
    if isinstance(exc, OSError):
        paths = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
        if not paths:
            return str(exc)
        return f"{paths}: {exc.strerror}: check the path, its permissions and the space left on its disk"
    optuna_errors = sys.modules.get("optuna.exceptions")  # only a search loads Optuna
    if optuna_errors and isinstance(exc, optuna_errors.StorageInternalError):  # its own words say little: the cause
        cause = exc.__cause__
        return f"the Optuna storage failed: {first_line(getattr(cause, 'orig', None) or cause or exc)}"
    return store_failure(exc)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the package's expected errors into click's one-line 'Error: ...' and exit status 1, and so whatever
    failure_line recognises: the last line of defence, behind the checks that refuse bad input before any write."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            line = failure_line(exc)
            if line is None:
                raise
            raise click.ClickException(line) from None

    return wrapper


def stops_cleanly(outcome: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """SIGTERM or Ctrl-C stops the command at whatever moment it comes: every run the command opened ends KILLED
    (an error ends them FAILED), then it says `outcome` and exits 130."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                with stop_signals.installed(), open_runs.ended_on_exit():
                    return command(*args, **kwargs)
            except (Interrupted, KeyboardInterrupt) as exc:
                name = click.get_current_context().info_name
                click.echo(f"{name} interrupted ({signal_name(exc)}): {outcome}", err=True)
                sys.exit(130)

        return wrapper

    return decorate


def train_config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One --option per TrainConfig field, with its default and help."""
    for field in reversed(dataclasses.fields(TrainConfig)):
        option = click.option(
            f"--{field.name.replace('_', '-')}",
            field.name,
            type=type(field.default),
            default=field.default,
            show_default=True,
            help=field.metadata["help"],
        )
        command = option(command)
    return command


input_option = click.option(
    "--input",
    "input_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="tiny Shakespeare input.txt (else NANOSWEEP_INPUT, the cache, or a download)",
)
tracking_uri_option = click.option(
    "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
)
sweeps_dir_option = click.option(
    "--sweeps-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="folder of member YAML files (default: NANOSWEEP_SWEEPS_DIR, ./sweeps, else the checkout's sweeps/)",
)
storage_option = click.option(
    "--storage",
    default=None,
    help="Optuna study database URL (default: NANOSWEEP_OPTUNA_STORAGE, else optuna.db beside a SQLite tracking store)",
)
experiment_option = click.option(
    "--experiment",
    default=None,
    help="MLflow experiment (else MLFLOW_EXPERIMENT_NAME / _ID); none named: look in every experiment "
    f"and write where the member's runs are, else {DEFAULT_EXPERIMENT!r} (README: Where a study lives)",
)


@click.group()
@click.version_option(package_name="nanosweep")
def main() -> None:
    """Hyperparameter studies of small GPTs on tiny Shakespeare, tracked in MLflow."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow logs a database error with its traceback just before it raises it; the raised one is shown, in one line
    logging.getLogger("mlflow.store.db.utils").addFilter(lambda record: not record.exc_info)


@main.command("prepare")
@input_option
@user_errors
def prepare_command(input_path: str | None) -> None:
    """Verify tiny Shakespeare and write train/val ids and vocab.json once."""
    prepared = prepare(input_path)
    click.echo(f"prepared {prepared.root} (train.bin, val.bin, vocab.json)")


@main.command("train")
@train_config_options
@input_option
@tracking_uri_option
@experiment_option
@click.option("--run-id", default=None, help="train into this existing run, resuming from its checkpoint")
@click.option("--parent-run-id", default=None, help="nest the new run under this run")
# set by `nanosweep search` for its trial processes: report val_loss to this Optuna trial, which may prune the run
@click.option("--optuna-storage", default=None, hidden=True)
@click.option("--optuna-study", default=None, hidden=True)
@click.option("--optuna-trial-id", type=int, default=None, hidden=True)
@click.option("--optuna-pruner", default="none", hidden=True)
@user_errors
@stops_cleanly("run ended KILLED")
def train_command(
    input_path: str | None,
    tracking_uri: str | None,
    experiment: str | None,
    run_id: str | None,
    parent_run_id: str | None,
    optuna_storage: str | None,
    optuna_study: str | None,
    optuna_trial_id: int | None,
    optuna_pruner: str,
    **fields: Any,
) -> None:
    """Train one configuration as one MLflow run."""
    from nanosweep.trial import run_trial

    cfg = TrainConfig(**fields)
    connect(tracking_uri, must_exist=run_id is not None)  # a new run is made in a new store, once
    new_runs_go_to = chosen_experiment(experiment) or DEFAULT_EXPERIMENT  # a train run is no grid point: no search
    watch = None
    if optuna_study is not None:  # a search trial; only then is Optuna imported
        from nanosweep.pruning import pruning_observer

        watch = pruning_observer(optuna_storage, optuna_study, optuna_trial_id, optuna_pruner)
    run_id = run_trial(cfg, new_runs_go_to, run_id, parent_run_id, input_path=input_path, watch=watch)
    click.echo(f"{cfg.run_name}: run {run_id} FINISHED")


@main.command("train-group")
@click.option(
    "--trial",
    "trials",
    multiple=True,
    required=True,
    metavar="JSON",
    help='one run: {"run_id": ..., "config": {TrainConfig fields}}; all of one architecture and batch size',
)
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="a tag for every run (sweeps name the group)")
@input_option
@tracking_uri_option
@user_errors
@stops_cleanly("unfinished runs ended KILLED")
def train_group_command(
    trials: tuple[str, ...], tags: tuple[str, ...], input_path: str | None, tracking_uri: str | None
) -> None:
    """Train existing runs fused in one process, each ending on its own (what a sweep launches per group)."""
    from nanosweep.trial import parse_trial_spec, run_group

    specs = [parse_trial_spec(text) for text in trials]
    bad = [t for t in tags if "=" not in t]
    if bad:
        raise click.ClickException(f"--tag {bad[0]!r} is not allowed: give KEY=VALUE")
    connect(tracking_uri, must_exist=True)
    statuses = run_group(specs, dict(t.split("=", 1) for t in tags), input_path)
    for cfg, run_id in specs:
        click.echo(f"{cfg.run_name}: run {run_id} {statuses[run_id]}")
    sys.exit(0 if set(statuses.values()) == {"FINISHED"} else 1)


@main.command("sweep")
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
@click.option(
    "--executor",
    default="local",
    show_default=True,
    help="where trials run: local (processes here) or ray (tasks on a Ray cluster; pip install 'nanosweep[ray]')",
)
@click.option(
    "--ray-address",
    default=None,
    help="the Ray cluster, e.g. HEAD:6379 (default: RAY_ADDRESS, else the cluster `ray start` started on this "
    "machine, else a local Ray started for the sweep)",
)
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
    from nanosweep.grid import check_profile, default_sweeps_dir
    from nanosweep.sweep import SweepOptions, run_sweep

    check_profile(profile)
    if workers < 0 or trials_per_gpu < 1:
        raise click.ClickException(
            f"workers={workers}, trials_per_gpu={trials_per_gpu} are not allowed: workers >= 0, trials_per_gpu >= 1"
        )
    if not (fuse == "auto" or (fuse.isdigit() and int(fuse) >= 1)):
        raise click.ClickException(f"fuse={fuse!r} is not allowed: use auto or a positive integer")
    if executor not in EXECUTORS:
        raise click.ClickException(f"executor={executor!r} is not allowed: choose one of {', '.join(EXECUTORS)}")
    connect(tracking_uri)
    opts = SweepOptions(
        member=member,
        profile=profile,
        workers=workers,
        trials_per_gpu=trials_per_gpu,
        fuse=0 if fuse == "auto" else int(fuse),
        experiment=experiment,
        sweeps_dir=sweeps_dir or default_sweeps_dir(),
        input_path=input_path,
        dry_run=dry_run,
        repeats=repeats,
        executor=executor,
        ray_address=ray_address,
    )
    sys.exit(run_sweep(opts))


@main.command("search")
@click.option("--space", type=click.Path(dir_okay=False, path_type=Path), required=True, help="search-space YAML file")
@click.option("--trials", type=int, required=True, help="trials to train in total, counting earlier invocations")
@click.option("--sampler", default="tpe", show_default=True, help="Optuna sampler: tpe, random, grid or cmaes")
@click.option("--pruner", default="asha", show_default=True, help="Optuna pruner: asha, hyperband, median or none")
@click.option("--workers", type=int, default=1, show_default=True, help="trials at once")
@click.option("--sampler-seed", type=int, default=None, help="seed of the sampler, for repeatable proposals")
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
    storage: str | None,
    input_path: str | None,
    tracking_uri: str | None,
    experiment: str | None,
) -> None:
    """Adaptive search with Optuna: one child run per trial under one parent run; rerun to continue."""
    from nanosweep.search import SearchOptions, run_search

    connect(tracking_uri)
    experiment = chosen_experiment(experiment) or DEFAULT_EXPERIMENT  # a search is its own study: no member to find
    opts = SearchOptions(space, trials, sampler, pruner, workers, experiment, storage, sampler_seed, input_path)
    sys.exit(run_search(opts))


# --- analysis, artifacts, import and serving: everything read back from the tracking store ---

member_option = click.option(
    "--member", default="all", show_default=True, help="a member with finished runs in the store, or all"
)
profile_option = click.option(
    "--profile", default="auto", show_default=True, help="full or quick; auto: the only profile in the store"
)


def writable_folder(ctx: click.Context, param: click.Parameter, folder: Path) -> Path:
    """--out is written at the end of a command's work: refuse at once a folder that cannot be written, or made."""
    nearest = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not os.access(nearest, os.W_OK):  # False on a read-only file system, for root too
        made = "" if nearest == folder else f", so {folder} cannot be made there"
        raise click.BadParameter(f"{nearest} is not writable{made}: choose a folder you may write")
    return folder


out_option = click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    callback=writable_folder,
    default=Path("results"),
    show_default=True,
    help="folder for the study layout (nanoGPT_results_vijay_<member>/) and analysis-<member>/",
)


@main.command("analyze")
@member_option
@profile_option
@out_option
@click.option("--log-run/--no-log-run", default=True, show_default=True, help="log the analysis as an MLflow run")
@click.option("--search", default=None, help="analyse this search (its space file's stem) instead of a member's grid")
@storage_option
@tracking_uri_option
@experiment_option
@user_errors
@stops_cleanly("nothing was written to --out")
def analyze_command(
    member: str,
    profile: str,
    out: Path,
    log_run: bool,
    search: str | None,
    storage: str | None,
    tracking_uri: str | None,
    experiment: str | None,
) -> None:
    """Results CSVs, rankings, main effects, plots and a report from the finished runs in the store."""
    from nanosweep.analyze import analyze, summary

    uri = connect(tracking_uri, must_exist=search is None)  # a search's analysis reads its study alone
    if search is not None:
        from nanosweep.search import study_storage
        from nanosweep.search_report import analyze_search

        searched = analyze_search(search, study_storage(uri, storage), out)
        click.echo(searched.trials.drop(columns=["run_id"]).to_string(index=False))
        click.echo(f"wrote {len(searched.files)} files; report: {searched.folder / 'report.html'}")
        return
    result = analyze(study_scope(experiment), member, profile, out, log_run)
    click.echo(summary(result.findings))
    click.echo(f"wrote {len(result.files)} files; report: {result.folder / 'report.html'}")
    if result.run_id:
        click.echo(f"logged as run analysis-{member} ({result.run_id})")


@main.command("download")
@member_option
@profile_option
@click.option("--name", "name_or_id", default=None, help="one run instead, by name or id (e.g. a train run)")
@out_option
@tracking_uri_option
@experiment_option
@user_errors
def download_command(
    member: str, profile: str, name_or_id: str | None, out: Path, tracking_uri: str | None, experiment: str | None
) -> None:
    """Checkpoints, samples and results.csv of a member's runs (or one run's) into the study's folder layout."""
    from nanosweep.artifacts import download, fetch_missing, run_transfers
    from nanosweep.query import find_run, select

    connect(tracking_uri, must_exist=True)
    scope = study_scope(experiment)

    def progress(todo: list) -> Any:
        return click.progressbar(
            todo, label=f"downloading {len(todo)} files", item_show_func=lambda t: t.dest.name if t else None
        )

    if name_or_id:
        run_id, name = find_run(scope, name_or_id)
        fetched, skipped = fetch_missing(run_transfers(run_id, name, out), progress)
        click.echo(f"{name} (run {run_id}): {fetched} files downloaded, {skipped} already present, into {out}")
        return
    runs = select(scope, member, profile)
    fetched, skipped = download(runs, out, progress)
    click.echo(f"{len(runs)} runs: {fetched} files downloaded, {skipped} already present (same size), into {out}")


@main.command("sample")
@click.option("--name", "name_or_id", required=True, help="run name (the latest finished run of that name) or run id")
@click.option("--prompt", default="\n", show_default=True, help="start text; FILE:path reads it from a file")
# checked by SampleSettings with the rules of TrainConfig's sampling fields, the same for every way of sampling
@click.option("--num-samples", default=10, show_default=True, type=int)
@click.option("--max-new-tokens", default=500, show_default=True, type=int)
@click.option("--temperature", default=0.8, show_default=True, type=float)
@click.option("--top-k", default=200, show_default=True, type=int)
@click.option("--seed", default=1337, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto (cuda when present), cpu, cuda:N or mps")
@tracking_uri_option
@experiment_option
@user_errors
def sample_command(
    name_or_id: str, prompt: str, device: str, tracking_uri: str | None, experiment: str | None, **settings: Any
) -> None:
    """Generate text from any run's checkpoint, downloaded through MLflow (nanoGPT's sampling defaults)."""
    from nanosweep.artifacts import load_run_model
    from nanosweep.query import find_run
    from nanosweep.sampling import SampleSettings, format_samples, generate_texts
    from nanosweep.textfiles import read_text

    if prompt.startswith("FILE:"):
        prompt = read_text(Path(prompt[5:]))
    sampling = SampleSettings(prompt=prompt, **settings)  # refused before the store is touched
    connect(tracking_uri, must_exist=True)
    run_id, name = find_run(study_scope(experiment), name_or_id)
    model, vocab = load_run_model(run_id, device)
    click.echo(f"# {name} (run {run_id})", err=True)
    click.echo(format_samples(generate_texts(model, vocab, sampling)), nl=False)


@main.command("import-results")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--member", default=None, help="member (default: from the folder name nanoGPT_results_vijay_<member>)")
@sweeps_dir_option
@input_option
@tracking_uri_option
@experiment_option
@user_errors
@stops_cleanly("the runs imported so far stay; rerun to import the rest")
def import_results_command(
    folder: Path,
    member: str | None,
    sweeps_dir: Path | None,
    input_path: str | None,
    tracking_uri: str | None,
    experiment: str | None,
) -> None:
    """An existing study folder (results.csv, run folders with ckpt.pt, samples/) as MLflow runs."""
    from nanosweep.grid import default_sweeps_dir
    from nanosweep.importer import import_study

    vocab = prepare(input_path).vocab()
    connect(tracking_uri)
    result = import_study(folder, member, study_scope(experiment), vocab, sweeps_dir or default_sweeps_dir())
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"imported {len(result.runs)} runs into experiment {experiment_name(result.experiment_id)!r}"
        + (f"; {len(result.skipped)} were already imported" if result.skipped else "")
    )


@main.command("register")
@click.option("--member", default=None, help="a member with finished runs in the store, or all (the overall best)")
@click.option("--name", "name_or_id", default=None, help="or one run, by name or id (e.g. a train run)")
@profile_option
@click.option("--model-name", default=None, help="registered model name (default: nanosweep-<member or run name>)")
@tracking_uri_option
@experiment_option
@user_errors
def register_command(
    member: str | None,
    name_or_id: str | None,
    profile: str,
    model_name: str | None,
    tracking_uri: str | None,
    experiment: str | None,
) -> None:
    """Register the member's best run (lowest validation loss), or a named run, as a servable text generator."""
    from nanosweep.registry import register_best, register_named

    if (member is None) == (name_or_id is None):
        raise click.UsageError("give exactly one of --member (its best run) and --name (that run)")
    connect(tracking_uri, must_exist=True)
    scope = study_scope(experiment)
    if name_or_id:
        registered = register_named(scope, name_or_id, model_name)
    else:
        registered = register_best(scope, member, profile, model_name)
    click.echo(f"registered {registered.uri} from {registered.run_name} (val loss {registered.val_loss:.4f})")
    click.echo(f"serve it: mlflow models serve -m {registered.uri} --env-manager local -p 5001")
