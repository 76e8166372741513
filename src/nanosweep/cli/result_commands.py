"""`nanosweep analyze`, `download`, `sample`, `import-results` and `register`: what is read back from the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nanosweep.cli.options import (
    experiment_option,
    input_option,
    member_option,
    out_option,
    profile_option,
    stops_cleanly,
    storage_option,
    sweeps_dir_option,
    tracking_uri_option,
    user_errors,
)
from nanosweep.data import prepare
from nanosweep.tracking.scope import study_scope
from nanosweep.tracking.store import connect, experiment_name


@click.command("analyze")
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
    from nanosweep.analysis.pipeline import analyze, summary

    uri = connect(tracking_uri, must_exist=search is None)  # a search's analysis reads its study alone
    if search is not None:
        from nanosweep.analysis.search_report import analyze_search
        from nanosweep.study.optuna_study import study_storage

        searched = analyze_search(search, study_storage(uri, storage), out)
        click.echo(searched.trials.drop(columns=["run_id"]).to_string(index=False))
        click.echo(f"wrote {len(searched.files)} files; report: {searched.folder / 'report.html'}")
        return
    result = analyze(study_scope(experiment), member, profile, out, log_run)
    click.echo(summary(result.findings))
    click.echo(f"wrote {len(result.files)} files; report: {result.folder / 'report.html'}")
    if result.run_id:
        click.echo(f"logged as run analysis-{member} ({result.run_id})")


@click.command("download")
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
    from nanosweep.models.download import download, fetch_missing, run_transfers
    from nanosweep.tracking.query import find_run, select

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


@click.command("sample")
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
    from nanosweep.models.download import load_run_model
    from nanosweep.sampling import SampleSettings, format_samples, generate_texts
    from nanosweep.textfiles import read_text
    from nanosweep.tracking.query import find_run

    if prompt.startswith("FILE:"):
        prompt = read_text(Path(prompt[5:]))
    sampling = SampleSettings(prompt=prompt, **settings)  # refused before the store is touched
    connect(tracking_uri, must_exist=True)
    run_id, name = find_run(study_scope(experiment), name_or_id)
    model, vocab = load_run_model(run_id, device)
    click.echo(f"# {name} (run {run_id})", err=True)
    click.echo(format_samples(generate_texts(model, vocab, sampling)), nl=False)


@click.command("import-results")
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
    from nanosweep.models.importer import import_study
    from nanosweep.study.grid import default_sweeps_dir

    vocab = prepare(input_path).vocab()
    connect(tracking_uri)
    result = import_study(folder, member, study_scope(experiment), vocab, sweeps_dir or default_sweeps_dir())
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"imported {len(result.runs)} runs into experiment {experiment_name(result.experiment_id)!r}"
        + (f"; {len(result.skipped)} were already imported" if result.skipped else "")
    )


@click.command("register")
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
    from nanosweep.models.registry import register_best, register_named

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
