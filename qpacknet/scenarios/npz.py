"""The user's own task stream: one ``.npz`` file per task in a folder, learned in name order.

Each file holds ``x`` (``[N, ...]``, any numeric dtype; uint8 images are scaled to [0, 1]) and
``y`` (integer labels ``0..C-1``), and optionally ``x_val``/``y_val`` and ``x_test``/``y_test``.
Missing validation or test splits are held out of ``x``/``y`` (seeded, per task). Labels are
checked for every file when the stream is opened, so a bad file fails before any training;
shapes are checked when a task is loaded. Adding a file to the folder makes a next task that
``qpacknet learn`` (or a resumed run with more tasks) can learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qpacknet.errors import DataError
from qpacknet.preparation import Preparation
from qpacknet.scenarios.base import Split, TaskData, TaskStream, check_stream_args, holdout_split

_PAIRS = (("x", "y"), ("x_val", "y_val"), ("x_test", "y_test"))


class NpzStream(TaskStream):
    """Tasks from ``root/*.npz``; ``num_classes`` is the largest label over all files + 1."""

    name = "npz"

    def __init__(
        self,
        root: Path,
        num_tasks: int,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        check_stream_args(num_tasks, train_limit, val_fraction)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(
                f"scenario.path {str(self.root)!r} is not a folder; put one .npz file per "
                "task there (arrays x and y, optionally x_val/y_val and x_test/y_test)"
            )
        self.files = sorted(self.root.glob("*.npz"))
        if not self.files:
            raise DataError(
                f"no .npz files in {self.root}; write one per task, e.g. "
                "numpy.savez('task-000.npz', x=images, y=labels)"
            )
        if num_tasks > len(self.files):
            raise DataError(
                f"scenario.num_tasks={num_tasks} but {self.root} holds {len(self.files)} "
                ".npz files; add files or lower num_tasks"
            )
        self._num_tasks = num_tasks
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_limit = train_limit
        self.device = torch.device(device)
        self.num_classes = 1 + max(self._max_label(f) for f in self.files[:num_tasks])
        self.input_shape = self._shape(self.files[0])
        self._cache: dict[int, TaskData] = {}
        self._tests: dict[int, Split] = {}
        self._dtypes: dict[int, np.dtype] = {}

    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    def _open(self, path: Path) -> np.lib.npyio.NpzFile:
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path} is not a readable .npz file ({exc})") from None

    def _max_label(self, path: Path) -> int:
        with self._open(path) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"{path} must hold arrays 'x' and 'y' (it has {sorted(f.files)})")
            top = -1
            for _, ykey in _PAIRS:
                if ykey in f:
                    y = f[ykey]
                    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
                        raise DataError(f"{path}: {ykey} must be a 1-D integer array")
                    if y.size and y.min() < 0:
                        raise DataError(
                            f"{path}: {ykey} has label {int(y.min())}; labels start at 0"
                        )
                    top = max(top, int(y.max()) if y.size else -1)
            return top

    def _shape(self, path: Path) -> tuple[int, ...]:
        with self._open(path) as f:
            return tuple(int(d) for d in f["x"].shape[1:])

    def _split(self, path: Path, x: np.ndarray, y: np.ndarray, which: str) -> Split:
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{path}: {which} has {x.shape[0]} inputs but {y.shape[0]} labels")
        if tuple(x.shape[1:]) != self.input_shape:
            raise DataError(
                f"{path}: {which} inputs have shape {tuple(x.shape[1:])}, but the stream's "
                f"first task has {self.input_shape}; every task must have the same input shape"
            )
        if y.size and int(y.max()) >= self.num_classes:
            raise DataError(
                f"{path}: label {int(y.max())} is out of range 0..{self.num_classes - 1}"
            )
        xt = torch.from_numpy(np.ascontiguousarray(x))
        xt = xt.to(torch.float32) / 255.0 if x.dtype == np.uint8 else xt.to(torch.float32)
        return Split(xt, torch.from_numpy(y.astype(np.int64)))

    def task(self, index: int) -> TaskData:
        if not 0 <= index < self._num_tasks:
            raise IndexError(f"task {index} out of range 0..{self._num_tasks - 1}")
        if index in self._cache:
            return self._cache[index]
        path = self.files[index]
        with self._open(path) as f:
            arrays = {k: f[k] for k in f.files}
        x, y = arrays["x"], arrays["y"]
        self._dtypes[index] = x.dtype
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{path}: x has {x.shape[0]} inputs but {y.shape[0]} labels")
        rest_idx = np.arange(len(y))
        test = None
        if "x_test" in arrays:
            test = self._split(path, arrays["x_test"], arrays["y_test"], "x_test")
        else:
            keep, held = holdout_split(len(y), self.val_fraction, self.seed, f"npz-test-{index}")
            test = self._split(path, x[held.numpy()], y[held.numpy()], "held-out test")
            rest_idx = keep.numpy()
        if "x_val" in arrays:
            val = self._split(path, arrays["x_val"], arrays["y_val"], "x_val")
            train_idx = rest_idx
        else:
            keep, held = holdout_split(
                len(rest_idx), self.val_fraction, self.seed, f"npz-val-{index}"
            )
            val = self._split(
                path, x[rest_idx[held.numpy()]], y[rest_idx[held.numpy()]], "validation"
            )
            train_idx = rest_idx[keep.numpy()]
        if self.train_limit is not None:
            train_idx = train_idx[: self.train_limit]
        train = self._split(path, x[train_idx], y[train_idx], "x")
        present = set(train.y.unique().tolist())
        task_classes = set(range(int(train.y.max()) + 1)) if len(train) else set()
        empty = sorted(task_classes - present)
        if empty:
            raise DataError(
                f"{path}: classes {empty} have no training examples (labels must be 0..C-1 "
                "with every class present)"
            )
        data = TaskData(index, f"npz-{path.stem}", self.num_classes, train, val, test).to(
            self.device
        )
        self._cache = {index: data}
        self._tests[index] = data.test
        return data

    def test_split(self, index: int) -> Split:
        """Cached: old tasks' test splits are re-evaluated after every commit."""
        return self._tests[index] if index in self._tests else self.task(index).test

    def input_preparation(self, index: int) -> Preparation:
        """Raw input: a row of the task file's ``x``; uint8 is scaled to [0, 1], any other
        dtype only cast to float32, as :meth:`_split` does (no standardisation)."""
        if not 0 <= index < self._num_tasks:
            raise IndexError(f"task {index} out of range 0..{self._num_tasks - 1}")
        if index not in self._dtypes:
            with self._open(self.files[index]) as f:
                self._dtypes[index] = f["x"].dtype
        pixels = self._dtypes[index] == np.uint8
        return Preparation(
            kind="image" if len(self.input_shape) == 3 else "features",
            shape=self.input_shape,
            dtype="uint8" if pixels else "float",
            value_range=(0.0, 255.0) if pixels else None,
            scale=255.0 if pixels else None,
            scenario=self.name,
        )
