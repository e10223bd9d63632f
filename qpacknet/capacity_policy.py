"""Before SEARCH: how much room each layer has left for a new task, and what the run does
when a layer is full; after TRAIN: the quality gate (DESIGN.md §2, "When the words are full").

Algorithm 1 draws a candidate's per-layer sparsity in ``[V_min, V_max]`` and takes at most
the available weights, so a layer with fewer available weights than ``round((1 - V_max)|θ_l|)``
cannot give any candidate its minimum density: the task would be trained on what is left,
possibly nothing, and committed near chance. That must never pass silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qpacknet.config import RunConfig
from qpacknet.layerspec import LayerSpec
from qpacknet.search import owned_count


@dataclass(frozen=True)
class LayerRoom:
    """One layer's available weights against what Algorithm 1's candidates draw: ``least``
    at sparsity V_max, ``most`` at V_min."""

    name: str
    available: int
    numel: int
    least: int
    most: int

    @property
    def starving(self) -> bool:
        return self.available < self.least

    @property
    def capped(self) -> bool:
        return self.available < self.most

    @property
    def pct(self) -> float:
        return 100.0 * self.available / self.numel


def room(
    layers: tuple[LayerSpec, ...] | list[LayerSpec],
    available: dict[str, torch.Tensor],
    cfg: RunConfig,
) -> list[LayerRoom]:
    """Per layer, the available weights and the range of counts a candidate asks for (the
    same rounding as :func:`qpacknet.search.draw_mask`, via :func:`owned_count`)."""
    return [
        LayerRoom(
            spec.name,
            int(available[spec.name].sum()),
            spec.numel,
            owned_count(spec.numel, cfg.search.v_max),
            owned_count(spec.numel, cfg.search.v_min),
        )
        for spec in layers
    ]


def describe(rooms: list[LayerRoom], cfg: RunConfig) -> str:
    """``layers.0 12.3 %, layers.1 40.0 % available (candidates draw 15-55 %)``."""
    parts = ", ".join(f"{r.name} {r.pct:.1f} %" for r in rooms)
    lo, hi = 100 * (1 - cfg.search.v_max), 100 * (1 - cfg.search.v_min)
    return f"{parts} of the weights available (candidates draw {lo:.0f}-{hi:.0f} % per layer)"


def full_message(task: int, network: int, rooms: list[LayerRoom], model_path: Path) -> str:
    """What ``capacity.when_full: stop`` says: the layer, the task and the three policies."""
    first = next(r for r in rooms if r.starving)
    others = [r.name for r in rooms if r.starving and r is not first]
    also = f" (also {', '.join(others)})" if others else ""
    done = f"tasks 1..{task} are committed in {model_path}" if task else "nothing is committed"
    return (
        f"task {task + 1}: network {network} is full: layer {first.name!r}{also} has "
        f"{first.available:,} of {first.numel:,} weights available ({first.pct:.1f} %), fewer "
        f"than the {first.least:,} a candidate needs at its sparsest (search.v_max). Task "
        f"{task + 1} was not trained; {done}. Choose with capacity.when_full: grow (open a new "
        "network for this and later tasks), share (let them read earlier tasks' frozen "
        "weights), or stop (this message); e.g. run the same command again with "
        "--set capacity.when_full=grow to continue from here"
    )


def chance_accuracy(labels: torch.Tensor) -> float:
    """Accuracy (%) of always answering the largest class of ``labels``: the floor a task
    that learned nothing reaches on that split."""
    if labels.numel() == 0:
        return 0.0
    counts = torch.bincount(labels.detach().cpu().long())
    return 100.0 * int(counts.max()) / labels.numel()


def gate_failed(val_acc: float, chance: float, cfg: RunConfig) -> bool:
    """The quality gate: a validation accuracy within ``chance_margin`` points of chance."""
    return val_acc < chance + cfg.capacity.chance_margin


def gate_message(
    task: int, what: str, acc: float, chance: float, cfg: RunConfig, capped: bool
) -> str:
    """Why a task near chance is suspect (``what`` names the figure: TRAIN's or the quantised
    network's validation accuracy), with the likely cause and what to change."""
    cause = (
        "its network has few weights left for it (see the availability line above); a lower "
        "search.v_max raises the minimum density a task needs, so capacity.when_full acts "
        "sooner"
        if capped
        else "too few epochs, a learning rate that diverged, or data the backbone cannot learn"
    )
    return (
        f"task {task + 1}: {what} is {acc:.2f} %, within "
        f"capacity.chance_margin={cfg.capacity.chance_margin:g} points of chance "
        f"({chance:.2f} %, the largest class's share of the validation split). Likely cause: "
        f"{cause}"
    )
