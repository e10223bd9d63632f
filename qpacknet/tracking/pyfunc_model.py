"""MLflow "model from code" entry: MLflow runs this file when it loads a logged qpacknet model
(qpacknet must be importable there: our image, or this repository's environment)."""

import mlflow.models

from qpacknet.tracking.pyfunc import PackedPyfunc

mlflow.models.set_model(PackedPyfunc())
