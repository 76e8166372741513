"""The served model's code (MLflow models-from-code): loading the model runs this file, no pickle is involved."""

import mlflow

from nanosweep.models.registry import TextGenerator

mlflow.models.set_model(TextGenerator())
