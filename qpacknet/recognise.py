"""Task recognition: which committed task an input belongs to when no task id comes with it
(class-incremental use, DESIGN.md §2 Inference), for ``qpacknet predict``, the served model and
the run's reported task-inference figures (:class:`qpacknet.metrics.TaskInference`).

Every recogniser gives each (task, input) pair a *score*, higher meaning "more likely this
task's input"; the task with the highest score wins, ties to the lower task index. The
prediction is the winning task's head's argmax, the confidence its softmax probability.

``entropy``
    DESIGN.md §2's rule: every sub-network runs and the lowest prediction entropy wins (score
    ``-H``). Needs nothing but the model. Weak where a sub-network is confident on inputs of
    other tasks (84 % of the ``digits`` preset's test inputs, about 55 % on two-class tasks).
``input``
    A diagonal Gaussian density over the task's *network input* (its prepared training
    inputs: per-feature mean and variance), score = mean log-likelihood per input dimension,
    the same scale for every task. The variance is floored at ``INPUT_FLOOR`` times its mean
    so that constant pixels (an 8x8 digit's corners) do not dominate. Near perfect where tasks
    differ by their input distribution (permuted pixels), weak where they share it.
``feature``
    Class-conditional Gaussians with a shared covariance over the task's *penultimate
    features* under its own sub-network (:meth:`qpacknet.nets.PopulationNet.features`), as in
    Lee et al. 2018 ("A simple unified framework for detecting out-of-distribution samples",
    Mahalanobis score): per training class the mean, pooled within-class covariance shrunk
    towards ``FEATURE_SHRINK`` times its mean variance. Score = ``-min_c d²_c / D``, the
    nearest class mean's squared Mahalanobis distance per feature dimension (about 1 for the
    task's own inputs, a chi-square over D normalisation), comparable across tasks. Tells apart
    tasks that differ by their classes, not their input statistics (two-class streams).
``combined``
    ``input + feature``: both are log-likelihood-like scores per dimension, so their sum is a
    product of the two densities' per-dimension likelihoods. The strongest where both exist.

The statistics are computed at COMMIT from the task's own training split (no raw data is kept,
only these summaries: replay-free) and stored in the model file under the file's checksums
(:mod:`qpacknet.store.fileformat`, tensors ``task.{t}.recognise.{name}``). The features come
from the committed sub-network decoded from the words, on the driver's device; every sum is
taken in float64 on the CPU over fixed chunks and rounded to float32, so on the CPU a run
recomputes them bit for bit (also at another thread count); a resumed run reads them from the
checkpointed model file. File growth per task, with ``P`` network-input values, ``D`` feature
dimensions and ``C_t`` classes in the task's training split, all float32::

    input:   2 * P * 4 bytes                  (mean, var; MLP 784-100-100: 6,272 bytes)
    feature: (C_t * D + D * (D + 1) / 2) * 4  (class means, the lower-triangular whitening
             factor; MLP 784-100-100 with 10 classes: 24,200 bytes)
    feature, diagonal covariance: (C_t * D + D) * 4  (class means, one scale per dimension)

plus the header's few bytes per tensor (name, shape, checksum). The full covariance grows with
``D²`` (AlexNet's 2048 features: about 8.4 MB a task); ``covariance="diagonal"`` keeps the
pooled covariance's diagonal alone (``feature.whiten`` then holds ``D`` values), which
recognises less well where features are correlated (README, "Task inference").
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

from qpacknet.metrics import prediction_entropy

if TYPE_CHECKING:
    from qpacknet.model import PackedModel
    from qpacknet.scenarios.base import Split

# Network inputs: one tensor for every task, or ``task -> tensor`` where each task prepares the
# same raw inputs its own way (per-task standardisation, qpacknet.preparation.task_inputs).
Inputs = torch.Tensor | Callable[[int], torch.Tensor]

STATS_VERSION = 1
KINDS = ("input", "feature")  # the statistics a task may keep
INPUT_FLOOR = 0.1  # variance floor, relative to the task's mean input variance
FEATURE_SHRINK = 0.1  # covariance shrinkage towards the identity, relative to its mean variance
_TINY = 1e-12
_LOG_2PI = math.log(2.0 * math.pi)

# recogniser -> the statistics it needs; listed weakest first (the default is the last one a
# model has every statistic for)
NEEDS: dict[str, tuple[str, ...]] = {
    "entropy": (),
    "input": ("input",),
    "feature": ("feature",),
    "combined": ("input", "feature"),
}
RECOGNISERS = tuple(NEEDS)
DEFAULT = "combined"


class Recognition(NamedTuple):
    """Per input: the inferred task, its predicted class, and the confidence (all ``[N]``)."""

    task: torch.Tensor
    prediction: torch.Tensor
    confidence: torch.Tensor


# ---- statistics at COMMIT --------------------------------------------------------------------


Covariance = Literal["full", "diagonal"]


def stats_bytes(stats: dict[str, torch.Tensor]) -> int:
    """The tensor bytes a task's statistics add to the model file (without header entries)."""
    return sum(v.numel() * v.element_size() for v in stats.values())


