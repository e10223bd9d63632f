"""A bit-for-bit digest of one committed task (DESIGN.md §2 COMMIT, §4).

Why: the driver must not depend on two devices agreeing on a float (DESIGN.md §4). Instead of
comparing accuracies, the worker digests what it quantised and the driver, after
:meth:`~qpacknet.store.PackedStore.commit`, digests what the store now holds for the task, as read
back from the 32-bit words (:meth:`~qpacknet.store.PackedStore.parts`). Equal digests mean the
committed task is exactly what the worker produced; one flipped bit anywhere changes the digest.

Canonical encoding (SHA-256, version tag ``qpacknet-task-digest/1``). Every tensor is taken
``.detach().cpu()`` in row-major (contiguous) order with little-endian element bytes, so the
device, strides and host byte order of the input do not matter. Per kind:

``mask`` (and ``shared``)
    must be ``torch.bool``; one byte 0/1 per weight, with the mask's shape.
``codes``
    any integer dtype (not bool, not float: a float code is refused, never rounded); encoded as
    ``int64``. The worker's codes are ``int64`` (k-means ``searchsorted``), the store's
    :meth:`~qpacknet.store.PackedStore.codes` returns ``int64`` read from the words, and any
    narrower integer tensor holding the same values (e.g. ``uint8``) hashes the same.
``codebook``
    must be ``torch.float32`` (what the store accepts and keeps); raw IEEE bits, so ``-0.0`` and
    ``0.0`` differ and the lowest mantissa bit counts.
``state``
    the task's head and normalisation tensors in their own dtype (the store and the model file
    keep them as given), raw bytes, the dtype name hashed alongside; bool as 0/1 bytes.
``shared``
    ``None`` and masks that are all False in every layer hash identically (the section is
    omitted): :meth:`PackedStore.commit` records such a task as not sharing, and
    :meth:`PackedStore.shared` then answers all-False masks, so the store cannot tell the two
    apart and neither does the digest.

Layout: the tag, ``bit_width`` as 8 bytes (with per-layer widths that differ: 0, then the
tag ``widths``, the layer count and each layer's name and width in sorted name order; widths
that are all equal hash as that one width, as the store cannot tell them apart), then the
sections ``mask``, ``codes``, ``codebook``,
``state`` and (if present) ``shared``, each as its kind and entry count, followed by its entries in
sorted key order; an entry is its kind, key, canonical dtype name, ``ndim``, the dims and the byte
count, all length-prefixed (8-byte little-endian integers), then the bytes. The prefixes make the
encoding unambiguous: no two different inputs produce the same byte stream.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qpacknet.errors import StoreError

DIGEST_TAG = b"qpacknet-task-digest/1"
_BIG_ENDIAN = sys.byteorder == "big"


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "little", signed=True)


def _field(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _u64(len(raw)) + raw


def _le_bytes(tensor: torch.Tensor) -> bytes:
    """Row-major little-endian bytes of a CPU tensor whatever its strides or the host order."""
    flat = tensor.resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    if flat.dtype.is_complex:
        flat = torch.view_as_real(flat).reshape(-1)
    raw = flat.view(torch.uint8)
    size = flat.element_size()
    if _BIG_ENDIAN and size > 1:
        raw = raw.view(-1, size).flip(1).reshape(-1)
    return raw.numpy().tobytes()


def _canonical(kind: str, key: str, tensor: object) -> tuple[str, torch.Tensor]:
    """The canonical dtype name and CPU tensor for one entry; refuses what cannot be committed."""
    if not isinstance(tensor, torch.Tensor):
        raise StoreError(f"digest: {kind} {key!r} must be a tensor, got {type(tensor).__name__}")
    t = tensor.detach().cpu()
    if kind in ("mask", "shared"):
        if t.dtype != torch.bool:
            raise StoreError(f"digest: {kind} {key!r} must be a bool tensor, got {t.dtype}")
        return "bool", t.to(torch.uint8)
    if kind == "codes":
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise StoreError(f"digest: codes {key!r} must be integers, got {t.dtype}")
        return "int64", t.to(torch.int64)
    if kind == "codebook":
        if t.dtype != torch.float32:
            raise StoreError(f"digest: codebook {key!r} must be float32, got {t.dtype}")
        return "float32", t
    name = str(t.dtype).removeprefix("torch.")
    return name, t.to(torch.uint8) if t.dtype == torch.bool else t


def _section(hasher: hashlib._Hash, kind: str, entries: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(entries, Mapping):
        raise StoreError(f"digest: {kind} must be a dict of tensors keyed by name")
    keys = list(entries)
    for key in keys:
        if not isinstance(key, str):
            raise StoreError(f"digest: {kind} keys must be strings, got {key!r}")
    hasher.update(_field(kind) + _u64(len(keys)))
    for key in sorted(keys):
        dtype, t = _canonical(kind, key, entries[key])
        data = _le_bytes(t)
        head = [_field(kind), _field(key), _field(dtype), _u64(t.dim())]
        head += [_u64(d) for d in t.shape]
        head.append(_u64(len(data)))
        hasher.update(b"".join(head))
        hasher.update(data)


def _shares_any(shared: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``shared`` marks any weight; all-False masks mean "no sharing" (see above)."""
    if not isinstance(shared, Mapping):
        raise StoreError("digest: shared must be None or a dict of bool masks keyed by layer")
    return any(bool(_canonical("shared", k, m)[1].any()) for k, m in shared.items())


