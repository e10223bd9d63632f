"""``qpacknet predict``: classes (and, without ``--task``, the inferred task) for new inputs.

The model is a packed file (``model.safetensors`` or the run directory holding it) or a
registered MLflow version. Inputs are raw, as the user has them (an ``.npz``/``.npy`` array, an
image file, or a folder of image files in name order); each task's preparation recorded in the
model file (:mod:`qpacknet.preparation`) turns them into network inputs, so neither the data set
nor the run's config is needed. A file written before preparations were recorded takes
prepared float inputs, as does ``--prepared``.

Task ids are 0-based, as in the served model's ``params.task`` and in
:meth:`qpacknet.model.PackedModel.predict`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpacknet.errors import DataError, UsageError
from qpacknet.fileio import atomic_write_text
from qpacknet.layout import MODEL_FILE
from qpacknet.model import PackedModel
from qpacknet.preparation import Preparation, of_store, task_inputs
from qpacknet.recognise import Recognition, choose, infer_tasks, under_task

# seconds and retries for each request to a tracking server: an unreachable one fails in
# seconds instead of MLflow's default minutes
HTTP_TIMEOUT_S = 10
HTTP_RETRIES = 1


def run(args: argparse.Namespace) -> int:
    """``qpacknet predict`` (arguments from :mod:`qpacknet.cli`); bad input raises a
    UsageError, which the CLI turns into one message and exit code 2."""
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"--out {out}: name a .csv or a .json file")
    started = time.perf_counter()
    model = load_model(args.model, args.tracking_uri)
    if args.task is not None and not 0 <= args.task < model.num_tasks:
        raise UsageError(
            f"--task {args.task}: the model holds tasks 0..{model.num_tasks - 1} (0-based)"
        )
    preps = None if args.prepared else of_store(model.store, args.model)
    if preps is None and not args.prepared:
        print(
            f"qpacknet: note: {args.model} records no input preparation (written before "
            "qpacknet recorded one): inputs are taken as prepared float network inputs of "
            f"shape {list(model.input_shape)}",
            file=sys.stderr,
        )
    names, x = read_inputs(Path(args.input), preps[0] if preps else None)
    if preps is not None:
        _warn_if_scaled(x, preps[0])
    inputs = task_inputs(preps, x, model.input_shape)
    method = None
    if args.task is not None:
        found = under_task(model, args.task, inputs(args.task))
    else:
        try:
            method = choose(model, getattr(args, "recogniser", None), str(args.model))
        except ValueError as exc:
            raise UsageError(f"--recogniser: {exc}") from None
        found = infer_tasks(model, inputs, method)
    rows = _rows(names, found)
    seconds = time.perf_counter() - started
    if out is None:
        sys.stdout.write(_csv(rows))
    else:
        _write(out, rows)
    print(
        _summary(len(rows), model.num_tasks, args.task, found, seconds, out, method),
        file=sys.stderr if out is None else sys.stdout,
    )
    return 0


def load_model(spec: str, tracking_uri: str | None) -> PackedModel:
    """A packed file, a run directory holding one, or a registered version (downloaded)."""
    if spec.startswith(("models:/", "runs:/")):
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise UsageError(
                f"--model {spec} needs the registry that holds it: pass --tracking-uri URI or "
                "set MLFLOW_TRACKING_URI (a local run's store is sqlite:///<out>/mlflow.db)"
            )
        from qpacknet.tracking.client import configure_http
        from qpacknet.tracking.learn import fetch

        configure_http(HTTP_TIMEOUT_S, HTTP_RETRIES)
        with tempfile.TemporaryDirectory(prefix="qpacknet-predict-") as tmp:
            return PackedModel.load(fetch(spec, uri, Path(tmp)).model_file)
    path = Path(spec)
    if path.is_dir():
        path = path / MODEL_FILE
    return PackedModel.load(path)


def read_inputs(path: Path, prep: Preparation | None) -> tuple[list[int | str], torch.Tensor]:
    """``(names, inputs [N, ...])``: row numbers for an array, file names for images."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not path.exists():
        raise DataError(f"--input {path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise DataError(
                f"--input {path}: the folder holds no image files "
                f"({', '.join(sorted(IMG_EXTENSIONS))})"
            )
        names: list[int | str] = [p.name for p in files]
        return names, _images(files, prep)
    if path.suffix.lower() in IMG_EXTENSIONS:
        return [str(path.name)], _images([path], prep)
    if path.suffix.lower() not in (".npz", ".npy"):
        raise DataError(f"--input {path}: give an .npz or .npy array, an image, or a folder")
    array = _array(path)
    if array.ndim < 2:
        raise DataError(
            f"--input {path}: the array has shape {list(array.shape)}; give one input per row "
            "([N, ...])"
        )
    return list(range(len(array))), torch.from_numpy(np.ascontiguousarray(array))


