"""CIFAR-10 / CIFAR-100 from the official "python version" pickles, and split CIFAR-100.

The file layout and names come from ``torchvision.datasets.CIFAR10`` / ``CIFAR100``, but the
pickles are read here: torchvision's constructors insist on the md5 of every file (hashing
180 MB on each run, and rejecting any data that is not byte-identical to the release) and
only accept ``str`` keys, while pickles re-saved under Python 3 carry ``bytes`` keys
(``b'data'``). Both key kinds are accepted; anything else is reported as a damaged file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from qpacknet.errors import DataError
from qpacknet.scenarios.images import (
    ArraySource,
    ImageSource,
    ImageStream,
    class_split_check,
    data_dir_hint,
    listing,
)

CIFAR10_FOLDER: str = CIFAR10.base_folder
CIFAR10_TRAIN: tuple[str, ...] = tuple(name for name, _ in CIFAR10.train_list)
CIFAR10_TEST: tuple[str, ...] = tuple(name for name, _ in CIFAR10.test_list)
CIFAR100_FOLDER: str = CIFAR100.base_folder
CIFAR100_TRAIN: str = CIFAR100.train_list[0][0]
CIFAR100_TEST: str = CIFAR100.test_list[0][0]
CIFAR100_META: str = CIFAR100.meta["filename"]
CIFAR100_FILES: tuple[str, ...] = (CIFAR100_TRAIN, CIFAR100_TEST, CIFAR100_META)
CIFAR100_CLASSES = 100
PIXELS = 3 * 32 * 32

CifarArrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def cifar10_files() -> tuple[str, ...]:
    return (*CIFAR10_TRAIN, *CIFAR10_TEST)


def missing(folder: Path, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not (folder / name).is_file()]


def cifar100_missing_error(root: Path, absent: list[str]) -> DataError:
    folder = Path(root) / CIFAR100_FOLDER
    entries = [(name, name not in absent) for name in CIFAR100_FILES]
    return DataError(
        f"CIFAR-100 not found: {len(absent)} of its {len(CIFAR100_FILES)} files are missing "
        f"from {folder}/.\n"
        f"Put the python version of CIFAR-100 there, so that {folder}/ holds:\n"
        f"{listing(entries)}\n"
        f"Download {CIFAR100.url} and unpack it into {Path(root)}/ "
        f"(it unpacks to {CIFAR100_FOLDER}/).\n" + data_dir_hint(f"{CIFAR100_FOLDER}/")
    )


def _damaged(path: Path, dataset: str, url: str, reason: str) -> DataError:
    return DataError(
        f"{dataset} file {path} is damaged: {reason}. Delete it and unpack {url} again "
        f"into {path.parent.parent}/."
    )


def _unpickle(path: Path, dataset: str, url: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except OSError as exc:
        raise DataError(f"cannot read {dataset} file {path}: {exc}") from exc
    except Exception as exc:
        raise _damaged(path, dataset, url, f"not a readable pickle ({exc!r})") from exc
    if not isinstance(entry, dict):
        raise _damaged(path, dataset, url, f"holds a {type(entry).__name__}, not a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in entry.items()}


def read_batch(
    path: Path, label_key: str, num_classes: int, dataset: str, url: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle: ``data`` (uint8 ``[N, 3072]``, red, green, blue planes of 32×32) and the
    labels under ``label_key``; returns uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``."""
    entry = _unpickle(path, dataset, url)
    for key in ("data", label_key):
        if key not in entry:
            raise _damaged(path, dataset, url, f"no {key!r} entry (it has {sorted(entry)})")
    data = np.asarray(entry["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise _damaged(
            path, dataset, url, f"data is {data.dtype} {list(data.shape)}, not uint8 [N, {PIXELS}]"
        )
    labels = np.asarray(entry[label_key])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise _damaged(path, dataset, url, f"{len(labels)} labels for {data.shape[0]} images")
    if not np.issubdtype(labels.dtype, np.integer) and labels.size:
        raise _damaged(path, dataset, url, f"labels of type {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise _damaged(
            path, dataset, url, f"label {int(labels.max())} outside 0..{num_classes - 1}"
        )
    x = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(labels.astype(np.int64))


def _read_all(
    folder: Path, names: tuple[str, ...], label_key: str, classes: int, dataset: str, url: str
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_batch(folder / name, label_key, classes, dataset, url) for name in names]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def load_cifar10(root: Path) -> CifarArrays:
    """``(x_train, y_train, x_test, y_test)`` from ``<root>/cifar-10-batches-py``; images uint8
    ``[N, 3, 32, 32]``, labels int64 0..9. The caller checks for missing files first."""
    folder = Path(root) / CIFAR10_FOLDER
    train = _read_all(folder, CIFAR10_TRAIN, "labels", 10, "CIFAR-10", CIFAR10.url)
    test = _read_all(folder, CIFAR10_TEST, "labels", 10, "CIFAR-10", CIFAR10.url)
    return train[0], train[1], test[0], test[1]


def load_cifar100(
    root: Path,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """``(x_train, y_train, x_test, y_test, class_names)`` from ``<root>/cifar-100-python``,
    fine labels 0..99; a DataError lists what is missing."""
    root = Path(root)
    folder = root / CIFAR100_FOLDER
    absent = missing(folder, CIFAR100_FILES)
    if absent:
        raise cifar100_missing_error(root, absent)
    url = CIFAR100.url
    train_x, train_y = read_batch(
        folder / CIFAR100_TRAIN, "fine_labels", CIFAR100_CLASSES, "CIFAR-100", url
    )
    test_x, test_y = read_batch(
        folder / CIFAR100_TEST, "fine_labels", CIFAR100_CLASSES, "CIFAR-100", url
    )
    meta = _unpickle(folder / CIFAR100_META, "CIFAR-100", url)
    names = meta.get("fine_label_names")
    if not isinstance(names, list) or len(names) != CIFAR100_CLASSES:
        raise _damaged(
            folder / CIFAR100_META, "CIFAR-100", url, "no list of 100 'fine_label_names'"
        )
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    return train_x, train_y, test_x, test_y, names


class SplitCIFAR100(ImageStream):
    """Split CIFAR-100 (DESIGN.md §3): task t holds classes ``t·k .. t·k + k - 1`` (k =
    ``classes_per_task``, 10 in the paper) in ascending order, relabelled ``0..k-1``.

    The whole uint8 data set (180 MB) stays in memory; a task's splits are built when asked.
    ``val_fraction`` of each task's 500·k training images are held out, seeded per task. The
    worker copy (:meth:`ImageStream.for_workers`) carries only the run's tasks' images.
    """

    name = "cifar100"
    input_shape = (3, 32, 32)
    _key = "cifar100"
    _bulk = ("_train_x", "_train_y", "_test_x", "_test_y")

    def __init__(
        self,
        root: Path,
        num_tasks: int = 10,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        device: torch.device | str = "cpu",
        classes_per_task: int = 10,
    ) -> None:
        class_split_check(
            "split CIFAR-100", num_tasks, classes_per_task, CIFAR100_CLASSES, "CIFAR-100"
        )
        super().__init__(
            num_tasks=num_tasks,
            val_fraction=val_fraction,
            seed=seed,
            train_limit=train_limit,
            device=device,
        )
        self.root = Path(root)
        self._use_classes(range(CIFAR100_CLASSES), classes_per_task)
        self._train_x, self._train_y, self._test_x, self._test_y, self.class_names = load_cifar100(
            self.root
        )

    def _load(self, index: int) -> tuple[ImageSource, ImageSource]:
        first = self.task_classes(index)[0]

        def part(x: torch.Tensor, y: torch.Tensor) -> ArraySource:
            rows = ((y >= first) & (y < first + self.classes_per_task)).nonzero().flatten()
            return ArraySource(x[rows], y[rows] - first)

        return part(self._train_x, self._train_y), part(self._test_x, self._test_y)
