"""MLflow "model from code" entry: MLflow runs this file when it loads a logged qpacknet model
(the model directory also carries a copy of the qpacknet package via ``code_paths``)."""

import mlflow.models

from qpacknet.tracking.pyfunc import PackedPyfunc

mlflow.models.set_model(PackedPyfunc())
