"""Task data through Ray's object store as numpy arrays, for streams that cannot send a worker
copy of themselves (:meth:`TaskStream.for_workers`; p-MNIST, digits and the image streams can,
and skip this).

Ray stores numpy arrays without pickling them; torch tensors are pickled. The actor copies the
arrays once into its own memory rather than training from the read-only object-store pages.
Both choices were measured (data stage and SEARCH/TRAIN times of ``pmnist-quick``) when every
stream still came this way, in commit b7f558e; p-MNIST no longer takes this path, so no
benchmark in the repo reproduces those figures today. Compact splits travel as they are: uint8
images plus their per-channel mean and std, a quarter of the float32 bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qpacknet.scenarios.base import Split

_SPLITS = ("train", "val")
_FIELDS = ("x", "y", "mean", "std")


def _pack(split: Split, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in _FIELDS:
        value = getattr(split, field)
        if value is not None:
            out[prefix + field] = value.detach().cpu().numpy()
    return out


def _unpack(packed: dict[str, Any], prefix: str = "") -> Split:
    """Copied once out of the read-only object-store memory into the worker's own (batch
    gathers from shared memory measured slower)."""
    values = {
        field: torch.from_numpy(np.array(packed[prefix + field], copy=True))
        for field in _FIELDS
        if prefix + field in packed
    }
    return Split(**values)


def pack_splits(train: Split, val: Split) -> dict[str, Any]:
    """A task's train and validation splits as plain numpy arrays (CPU; uint8 images stay
    uint8, with their mean and std); the test split travels separately (:func:`pack_split`),
    once, to the evaluation actor."""
    out: dict[str, Any] = {}
    for name, part in zip(_SPLITS, (train, val), strict=True):
        out |= _pack(part, f"{name}.")
    return out


def pack_split(split: Split) -> dict[str, Any]:
    """One split (a task's test split for the evaluation actor) as numpy arrays."""
    return _pack(split)


def unpack_split(packed: dict[str, Any]) -> Split:
    """A :func:`pack_split` split back, copied out of the read-only object-store memory."""
    return _unpack(packed)


def unpack_splits(packed: dict[str, Any]) -> tuple[Split, Split]:
    """``(train, val)`` back, copied once out of the read-only object-store memory."""
    train, val = (_unpack(packed, f"{s}.") for s in _SPLITS)
    return train, val
