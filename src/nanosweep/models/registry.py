"""Serving the winner: a run's checkpoint as an MLflow pyfunc text generator, registered in the Model Registry.

`mlflow models serve -m models:/<name>/<version> --env-manager local` then answers
`{"inputs": ["ROMEO:"], "params": {"max_new_tokens": 100}}` with one generated string per prompt.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import mlflow
import numpy
import pandas as pd
import torch
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.utils.validation import _validate_model_name

import nanosweep
from nanosweep.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from nanosweep.config import ConfigError
from nanosweep.data import Vocab
from nanosweep.models.download import VOCAB, model_files
from nanosweep.sampling import SampleSettings, generate_texts
from nanosweep.tracking.names import CHECKPOINT
from nanosweep.tracking.query import ALL_MEMBERS, find_run, select
from nanosweep.tracking.scope import StudyScope

MODEL_NAME = "model"  # the logged model's name within its run
# sampling settings a request may override, with nanoGPT's defaults (one sample per prompt)
DEFAULT_PARAMS = {f.name: f.default for f in fields(SampleSettings) if f.name not in ("prompt", "num_samples")}


class TextGenerator(PythonModel):
    """nanoGPT's sampler as a pyfunc: prompts in, prompt + generated continuation out, settings as params."""

    def load_context(self, context: PythonModelContext) -> None:
        checkpoint = load_checkpoint(context.artifacts["checkpoint"])
        self.model = model_from_checkpoint(checkpoint)
        self.vocab = Vocab.from_json(Path(context.artifacts["vocab"]).read_text(encoding="utf-8"))

    def predict(
        self, context: PythonModelContext, model_input: list[str], params: dict[str, Any] | None = None
    ) -> list[str]:
        chosen = {**DEFAULT_PARAMS, **(params or {})}
        settings = {name: type(DEFAULT_PARAMS[name])(chosen[name]) for name in DEFAULT_PARAMS}
        return [
            generate_texts(self.model, self.vocab, SampleSettings(prompt=prompt, num_samples=1, **settings))[0]
            for prompt in model_input
        ]


@dataclass(frozen=True)
class Registered:
    """A registered model version and the run it came from."""

    name: str
    version: str
    run_id: str
    run_name: str
    val_loss: float

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def best_run(where: StudyScope | str, member: str, profile: str) -> pd.Series:
    """The run with the lowest final validation loss among the member's (or all members') runs."""
    runs = select(where, member, profile)
    return runs.loc[runs["val_loss"].idxmin()]


def register_best(where: StudyScope | str, member: str, profile: str, model_name: str | None = None) -> Registered:
    """Register the member's (or all members') best run as a new version of nanosweep-<member>."""
    best = best_run(where, member, profile)
    name = model_name or f"nanosweep-{member if member != ALL_MEMBERS else 'best'}"
    return register_run(best["run_id"], name)


def register_named(where: StudyScope | str, name_or_id: str, model_name: str | None = None) -> Registered:
    """Register one run, by name or id (a sweep trial, a `nanosweep train` run, an imported run)."""
    run_id, run_name = find_run(where, name_or_id)
    return register_run(run_id, model_name or f"nanosweep-{run_name}")


def register_run(run_id: str, name: str) -> Registered:
    """Log a run's checkpoint as a pyfunc model linked to that run and register it as a new version of name."""
    try:  # MLflow's rule for the name, before a model is logged: registering would refuse it only after
        _validate_model_name(name)
    except MlflowException as exc:
        raise ConfigError(f"{exc.message} Choose another with --model-name.") from None
    run = mlflow.MlflowClient().get_run(run_id)
    with tempfile.TemporaryDirectory(prefix="nanosweep-register-") as tmp:
        local = model_files(run_id, tmp)
        # serving needs the weights only: drop the optimizer state (two thirds of ckpt.pt)
        full = load_checkpoint(local[CHECKPOINT])
        weights = Path(tmp) / "weights.pt"
        save_checkpoint({"model": full["model"], "model_args": full["model_args"]}, weights)
        logged = mlflow.initialize_logged_model(
            name=MODEL_NAME, source_run_id=run_id, experiment_id=run.info.experiment_id
        )
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=Path(__file__).with_name("textgen.py"),  # code, not a pickle, is stored
            artifacts={"checkpoint": str(weights), "vocab": local[VOCAB]},
            # the type hints give the input and output schema; the example adds the params with their defaults
            # (logging runs it twice: once to infer the signature, once as a serving request)
            input_example=(["ROMEO:"], DEFAULT_PARAMS),
            code_paths=[str(Path(nanosweep.__file__).parent)],
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                f"torch=={torch.__version__.split('+')[0]}",
                f"numpy=={numpy.__version__}",
            ],
            registered_model_name=name,
            model_id=logged.model_id,
        )
    mlflow.MlflowClient().log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    val_loss = run.data.metrics.get("val_loss", float("nan"))
    return Registered(name, str(info.registered_model_version), run_id, run.info.run_name, val_loss)
