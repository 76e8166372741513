"""`nanosweep` command line: thin wrappers over the package, one-line errors, non-zero exits."""

from __future__ import annotations

import logging
import os

import click

from nanosweep.cli.result_commands import (
    analyze_command,
    download_command,
    import_results_command,
    register_command,
    sample_command,
)
from nanosweep.cli.study_commands import search_command, sweep_command
from nanosweep.cli.train_commands import prepare_command, train_command, train_group_command


@click.group()
@click.version_option(package_name="nanosweep")
def main() -> None:
    """Hyperparameter studies of small GPTs on tiny Shakespeare, tracked in MLflow."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow logs a database error with its traceback just before it raises it; the raised one is shown, in one line
    logging.getLogger("mlflow.store.db.utils").addFilter(lambda record: not record.exc_info)


for command in (
    prepare_command,
    train_command,
    train_group_command,
    sweep_command,
    search_command,
    analyze_command,
    download_command,
    sample_command,
    import_results_command,
    register_command,
):
    main.add_command(command)