def task_digest(
    bit_width: int | Mapping[str, int],
    masks: Mapping[str, torch.Tensor],
    codes: Mapping[str, torch.Tensor],
    codebooks: Mapping[str, torch.Tensor],
    task_state: Mapping[str, torch.Tensor],
    shared: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """SHA-256 hex (64 chars) of a task's commit arguments in the canonical encoding above.

    Compare the worker's digest of what it quantised with ``store.parts(t).digest()`` after
    COMMIT (DESIGN.md §2): equal exactly when the store holds the same bits. Raises
    :class:`StoreError` for inputs the store would refuse in a way the digest could hide
    (non-bool masks, float codes, non-float32 codebooks, non-string keys).
    """
    hasher = hashlib.sha256(DIGEST_TAG)
    _widths(hasher, bit_width)
    _section(hasher, "mask", masks)
    _section(hasher, "codes", codes)
    _section(hasher, "codebook", codebooks)
    _section(hasher, "state", task_state)
    if shared is not None and _shares_any(shared):
        _section(hasher, "shared", shared)
    return hasher.hexdigest()


def _widths(hasher: Any, bit_width: int | Mapping[str, int]) -> None:
    if isinstance(bit_width, Mapping) and not bit_width:
        raise StoreError("digest: per-layer bit widths must name at least one layer")
    widths = dict(bit_width) if isinstance(bit_width, Mapping) else {"": bit_width}
    for width in widths.values():
        if isinstance(width, bool) or not isinstance(width, int):
            raise StoreError(f"digest: bit_width must be an int, got {width!r}")
    distinct = set(widths.values())
    if len(distinct) <= 1:
        hasher.update(_u64(distinct.pop() if distinct else 0))
        return
    hasher.update(_u64(0) + _field("widths") + _u64(len(widths)))
    for name in sorted(widths):
        if not isinstance(name, str):
            raise StoreError(f"digest: layer names must be strings, got {name!r}")
        hasher.update(_field(name) + _u64(widths[name]))


@dataclass(frozen=True, eq=False)
class TaskParts:
    """What COMMIT writes for one task (DESIGN.md §2): the arguments of
    :meth:`PackedStore.commit`, or what :meth:`PackedStore.parts` reads back. Compare two by
    :meth:`digest` (tensors have no plain ``==``)."""

    bit_width: int | Mapping[str, int]
    masks: Mapping[str, torch.Tensor]
    codes: Mapping[str, torch.Tensor]
    codebooks: Mapping[str, torch.Tensor]
    task_state: Mapping[str, torch.Tensor]
    shared: Mapping[str, torch.Tensor] | None = None

    def digest(self) -> str:
        """:func:`task_digest` of these parts."""
        return task_digest(
            self.bit_width, self.masks, self.codes, self.codebooks, self.task_state, self.shared
        )
