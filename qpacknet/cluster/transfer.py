"""Task data through Ray's object store as numpy arrays, for streams that cannot send a worker
copy of themselves (:meth:`TaskStream.for_workers`; p-MNIST and digits can, and skip this).

Ray stores numpy arrays without pickling them; torch tensors are pickled. The actor copies the
arrays once into its own memory rather than training from the read-only object-store pages.
Both choices were measured (data stage and SEARCH/TRAIN times of ``pmnist-quick``) when every
stream still came this way, in commit b7f558e; p-MNIST no longer takes this path, so no
benchmark in the repo reproduces those figures today.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qpacknet.scenarios.base import Split

_SPLITS = ("train", "val")


def pack_splits(train: Split, val: Split) -> dict[str, Any]:
    """A task's train and validation splits as plain numpy arrays (CPU); the test split
    travels separately (:func:`pack_split`), once, to the evaluation actor."""
    out: dict[str, Any] = {}
    for name, part in zip(_SPLITS, (train, val), strict=True):
        out[f"{name}.x"] = part.x.detach().cpu().numpy()
        out[f"{name}.y"] = part.y.detach().cpu().numpy()
    return out


def pack_split(split: Split) -> dict[str, Any]:
    """One split (a task's test split for the evaluation actor) as numpy arrays."""
    return {"x": split.x.detach().cpu().numpy(), "y": split.y.detach().cpu().numpy()}


def unpack_split(packed: dict[str, Any]) -> Split:
    """A :func:`pack_split` split back, copied out of the read-only object-store memory."""
    return Split(
        torch.from_numpy(np.array(packed["x"], copy=True)),
        torch.from_numpy(np.array(packed["y"], copy=True)),
    )


def unpack_splits(packed: dict[str, Any]) -> tuple[Split, Split]:
    """``(train, val)`` back, copied once out of the read-only object-store memory into the
    worker's own (batch gathers from shared memory measured slower)."""

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, copy=True))

    train, val = (Split(tensor(packed[f"{s}.x"]), tensor(packed[f"{s}.y"])) for s in _SPLITS)
    return train, val
