"""Task data through Ray's object store as numpy arrays.

Ray stores numpy arrays without pickling them, torch tensors are pickled. Reproduce with
``qpacknet run --preset pmnist-quick --executor ray`` and compare ``seconds_by_stage["data"]``
in results.json: on the 2-core dev VM it fell from 13.5 s (torch tensors) to 6.9 s (numpy) over
10 tasks. The actor copies the arrays once into its own memory: training straight from the
read-only object-store memory made SEARCH and TRAIN about 30 % slower in the same comparison
(search 33.7 s / train 29.2 s vs 27.5 s / 22.7 s).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qpacknet.scenarios.base import Split

_SPLITS = ("train", "val")


def pack_splits(train: Split, val: Split) -> dict[str, Any]:
    """A task's train and validation splits as plain numpy arrays (CPU); the test split
    stays with the driver, which alone evaluates the packed model."""
    out: dict[str, Any] = {}
    for name, part in zip(_SPLITS, (train, val), strict=True):
        out[f"{name}.x"] = part.x.detach().cpu().numpy()
        out[f"{name}.y"] = part.y.detach().cpu().numpy()
    return out


def unpack_splits(packed: dict[str, Any]) -> tuple[Split, Split]:
    """``(train, val)`` back, copied once out of the read-only object-store memory into the
    worker's own (batch gathers from shared memory measured slower)."""

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, copy=True))

    train, val = (Split(tensor(packed[f"{s}.x"]), tensor(packed[f"{s}.y"])) for s in _SPLITS)
    return train, val
