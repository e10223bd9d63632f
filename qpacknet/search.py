"""Candidate drawing under the availability rule and the α/β score (Algorithm 1, eqs. 6-8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpacknet.config import SearchConfig, SharingConfig
from qpacknet.layerspec import LayerSpec
from qpacknet.seeding import generator


def owned_count(numel: int, sparsity: float) -> int:
    """Weights a candidate asks for in a layer of ``numel`` at ``sparsity``: the rounding
    Algorithm 1's draw and the capacity check before SEARCH must share."""
    return round((1.0 - sparsity) * numel)


def draw_mask(
    layers: list[LayerSpec],
    available: dict[str, torch.Tensor],
    cfg: SearchConfig,
    seed: int,
    task: int,
    candidate: int,
) -> dict[str, torch.Tensor]:
    """Candidate ``candidate``'s mask: per layer a sparsity ``s ~ U[v_min, v_max]`` and
    ``round((1 - s) |θ_l|)`` weights picked uniformly among the layer's available weights
    (fewer if fewer are available). Depends only on (seed, task, candidate, availability)."""
    g = generator(seed, "mask", task, candidate)
    masks = {}
    for spec in layers:
        s = cfg.v_min + (cfg.v_max - cfg.v_min) * torch.rand((), generator=g, dtype=torch.float64)
        want = owned_count(spec.numel, float(s))
        free = available[spec.name].flatten().nonzero().flatten().cpu()
        pick = free[torch.randperm(free.numel(), generator=g)[: min(want, free.numel())]]
        m = torch.zeros(spec.numel, dtype=torch.bool)
        m[pick] = True
        masks[spec.name] = m.reshape(spec.shape)
    return masks


def draw_shared(
    layers: list[LayerSpec],
    claimed: dict[str, torch.Tensor],
    owned: dict[str, torch.Tensor],
    cfg: SharingConfig,
    seed: int,
    task: int,
    candidate: int,
) -> dict[str, torch.Tensor]:
    """Candidate ``candidate``'s shared weights (TinySubNets option, DESIGN.md §2): per layer
    a fraction ``f ~ U[min_fraction, max_fraction]`` of the earlier tasks' claimed weights that
    the candidate does not own, picked uniformly. Drawn from its own generator, so turning
    sharing on leaves the candidate's own mask and initial weights unchanged."""
    g = generator(seed, "share", task, candidate)
    shared = {}
    for spec in layers:
        f = cfg.min_fraction + (cfg.max_fraction - cfg.min_fraction) * torch.rand(
            (), generator=g, dtype=torch.float64
        )
        pool = (claimed[spec.name].cpu() & ~owned[spec.name].cpu()).flatten().nonzero().flatten()
        pick = pool[torch.randperm(pool.numel(), generator=g)[: round(float(f) * pool.numel())]]
        m = torch.zeros(spec.numel, dtype=torch.bool)
        m[pick] = True
        shared[spec.name] = m.reshape(spec.shape)
    return shared


def weighted_sparsity(
    masks: dict[str, torch.Tensor], assigned: dict[str, torch.Tensor] | None = None
) -> float:
    """Υ (eqs. 6-7): the size-weighted fraction of prunable weights that would still belong
    to no task if this candidate were committed, i.e. ``1 - |assigned ∪ M_i| / |θ|`` summed
    over layers. ``assigned`` is the union of the committed tasks' masks in the task's network
    (:meth:`PackedStore.claimed`; None for a network's first task). A candidate that reuses
    weights earlier tasks already own (their words have room for another component) therefore
    scores as sparser than one that takes fresh weights, which the paper's reading rewards and
    the candidate's own sparsity alone would not see."""
    total = sum(m.numel() for m in masks.values())
    if assigned is None:
        used = sum(int(m.sum()) for m in masks.values())
    else:
        used = sum(int((m.cpu() | assigned[k].cpu()).sum()) for k, m in masks.items())
    return 1.0 - used / total


@dataclass(frozen=True)
class CandidateResult:
    """What a worker reports for one trained candidate."""

    index: int
    acc: float
    sparsity: float
    density: dict[str, float]
    shared: float = 0.0


def scores(results: list[CandidateResult], alpha: float, beta: float) -> list[float]:
    """Eq. 8: ``α·A_i/max(A) + β·Υ_i/max(Υ)`` (a term whose max is 0 contributes 0)."""
    max_a = max(r.acc for r in results)
    max_s = max(r.sparsity for r in results)
    return [
        alpha * (r.acc / max_a if max_a > 0 else 0.0)
        + beta * (r.sparsity / max_s if max_s > 0 else 0.0)
        for r in results
    ]


def select_winner(results: list[CandidateResult], alpha: float, beta: float) -> int:
    """Index (``CandidateResult.index``) of the best score; ties go to the lower index."""
    ordered = sorted(results, key=lambda r: r.index)
    sc = scores(ordered, alpha, beta)
    best = max(range(len(ordered)), key=lambda i: (sc[i], -ordered[i].index))
    return ordered[best].index
