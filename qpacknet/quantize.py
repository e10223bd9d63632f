"""Non-linear quantisation: 1-D k-means codebooks and the bit-width search (Algorithms 2-3).

k-means here is Lloyd's algorithm on sorted 1-D data with quantile initialisation: in one
dimension the clusters are contiguous intervals, so assignment is a ``searchsorted`` against
the midpoints between centroids. It is deterministic (no random restarts), runs on the
tensor's device and needs no scikit-learn call per layer and bit-width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F


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
class ValFigures:
    """One network on the validation split: what a bit-width criterion may judge it by.

    ``acc`` is accuracy (%), ``loss`` the mean cross-entropy (nats), ``agreement`` the share
    (%) of inputs whose predicted class equals the float network's (100 for the float one).
    ``discordant`` counts the inputs that exactly one of this network and the float one
    answers right, out of ``n``: the paired comparison's standard error (:attr:`paired_se`).
    """

    acc: float
    loss: float
    agreement: float
    discordant: int = 0
    n: int = 0

    @property
    def paired_se(self) -> float:
        """Standard error (points) of the accuracy difference to the float network on these
        same inputs, ``100·sqrt(n01 + n10)/n`` (McNemar's paired test): how far apart two
        equally good networks' validation accuracies fall by chance. 0 without a count."""
        return 100.0 * math.sqrt(self.discordant) / self.n if self.n else 0.0


def val_figures(logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> ValFigures:
    """:class:`ValFigures` of ``logits`` ``[N, C]`` against ``labels`` and the float network's
    predicted classes ``reference`` ``[N]``. ``acc`` is computed as :func:`qpacknet.train.evaluate`
    computes it (an integer count over ``N``), so the paper's criterion sees the same figure."""
    n = max(int(labels.numel()), 1)
    pred = logits.argmax(-1)
    right = pred == labels
    correct = int(right.sum())
    agree = int((pred == reference).sum())
    discordant = int((right != (reference == labels)).sum())
    loss = float(F.cross_entropy(logits.to(torch.float64), labels)) if labels.numel() else 0.0
    return ValFigures(100.0 * correct / n, loss, 100.0 * agree / n, discordant, int(labels.numel()))


CriterionName = Literal["accuracy", "loss", "agreement"]


@dataclass(frozen=True)
class Criterion:
    """Algorithm 3's acceptance test for a bit width ψ, comparing the quantised network's
    :class:`ValFigures` with the float network's.

    Every criterion keeps the paper's test (Algorithm 3: stop at the first ψ with
    ``Q_q >= Q - δ``), so ``δ`` bounds the validation-accuracy drop whichever is chosen. On a
    small validation set that test counts a few dozen answers, which a 1-bit codebook can match
    by luck while the network's margins are gone; ``name`` adds a test that luck cannot pass:
    ``loss``: the mean validation cross-entropy rises by at most ``loss_tolerance`` nats (a
    continuous figure that every input moves, so lost confidence shows before answers flip;
    0.01 nats: the true class keeps 99 % of its geometric-mean probability);
    ``agreement``: at least ``min_agreement`` % of the validation inputs keep the float
    network's predicted class (flips that cancel out in accuracy count here);
    ``accuracy``: nothing more (the paper).

    ``delta_se`` widens δ to that many standard errors of the paired accuracy difference
    (:attr:`ValFigures.paired_se`) where that is more: a drop the validation set cannot tell
    from chance then passes, one it can still fails (0: the paper's fixed δ alone).
    """

    name: CriterionName = "accuracy"
    delta: float = 1.0
    loss_tolerance: float = 0.01
    min_agreement: float = 99.0
    delta_se: float = 0.0

    def allowed_drop(self, quant: ValFigures) -> float:
        """The validation-accuracy drop (points) Algorithm 3 allows ``quant``:
        ``max(δ, delta_se · paired SE)``."""
        return max(self.delta, self.delta_se * quant.paired_se)

    def accepts(self, ref: ValFigures, quant: ValFigures) -> bool:
        """Whether ``quant`` keeps enough of ``ref`` to stop the search at this width."""
        if quant.acc < ref.acc - self.allowed_drop(quant):
            return False
        if self.name == "loss":
            return quant.loss <= ref.loss + self.loss_tolerance
        if self.name == "agreement":
            return quant.agreement >= self.min_agreement
        return True

    def describe(self, ref: ValFigures, quant: ValFigures) -> str:
        """The judged figure for progress lines, e.g. ``val loss 0.0831, float 0.0512``."""
        if self.name == "accuracy":
            text = f"float val acc {ref.acc:.2f}"
        elif self.name == "loss":
            text = f"val loss {quant.loss:.4f}, float {ref.loss:.4f}"
        else:
            text = f"agreement {quant.agreement:.2f}%, min {self.min_agreement:.2f}"
        if self.delta_se:
            text += f", allowed drop {self.allowed_drop(quant):.2f}"
        return text


Widths = dict[str, int]
"""A component width per prunable layer."""

Tune = Callable[[dict[str, Codebook]], dict[str, Codebook]]
"""Codebook fine-tuning hook: k-means codebooks in, tuned codebooks (the same codes) out."""


@dataclass(frozen=True)
class QuantResult:
    """Outcome of the bit-width search for one task: the float network's and the chosen
    widths' figures, whether the criterion held there, and every assignment tried.

    ``bits`` is the widest chosen layer width (Algorithm 3's ``b_t`` when every layer has the
    same); ``widths`` the width per layer. ``tried`` lists ``(widest width, figures)`` per
    trial and ``tried_widths`` the matching per-layer widths.
    """

    bits: int
    reference: ValFigures
    quant: ValFigures
    within_delta: bool
    tried: list[tuple[int, ValFigures]]
    codebooks: dict[str, Codebook]
    widths: Widths = field(default_factory=dict)
    tried_widths: list[Widths] = field(default_factory=list)

    @property
    def float_acc(self) -> float:
        return self.reference.acc

    @property
    def quant_acc(self) -> float:
        return self.quant.acc


def search_bit_width(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    evaluate: Callable[[dict[str, torch.Tensor]], ValFigures],
    reference: ValFigures,
    psi_min: int,
    b_max: int,
    criterion: Criterion,
    iters: int = 50,
    *,
    per_layer: bool = False,
    tune: Tune | None = None,
) -> QuantResult:
    """Algorithm 3: the smallest ψ in ``psi_min..b_max`` whose quantised model ``criterion``
    accepts against the float model's ``reference``; ``b_max`` if none is accepted (with
    ``per_layer``, then each layer's own width lowered, :func:`bit_width_steps`).

    ``evaluate`` maps dense quantised weights (0 off-mask) to their validation figures.
    """
    steps = bit_width_steps(
        weights,
        masks,
        evaluate,
        reference,
        psi_min,
        b_max,
        criterion,
        iters,
        per_layer=per_layer,
        tune=tune,
    )
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def bit_width_steps(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    evaluate: Callable[[dict[str, torch.Tensor]], ValFigures],
    reference: ValFigures,
    psi_min: int,
    b_max: int,
    criterion: Criterion,
    iters: int = 50,
    *,
    per_layer: bool = False,
    tune: Tune | None = None,
) -> Generator[tuple[Widths, ValFigures], None, QuantResult]:
    """:func:`search_bit_width` yielding ``(widths, validation figures)`` as each assignment is
    tried, so that a worker can report progress while QUANTIZE runs.

    1. Algorithm 3: ψ = ψ_min … b_max for every layer at once, each layer a k-means codebook
       of ``2**ψ`` centroids over the task's own weights (Algorithm 2), until ``criterion``
       accepts.
    2. With ``per_layer`` (hybrid quantisation, issue 13) and an accepted ψ: layers in order of
       most owned weights (most bits saved per bit), each one's width is lowered by one while
       the criterion still accepts the whole network with the others at their chosen widths.
       Every kept assignment passed the same test as Algorithm 3's, so the accuracy bound
       ``δ`` (and the loss or agreement test) holds for the result.

    With ``tune`` (codebook fine-tuning), every assignment's k-means codebooks are tuned
    before they are judged, so that narrower widths can pass. k-means is deterministic, so a
    layer's codebook at a width is computed once and reused by later trials, and an assignment
    is judged once. The per-layer pass costs at most ``Σ_l (b_l - ψ_min + 1)`` more trials,
    each with its fine-tuning epochs: a few for an MLP's two or three layers, tens for a
    ResNet-18's, which QUANTIZE's progress lines show one by one.
    """
    tried: list[tuple[int, ValFigures]] = []
    tried_widths: list[Widths] = []
    kmeans: dict[tuple[str, int], Codebook] = {}
    judged: dict[tuple[tuple[str, int], ...], tuple[ValFigures, dict[str, Codebook]]] = {}

    def trial(widths: Widths) -> tuple[ValFigures, dict[str, Codebook]]:
        books = {}
        for name, w in weights.items():
            key = (name, widths[name])
            if key not in kmeans:
                kmeans[key] = kmeans_1d(w[masks[name]], widths[name], iters)
            books[name] = kmeans[key]
        if tune is not None:
            books = tune(books)
        figures = evaluate(dequantize(books, masks, weights))
        tried.append((max(widths.values()), figures))
        tried_widths.append(dict(widths))
        judged[tuple(sorted(widths.items()))] = (figures, books)
        return figures, books

    chosen: tuple[Widths, ValFigures, dict[str, Codebook]] | None = None
    last: tuple[Widths, ValFigures, dict[str, Codebook]] | None = None
    for psi in range(psi_min, b_max + 1):
        widths = dict.fromkeys(weights, psi)
        figures, books = trial(widths)
        last = (widths, figures, books)
        yield widths, figures
        if criterion.accepts(reference, figures):
            chosen = last
            break
    if chosen is None:
        assert last is not None
        return _result(last, reference, False, tried, tried_widths)
    if per_layer:
        owned = {name: int(m.sum()) for name, m in masks.items()}
        for name in sorted(weights, key=lambda n: (-owned[n], n)):
            while chosen[0][name] > psi_min:
                widths = {**chosen[0], name: chosen[0][name] - 1}
                seen = judged.get(tuple(sorted(widths.items())))
                if seen is not None:  # e.g. every layer one below Algorithm 3's width: refused
                    figures, books = seen
                else:
                    figures, books = trial(widths)
                    yield widths, figures
                if not criterion.accepts(reference, figures):
                    break
                chosen = (widths, figures, books)
    return _result(chosen, reference, True, tried, tried_widths)


def _result(
    chosen: tuple[Widths, ValFigures, dict[str, Codebook]],
    reference: ValFigures,
    within: bool,
    tried: list[tuple[int, ValFigures]],
    tried_widths: list[Widths],
) -> QuantResult:
    widths, figures, books = chosen
    return QuantResult(
        max(widths.values()), reference, figures, within, tried, books, dict(widths), tried_widths
    )


def report_widths(task: dict[str, Any]) -> str:
    """A results.json task's widths for summaries: ``7``, or ``fc0 4/fc1 6`` per layer."""
    return describe_widths(task.get("bit_widths") or {"": task["bit_width"]}, sep="/")


def describe_widths(widths: Widths, sep: str = ", ") -> str:
    """``4`` for one width, ``fc0 3, fc1 5`` for per-layer widths (progress lines)."""
    distinct = set(widths.values())
    if len(distinct) == 1:
        return str(distinct.pop())
    return sep.join(f"{name} {w}" for name, w in widths.items())


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
