"""The packed model as an MLflow ``pyfunc`` model, so that any MLflow tool can serve it.

``predict(x, params={"task": t})`` returns task ``t``'s predicted class per input (int64),
exactly as :meth:`qpacknet.model.PackedModel.predict` does, as it always has. Without
``params.task`` the task of every input is inferred (:mod:`qpacknet.recognise`, by
``params.recogniser``: entropy, input, feature or combined; by default the strongest the
model file has statistics for) and the result is a DataFrame with columns ``class``, ``task`` and
``confidence`` (the inferred task's softmax probability of that class), the output the
signature declares. Inputs are network inputs (float32, the scenario's input shape); with
``params.raw`` they are raw inputs as the user has them (e.g. digits' 0..16 pixel values,
images' 0..255 pixels) and each task's preparation recorded in the model file is applied
first: the only correct way to serve an image model without task ids, since each of its tasks
standardises with its own statistics.

The model directory carries the packed file
itself (plus the run's ``checkpoint.json`` and ``config.yaml``, which ``qpacknet learn`` needs to
add the next task). It loads where qpacknet is installed (our image, or this repo's venv); a
copy of the package inside every version (``code_paths``) would add 57 files to each version,
about 570 more artifact uploads per 10-task run against a tracking server, so it is left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

PACKED = "packed_model"
CHECKPOINT = "checkpoint"
CONFIG = "config"


def _inputs(model_input: Any) -> np.ndarray:
    """Images as float32 ``[N, ...]`` from an array, a DataFrame, a list or ``{"x": ...}``."""
    if isinstance(model_input, dict):
        if "x" not in model_input:
            raise ValueError("give the images as an array, or as a mapping with key 'x'")
        model_input = model_input["x"]
    if hasattr(model_input, "to_numpy"):
        model_input = model_input.to_numpy()
    return np.asarray(model_input, dtype=np.float32)


class PackedPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the packed file once; decodes each task's sub-network on first use."""

    def load_context(self, context: Any) -> None:
        from qpacknet.model import PackedModel

        self.model = PackedModel.load(context.artifacts[PACKED])


def _predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
    """Class ids under task ``params["task"]``, or without it a DataFrame of the inferred
    task, class and confidence per input.

    Attached after the class body on purpose: MLflow inspects a ``predict`` defined in a
    PythonModel subclass for type hints, which would replace the explicit signature (a float32
    tensor plus ``task`` and ``raw`` parameters), and warns on every import when there are
    none."""
    import pandas as pd
    import torch

    from qpacknet.preparation import of_store, task_inputs
    from qpacknet.recognise import choose, infer_tasks

    params = params or {}
    task = params.get("task")
    n_tasks = self.model.num_tasks
    if task is not None and not 0 <= int(task) < n_tasks:
        raise ValueError(f"params.task={task}: this model holds tasks 0..{n_tasks - 1}")
    x = torch.from_numpy(np.ascontiguousarray(_inputs(model_input)))
    preps = None
    if params.get("raw"):
        preps = of_store(self.model.store)
        if preps is None:
            raise ValueError(
                "params.raw: this model file records no input preparation (it was written "
                "before qpacknet recorded one); send prepared network inputs without params.raw"
            )
    inputs = task_inputs(preps, x, self.model.input_shape)
    if task is not None:
        return self.model.predict(int(task), inputs(int(task))).numpy()
    method = params.get("recogniser") or None
    if method is None:  # the strongest one the file has; said once if that is entropy
        if getattr(self, "_recogniser", None) is None:
            self._recogniser = choose(self.model, None)
        method = self._recogniser
    found = infer_tasks(self.model, inputs, method)
    return pd.DataFrame(
        {
            "class": found.prediction.numpy(),
            "task": found.task.numpy(),
            "confidence": found.confidence.numpy(),
        }
    )


PackedPyfunc.predict = _predict  # type: ignore[method-assign]


def _signature(input_shape: tuple[int, ...]) -> Any:
    """Outputs: the task-inference DataFrame (with ``params.task`` the result is the int64
    class per input instead, as before the task could be inferred). ``task`` defaults to None,
    so a request without it infers the task; versions registered before that default to 0."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
        outputs=Schema(
            [ColSpec("long", "class"), ColSpec("long", "task"), ColSpec("float", "confidence")]
        ),
        params=ParamSchema(
            [
                ParamSpec("task", "long", None),
                ParamSpec("raw", "boolean", False),
                ParamSpec("recogniser", "string", None),
            ]
        ),
    )


def _requirements() -> list[str]:
    import importlib.metadata as md

    names = ("torch", "numpy", "safetensors", "pydantic", "pyyaml", "mlflow")
    return [f"{n}=={md.version(n)}" for n in names]


def save_packed_model(
    path: Path, run_dir: Path, input_shape: tuple[int, ...], mlflow_model: Any = None
) -> None:
    """Write the pyfunc model directory for the packed model in ``run_dir`` (``mlflow_model``:
    the ``MLmodel`` metadata of a logged model, which links the directory to it)."""
    from qpacknet.layout import CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE

    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={
            PACKED: str(run_dir / MODEL_FILE),
            CHECKPOINT: str(run_dir / CHECKPOINT_FILE),
            CONFIG: str(run_dir / CONFIG_FILE),
        },
        signature=_signature(input_shape),
        input_example=(np.zeros((1, *input_shape), dtype=np.float32), {"task": 0}),
        pip_requirements=_requirements(),
        mlflow_model=mlflow_model,
    )