def _chunks(n: int, size: int) -> Iterator[slice]:
    return (slice(i, i + size) for i in range(0, n, size))


@torch.no_grad()
def task_statistics(
    model: PackedModel,
    task: int,
    train: Split,
    kinds: tuple[str, ...] = KINDS,
    covariance: Covariance = "full",
) -> dict[str, torch.Tensor]:
    """Task ``task``'s recognition statistics from its training split ``train`` (network inputs
    as the task prepares them): ``input.mean``/``input.var`` ``[P]`` and ``feature.means``
    ``[C_t, D]`` / ``feature.whiten`` ``[D(D+1)/2]`` (``[D]`` with a diagonal ``covariance``),
    float32 (module docstring). Sums are taken in float64 on the CPU
    over fixed chunks, so the result does not depend on the device batch composition."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown recognition statistics {unknown} (known: {', '.join(KINDS)})")
    n = len(train)
    if n == 0:
        raise ValueError(f"task {task}: an empty training split has no statistics")
    net = model.net(task)
    x_sum = x_sq = f_outer = None
    class_sum: dict[int, torch.Tensor] = {}
    class_n: dict[int, int] = {}
    for rows in _chunks(n, model.batch_size):
        x = train.inputs(rows).to(model.device)
        if "input" in kinds:
            flat = x.reshape(len(x), -1).to("cpu", torch.float64)
            x_sum = flat.sum(0) if x_sum is None else x_sum + flat.sum(0)
            x_sq = (flat * flat).sum(0) if x_sq is None else x_sq + (flat * flat).sum(0)
        if "feature" in kinds:
            f = net.features(x)[0].to("cpu", torch.float64)
            y = train.y[rows].cpu()
            outer = f.t() @ f
            f_outer = outer if f_outer is None else f_outer + outer
            for c in sorted(set(y.tolist())):
                part = f[y == c].sum(0)
                class_sum[c] = part if c not in class_sum else class_sum[c] + part
                class_n[c] = class_n.get(c, 0) + int((y == c).sum())
    out: dict[str, torch.Tensor] = {}
    if x_sum is not None and x_sq is not None:
        mean = x_sum / n
        out["input.mean"] = mean.float()
        out["input.var"] = (x_sq / n - mean * mean).clamp_min(0.0).float()
    if f_outer is not None:
        classes = sorted(class_sum)
        means = torch.stack([class_sum[c] / class_n[c] for c in classes])
        between = sum(class_n[c] * torch.outer(m, m) for c, m in zip(classes, means, strict=True))
        cov = (f_outer - between) / n
        cov = (cov + cov.t()) / 2
        d = cov.shape[0]
        ridge = FEATURE_SHRINK * max(float(cov.diagonal().mean()), 0.0) + _TINY
        out["feature.means"] = means.float()
        if covariance == "diagonal":
            out["feature.whiten"] = (cov.diagonal().clamp_min(0.0) + ridge).rsqrt().float()
        else:
            lower = torch.linalg.cholesky(cov + ridge * torch.eye(d, dtype=torch.float64))
            whiten = torch.linalg.solve_triangular(
                lower, torch.eye(d, dtype=torch.float64), upper=False
            )
            rows_, cols = torch.tril_indices(d, d)
            out["feature.whiten"] = whiten[rows_, cols].float()
    return out


def stats_shapes(stats: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """``{name: shape}``: what the model file's header records of a task's statistics."""
    return {name: list(value.shape) for name, value in sorted(stats.items())}


def check_stats(stats: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with a task's statistics (names, dtypes, shapes, finiteness), or None."""
    names = set(stats)
    known = {f"{k}.{p}" for k, parts in _PARTS.items() for p in parts}
    if names - known:
        return f"unknown statistics {sorted(names - known)}"
    for kind, parts in _PARTS.items():
        have = [f"{kind}.{p}" in names for p in parts]
        if any(have) and not all(have):
            return f"{kind} statistics are incomplete (need {', '.join(parts)})"
    for name, value in stats.items():
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            return f"{name} must be a float32 tensor"
        if not bool(torch.isfinite(value).all()):
            return f"{name} holds NaN or infinite values"
    if "input.mean" in names and (
        stats["input.mean"].dim() != 1 or stats["input.var"].shape != stats["input.mean"].shape
    ):
        return "input.mean and input.var must be vectors of the same length"
    if "feature.means" in names:
        means, whiten = stats["feature.means"], stats["feature.whiten"]
        if means.dim() != 2 or whiten.dim() != 1:
            return "feature.means must be [C, D] and feature.whiten a vector"
        d = means.shape[1]
        if whiten.numel() not in (d, d * (d + 1) // 2):
            return (
                f"feature.whiten holds {whiten.numel()} values, {d * (d + 1) // 2} (full "
                f"covariance) or {d} (diagonal) expected"
            )
    return None


_PARTS = {"input": ("mean", "var"), "feature": ("means", "whiten")}


def kinds_of(stats: dict[str, torch.Tensor] | None) -> set[str]:
    """The statistics kinds a task's record holds."""
    return {name.split(".", 1)[0] for name in stats or {}}


# ---- scores ------------------------------------------------------------------------------------


def input_score(stats: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean log-likelihood per input dimension under the task's diagonal Gaussian (float64,
    CPU, ``[N]``)."""
    flat = x.reshape(len(x), -1).to("cpu", torch.float64)
    mean = stats["input.mean"].double()
    var = stats["input.var"].double()
    var = var + INPUT_FLOOR * float(var.mean()) + _TINY
    return -0.5 * (((flat - mean) ** 2 / var).mean(1) + float(var.log().mean()) + _LOG_2PI)


def feature_score(stats: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """``-min_c d²_c / D``: the nearest class mean's squared Mahalanobis distance per feature
    dimension, negated (float64, CPU, ``[N]``)."""
    means = stats["feature.means"].double()
    d = means.shape[1]
    packed = stats["feature.whiten"].double()
    if packed.numel() == d:  # diagonal covariance (for d = 1 both forms are the same)
        g = features.to("cpu", torch.float64) * packed
        m = means * packed
    else:
        whiten = torch.zeros(d, d, dtype=torch.float64)
        rows, cols = torch.tril_indices(d, d)
        whiten[rows, cols] = packed
        g = features.to("cpu", torch.float64) @ whiten.t()
        m = means @ whiten.t()
    out = []
    for part in _chunks(len(g), 1024):
        diff = g[part].unsqueeze(1) - m.unsqueeze(0)
        out.append((diff * diff).sum(-1).min(1).values)
    dist = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    return -dist / d


def scores(
    stats: dict[str, torch.Tensor] | None,
    x: torch.Tensor,
    logits: torch.Tensor,
    features: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Every recogniser's score of one sub-network on inputs ``x`` (its logits and, for the
    feature statistics, its features), for the recognisers its ``stats`` allow."""
    have = kinds_of(stats)
    out = {"entropy": -prediction_entropy(logits).double()}
    if "input" in have and stats is not None:
        out["input"] = input_score(stats, x)
    if "feature" in have and stats is not None and features is not None:
        out["feature"] = feature_score(stats, features)
    if "input" in out and "feature" in out:
        out["combined"] = out["input"] + out["feature"]
    return out


# ---- choosing a recogniser ----------------------------------------------------------------------


def available(model: PackedModel) -> list[str]:
    """The recognisers every task of ``model`` has the statistics for, weakest first."""
    have = [kinds_of(model.store.recognition_stats(t)) for t in range(model.num_tasks)]
    return [name for name, needs in NEEDS.items() if all(set(needs) <= kinds for kinds in have)]


def choose(model: PackedModel, requested: str | None, where: str = "the model") -> str:
    """The recogniser to use: ``requested`` (refused with the known names when unknown or when
    the model lacks its statistics), else the strongest the model has. Says once, on stderr,
    why a model falls back to entropy (files written before the statistics existed)."""
    names = available(model)
    if requested is not None:
        if requested not in NEEDS:
            raise ValueError(
                f"unknown task recogniser {requested!r} (known: {', '.join(RECOGNISERS)})"
            )
        if requested not in names:
            raise ValueError(
                f"task recogniser {requested!r} needs statistics that {where} lacks (it holds "
                f"{', '.join(names)}); choose one of those"
            )
        return requested
    best = names[-1]
    if best == "entropy":
        print(
            f"qpacknet: note: {where} holds no task-recognition statistics (written before "
            "qpacknet kept them, or without them): tasks are inferred by lowest prediction "
            "entropy, the weakest recogniser; learn the model again for the stronger ones",
            file=sys.stderr,
        )
    return best


def under_task(model: PackedModel, task: int, x: torch.Tensor) -> Recognition:
    """Class and confidence under a given task's head, as a :class:`Recognition`."""
    logits = model.logits(task, x).float().cpu()
    prediction = logits.argmax(-1)
    return Recognition(
        torch.full_like(prediction, task), prediction, _confidence(logits, prediction)
    )


def _confidence(logits: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, prediction.unsqueeze(-1)).squeeze(-1).exp()


def infer_tasks(model: PackedModel, x: Inputs, method: str | None = None) -> Recognition:
    """The task of every input of ``x`` (network inputs, or ``task -> network inputs``), with
    its class and confidence, by the recogniser ``method`` (the strongest the model has when
    None: :func:`choose`)."""
    if model.num_tasks == 0:
        raise ValueError("the model holds no committed task")
    name = choose(model, method)
    inputs = x if callable(x) else (lambda task: x)
    per_task, predictions, confidences = [], [], []
    for t in range(model.num_tasks):
        xt = inputs(t)
        if "feature" in NEEDS[name]:
            logits, features = model.outputs(t, xt)
        else:
            logits, features = model.logits(t, xt), None
        logits = logits.float().cpu()
        stats = model.store.recognition_stats(t)
        per_task.append(scores(stats, xt, logits, features)[name])
        predictions.append(logits.argmax(-1))
        confidences.append(_confidence(logits, predictions[-1]))
    task = torch.stack(per_task).argmax(0)  # the first maximum: ties to the lower task

    def chosen(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values).gather(0, task.unsqueeze(0)).squeeze(0)

    return Recognition(task, chosen(predictions), chosen(confidences))
