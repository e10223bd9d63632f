"""Bit packing for the saved model file (DESIGN.md §2, "Metrics", saved-file paragraph).

The file stores each task's owned-weight codes back to back at ``b_t`` bits and each mask as a
bitset, so that its size follows what the tasks really use rather than 32 bits per weight. These
helpers do that packing with whole-tensor operations (no Python loop over weights); large inputs
are processed in chunks so the temporary one-byte-per-bit expansion stays small.

Bit order is LSB-first throughout: value ``i`` occupies stream bits ``[i*width, (i+1)*width)``,
its least significant bit first, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``. The last
byte is padded with zero bits.
"""

from __future__ import annotations

import math

import torch

MAX_WIDTH = 32
_CHUNK_VALUES = 1 << 16
_BYTE_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.int64)


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"bit width must be an int in 1..{MAX_WIDTH}, got {width!r}")


def packed_nbytes(count: int, width: int) -> int:
    """Bytes that ``count`` values of ``width`` bits occupy once packed (padded to a byte)."""
    return math.ceil(count * width / 8)


def _bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D 0/1 uint8 stream into bytes, LSB-first, zero-padding the last byte."""
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weighted = bits.view(-1, 8).to(torch.int64) * _BYTE_WEIGHTS
    return weighted.sum(dim=1).to(torch.uint8)


def _bytes_to_bits(data: torch.Tensor) -> torch.Tensor:
    """Expand bytes into a 1-D 0/1 uint8 stream, LSB-first (inverse of :func:`_bits_to_bytes`)."""
    shifts = torch.arange(8, dtype=torch.int64)
    return ((data.to(torch.int64).unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack unsigned integers of ``width`` bits back to back into a uint8 tensor.

    Raises ``ValueError`` for a width outside 1..32, a non-integer tensor, or any value that
    does not fit (negative or ``>= 2**width``): silently truncating a code would change a frozen
    task's function (DESIGN.md §2, COMMIT).
    """
    _check_width(width)
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"pack_bits needs an integer tensor, got dtype {values.dtype}")
    flat = values.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << width):
        raise ValueError(
            f"values must lie in [0, 2**{width}) = [0, {1 << width}), "
            f"got min {int(flat.min())}, max {int(flat.max())}"
        )
    shifts = torch.arange(width, dtype=torch.int64)
    chunks = []
    # A multiple of 8 values fills whole bytes, so chunks concatenate without re-alignment.
    for start in range(0, flat.numel(), _CHUNK_VALUES):
        part = flat[start : start + _CHUNK_VALUES]
        bits = ((part.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
        chunks.append(_bits_to_bytes(bits))
    if not chunks:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(chunks)


def unpack_bits(data: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Read ``count`` values of ``width`` bits from a :func:`pack_bits` stream, as int64.

    Raises ``ValueError`` when ``data`` is not a 1-D uint8 tensor or holds fewer than
    ``ceil(count*width/8)`` bytes; trailing bytes beyond that are ignored.
    """
    _check_width(width)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(
            f"packed data must be a 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}"
        )
    need = packed_nbytes(count, width)
    if data.numel() < need:
        raise ValueError(
            f"{count} values of {width} bits need {need} bytes, only {data.numel()} given"
        )
    data = data.detach().to("cpu")
    weights = torch.tensor([1 << i for i in range(width)], dtype=torch.int64)
    out = torch.empty(count, dtype=torch.int64)
    # Each chunk of _CHUNK_VALUES values starts on a byte boundary (the chunk is a multiple of 8).
    for start in range(0, count, _CHUNK_VALUES):
        n = min(_CHUNK_VALUES, count - start)
        first = start * width // 8
        nbytes = packed_nbytes(n, width)
        bits = _bytes_to_bits(data[first : first + nbytes])[: n * width]
        out[start : start + n] = (bits.view(n, width).to(torch.int64) * weights).sum(dim=1)
    return out


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask (flattened row-major) into a uint8 bitset, one bit per weight."""
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_mask needs a bool tensor, got dtype {mask.dtype}")
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return _bits_to_bytes(flat)


def unpack_mask(data: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Rebuild a boolean mask of ``shape`` from a :func:`pack_mask` bitset."""
    count = math.prod(shape)
    if count == 0:
        return torch.zeros(tuple(shape), dtype=torch.bool)
    return unpack_bits(data, 1, count).to(torch.bool).reshape(tuple(shape))
