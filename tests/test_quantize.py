"""k-means codebooks and the bit-width search (Algorithms 2-3)."""

from __future__ import annotations

import pytest
import torch

from qpacknet.quantize import (
    Criterion,
    ValFigures,
    dequantize,
    kmeans_1d,
    search_bit_width,
    sorted_quantiles,
)


def test_kmeans_exact_when_values_fit_the_codebook() -> None:
    v = torch.tensor([0.5, -1.0, 0.5, 2.0, -1.0, 3.25])
    book = kmeans_1d(v, bits=2)
    assert book.centroids.shape == (4,)
    assert torch.equal(book.values(), v)
    assert torch.all(book.centroids[1:] >= book.centroids[:-1])


def test_kmeans_pads_codebook_and_codes_fit_width() -> None:
    v = torch.tensor([1.0, 1.0, 1.0])
    book = kmeans_1d(v, bits=3)
    assert book.centroids.shape == (8,)
    assert torch.equal(book.values(), v)
    w = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    for bits in (1, 2, 4, 6):
        b = kmeans_1d(w, bits)
        assert int(b.codes.max()) < 2**bits and b.centroids.numel() == 2**bits
    err = [float((kmeans_1d(w, b).values() - w).abs().mean()) for b in (1, 2, 3, 4, 5)]
    assert err == sorted(err, reverse=True)


def test_kmeans_assigns_nearest_centroid() -> None:
    w = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    book = kmeans_1d(w, 3)
    dist = (w[:, None] - book.centroids[None, :]).abs()
    assert torch.equal(dist.gather(1, book.codes[:, None]).squeeze(1), dist.min(dim=1).values)


def _case() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    # 8 well-separated clusters: 3 bits reproduce them exactly, fewer bits cannot.
    g = torch.Generator().manual_seed(0)
    base = torch.arange(8, dtype=torch.float32) * 10.0
    w = base[torch.randint(0, 8, (6, 7), generator=g)]
    mask = torch.rand(6, 7, generator=g) > 0.3
    w = w * mask
    return {"fc0": w}, {"fc0": mask}


def _acc(value: float) -> ValFigures:
    """Validation figures that only the paper's criterion looks at."""
    return ValFigures(value, 0.0, 100.0)


def _paper(delta: float) -> Criterion:
    return Criterion("accuracy", delta=delta)


def test_search_returns_smallest_width_within_delta() -> None:
    weights, masks = _case()

    def accuracy(dense: dict[str, torch.Tensor]) -> ValFigures:
        err = float((dense["fc0"] - weights["fc0"]).abs().max())
        return _acc(90.0 - err)  # exact weights: 90; coarser codebooks lose more

    res = search_bit_width(weights, masks, accuracy, _acc(90.0), 1, 8, _paper(0.5))
    assert (res.bits, res.within_delta, res.quant_acc) == (3, True, 90.0)
    assert [b for b, _ in res.tried] == [1, 2, 3]
    assert all(f.acc < 89.5 for b, f in res.tried if b < 3)
    loose = search_bit_width(weights, masks, accuracy, _acc(90.0), 1, 8, _paper(12.0))
    assert (loose.bits, loose.within_delta) == (2, True)
    assert loose.quant_acc == dict(res.tried)[2].acc
    start2 = search_bit_width(weights, masks, accuracy, _acc(90.0), 2, 8, _paper(0.5))
    assert [b for b, _ in start2.tried] == [2, 3]


def test_search_falls_back_to_b_max_and_reports_drop() -> None:
    weights, masks = _case()
    res = search_bit_width(weights, masks, lambda d: _acc(10.0), _acc(90.0), 1, 4, _paper(1.0))
    assert res.bits == 4 and not res.within_delta and res.quant_acc == 10.0
    assert [b for b, _ in res.tried] == [1, 2, 3, 4]


def test_dequantize_places_centroids_only_on_mask() -> None:
    weights, masks = _case()
    books = {"fc0": kmeans_1d(weights["fc0"][masks["fc0"]], 3)}
    dense = dequantize(books, masks, weights)
    assert torch.equal(dense["fc0"], weights["fc0"])
    assert torch.all(dense["fc0"][~masks["fc0"]] == 0)


@pytest.mark.parametrize("n", [1, 2, 7, 1001, 123_457])
def test_sorted_quantiles_equal_torch_quantile_bit_for_bit(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    v = torch.randn(n, dtype=torch.float64, generator=g).sort().values
    for bits in range(1, 9):
        q = (torch.arange(1 << bits, dtype=torch.float64) + 0.5) / (1 << bits)
        assert torch.equal(sorted_quantiles(v, q), torch.quantile(v, q))


def test_kmeans_does_not_depend_on_torch_quantile(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.quantile refuses more than 2**24 elements in the torch of the GPU machine (2.11;
    2.14 lifted it), and a widened AlexNet has layers beyond that: k-means must not call it."""

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("quantile() input tensor is too large")

    monkeypatch.setattr(torch, "quantile", refuse)
    values = torch.arange(1000, dtype=torch.float32) % 7
    book = kmeans_1d(values, bits=2, iters=5)
    assert book.codes.numel() == 1000 and book.centroids.numel() == 4
    assert torch.equal(book.centroids[book.codes][:7], book.values()[:7])
