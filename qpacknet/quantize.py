"""Non-linear quantisation: 1-D k-means codebooks and the bit-width search (Algorithms 2-3).

k-means here is Lloyd's algorithm on sorted 1-D data with quantile initialisation: in one
dimension the clusters are contiguous intervals, so assignment is a ``searchsorted`` against
the midpoints between centroids. It is deterministic (no random restarts), runs on the
tensor's device and needs no scikit-learn call per layer and bit-width.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Codebook:
    """``centroids`` (float32, exactly ``2**bits`` long) and one code per quantised value."""

    centroids: torch.Tensor
    codes: torch.Tensor

    def values(self) -> torch.Tensor:
        return self.centroids[self.codes]


def kmeans_1d(values: torch.Tensor, bits: int, iters: int = 50) -> Codebook:
    """Quantise ``values`` (1-D) to ``2**bits`` centroids with Lloyd's algorithm.

    Centroids are kept sorted; when there are fewer distinct values than centroids, the
    surplus centroids repeat the last one (they are never used, but the codebook keeps its
    fixed length ``2**bits`` as eq. 10 counts it).
    """
    n_centroids = 1 << bits
    v = values.detach().flatten().to(torch.float64)
    if v.numel() == 0:
        return Codebook(
            torch.zeros(n_centroids, dtype=torch.float32, device=values.device),
            torch.zeros(0, dtype=torch.long, device=values.device),
        )
    sorted_v, _ = torch.sort(v)
    uniq = torch.unique(sorted_v)
    if uniq.numel() <= n_centroids:
        centroids = uniq
    else:
        q = (torch.arange(n_centroids, dtype=torch.float64, device=v.device) + 0.5) / n_centroids
        centroids = torch.unique(sorted_quantiles(sorted_v, q))
        for _ in range(iters):
            codes = _assign(sorted_v, centroids)
            sums = torch.zeros_like(centroids).scatter_add_(0, codes, sorted_v)
            counts = torch.zeros_like(centroids).scatter_add_(0, codes, torch.ones_like(sorted_v))
            new = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
            new, _ = torch.sort(new)
            if torch.equal(new, centroids):
                break
            centroids = new
    c32 = centroids.to(torch.float32)
    codes = _assign(v.to(torch.float32), c32)
    if c32.numel() < n_centroids:
        pad = c32[-1:].expand(n_centroids - c32.numel())
        c32 = torch.cat([c32, pad])
    return Codebook(c32.contiguous(), codes)


def sorted_quantiles(sorted_v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(sorted_v, q)`` (linear interpolation) for data already sorted, bit for
    bit, without its 2**24-element limit: the ResNet-18 and a widened AlexNet have layers with
    more weights than that (issue 11, point 5)."""
    ranks = q.to(sorted_v.dtype) * (sorted_v.numel() - 1)
    below = ranks.floor()
    weight = ranks - below
    below_i = below.long()
    above_i = ranks.ceil().long()
    return torch.lerp(sorted_v[below_i], sorted_v[above_i], weight)


def _assign(v: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest (sorted) centroid for each value; ties go to the lower one."""
    if centroids.numel() == 1:
        return torch.zeros(v.shape, dtype=torch.long, device=v.device)
    mids = (centroids[1:] + centroids[:-1]) / 2
    return torch.searchsorted(mids, v, right=False)


@dataclass(frozen=True)
class QuantResult:
    """Outcome of the bit-width search for one task."""

    bits: int
    float_acc: float
    quant_acc: float
    within_delta: bool
    tried: list[tuple[int, float]]
    codebooks: dict[str, Codebook]


def search_bit_width(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    evaluate: Callable[[dict[str, torch.Tensor]], float],
    float_acc: float,
    psi_min: int,
    b_max: int,
    delta: float,
    iters: int = 50,
) -> QuantResult:
    """Algorithm 3: the smallest ψ in ``psi_min..b_max`` whose quantised model keeps
    validation accuracy ``>= float_acc - delta``; ``b_max`` if none does.

    ``evaluate`` maps dense quantised weights (0 off-mask) to validation accuracy (%).
    """
    steps = bit_width_steps(weights, masks, evaluate, float_acc, psi_min, b_max, delta, iters)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def bit_width_steps(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    evaluate: Callable[[dict[str, torch.Tensor]], float],
    float_acc: float,
    psi_min: int,
    b_max: int,
    delta: float,
    iters: int = 50,
) -> Generator[tuple[int, float], None, QuantResult]:
    """:func:`search_bit_width` yielding ``(ψ, validation accuracy)`` as each width is tried,
    so that a worker can report progress while QUANTIZE runs."""
    tried: list[tuple[int, float]] = []
    last: tuple[int, float, dict[str, Codebook]] | None = None
    for psi in range(psi_min, b_max + 1):
        books = {n: kmeans_1d(w[masks[n]], psi, iters) for n, w in weights.items()}
        acc = evaluate(dequantize(books, masks, weights))
        tried.append((psi, acc))
        last = (psi, acc, books)
        yield psi, acc
        if acc >= float_acc - delta:
            return QuantResult(psi, float_acc, acc, True, tried, books)
    assert last is not None
    return QuantResult(last[0], float_acc, last[1], False, tried, last[2])


def dequantize(
    books: dict[str, Codebook], masks: dict[str, torch.Tensor], like: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Dense float32 weights: each masked weight replaced by its centroid, 0 elsewhere."""
    out = {}
    for name, book in books.items():
        w = torch.zeros_like(like[name], dtype=torch.float32)
        w[masks[name]] = book.values().to(w.device)
        out[name] = w
    return out
