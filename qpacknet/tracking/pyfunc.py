"""The packed model as an MLflow ``pyfunc`` model, so that any MLflow tool can serve it.

``predict(images, params={"task": t})`` returns task ``t``'s predicted class per image, exactly
as :meth:`qpacknet.model.PackedModel.predict` does: the model directory carries the packed file
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
    """Class ids for ``model_input`` under task ``params["task"]``.

    Attached after the class body on purpose: MLflow inspects a ``predict`` defined in a
    PythonModel subclass for type hints, which would replace the explicit signature (a float32
    tensor plus a ``task`` parameter), and warns on every import when there are none."""
    import torch

    task = int((params or {}).get("task", 0))
    n_tasks = self.model.num_tasks
    if not 0 <= task < n_tasks:
        raise ValueError(f"params.task={task}: this model holds tasks 0..{n_tasks - 1}")
    x = _inputs(model_input)
    shape = self.model.input_shape
    per_item = int(np.prod(shape))
    if x.ndim == 0 or x.size != len(x) * per_item:
        raise ValueError(
            f"each input must have {per_item} values (shape {shape}); got array of "
            f"shape {tuple(x.shape)}"
        )
    batch = torch.from_numpy(np.ascontiguousarray(x).reshape(len(x), *shape))
    return self.model.predict(task, batch).numpy()


PackedPyfunc.predict = _predict  # type: ignore[method-assign]


def _signature(input_shape: tuple[int, ...]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
        params=ParamSchema([ParamSpec("task", "long", 0)]),
    )


def _requirements() -> list[str]:
    import importlib.metadata as md

    names = ("torch", "numpy", "safetensors", "pydantic", "pyyaml", "mlflow")
    return [f"{n}=={md.version(n)}" for n in names]


def save_packed_model(path: Path, run_dir: Path, input_shape: tuple[int, ...]) -> None:
    """Write the pyfunc model directory for the packed model in ``run_dir``."""
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
    )