def _array(path: Path) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"--input {path}: not a readable {path.suffix} file ({exc})") from None
    if isinstance(loaded, np.ndarray):
        array = loaded
    else:
        with loaded:
            keys = list(loaded.files)
            if "x" in keys:
                array = loaded["x"]
            elif len(keys) == 1:
                array = loaded[keys[0]]
            else:
                raise DataError(
                    f"--input {path}: holds arrays {keys}; name the inputs 'x' or keep one array"
                )
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"--input {path}: inputs must be numbers, not {array.dtype}")
    return array


def _images(files: list[Path], prep: Preparation | None) -> torch.Tensor:
    """Image files decoded as the scenario decodes its own (grey for one-channel and
    feature models, else RGB; resized and cropped where the scenario does that at decode
    time), each conformed to the model's shape."""
    from qpacknet.scenarios.folders import load_image
    from qpacknet.scenarios.images import decode_images

    if prep is None:
        raise DataError(
            "this model records no input preparation, so image files cannot be prepared for "
            "it; give prepared float inputs in an .npz file"
        )
    grey = prep.kind == "features" or prep.shape[0] == 1
    images = []
    for f in files:
        if prep.resize == "shorter_side_crop":
            img = decode_images([f], mode="L" if grey else "RGB", size=prep.shape[1])[0][0]
        else:
            img = load_image(f)
            if not grey and img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            if grey and img.shape[0] != 1:
                raise DataError(f"{f}: a colour image, but this model takes grey ones")
        images.append(prep.conform(img.unsqueeze(0)))
    return torch.cat(images)


def _warn_if_scaled(x: torch.Tensor, prep: Preparation) -> None:
    """Pixel models given values in [0, 1] are most likely given pre-scaled images."""
    if prep.dtype == "uint8" and x.is_floating_point() and x.numel() and float(x.max()) <= 1.0:
        print(
            f"qpacknet: warning: the inputs lie in [0, 1] but this model's raw inputs are "
            f"{prep.describe()}; pass pixel values 0..255, or --prepared for network inputs",
            file=sys.stderr,
        )


def _rows(names: list[int | str], found: Recognition) -> list[dict[str, Any]]:
    return [
        {"input": name, "class": int(c), "task": int(t), "confidence": round(float(p), 6)}
        for name, c, t, p in zip(
            names,
            found.prediction.tolist(),
            found.task.tolist(),
            found.confidence.tolist(),
            strict=True,
        )
    ]


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["input", "class", "task", "confidence"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write(out: Path, rows: list[dict[str, Any]]) -> None:
    if out.suffix.lower() == ".csv":
        text = _csv(rows)
    else:
        text = "[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n"
    try:
        atomic_write_text(out, text)  # never a half-written predictions file
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None


def _summary(
    n: int,
    num_tasks: int,
    task: int | None,
    found: Recognition,
    seconds: float,
    out: Path | None,
    method: str | None = None,
) -> str:
    where = f"; wrote {out}" if out is not None else ""
    if task is not None:
        return f"{n} inputs, task {task} given (model holds {num_tasks}), {seconds:.2f} s{where}"
    counts = Counter(found.task.tolist())
    spread = ", ".join(f"task {t}: {counts[t]}" for t in sorted(counts))
    return (
        f"{n} inputs, tasks inferred by the {method} recogniser over {num_tasks} tasks "
        f"({spread}), "
        f"{seconds:.2f} s{where}"
    )
