"""Task data through Ray's object store as numpy arrays.

Ray stores numpy arrays zero-copy (actors on the node map the same memory), while torch
tensors go through pickling: measured on the 2-core dev VM for one p-MNIST task (about 200 MB),
``ray.put`` of the torch tensors took about 1 s and the first read in a worker up to 4 s, the
numpy form a few milliseconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qpacknet.scenarios.base import Split, TaskData

_SPLITS = ("train", "val", "test")


def pack_task(data: TaskData) -> dict[str, Any]:
    """``data`` as plain numpy arrays plus its scalars (CPU)."""
    out: dict[str, Any] = {"index": data.index, "name": data.name, "num_classes": data.num_classes}
    for split in _SPLITS:
        part: Split = getattr(data, split)
        out[f"{split}.x"] = part.x.detach().cpu().numpy()
        out[f"{split}.y"] = part.y.detach().cpu().numpy()
    return out


def unpack_task(packed: dict[str, Any]) -> TaskData:
    """The :class:`TaskData` back, copied once out of the read-only object-store memory
    into the worker's own (batch gathers from shared memory measured slower)."""

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, copy=True))

    splits = {s: Split(tensor(packed[f"{s}.x"]), tensor(packed[f"{s}.y"])) for s in _SPLITS}
    return TaskData(packed["index"], packed["name"], packed["num_classes"], **splits)
