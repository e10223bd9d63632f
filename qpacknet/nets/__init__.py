"""Backbones with a population dimension (DESIGN.md §3-4)."""

from __future__ import annotations

from typing import Any

from qpacknet.config import NetConfig
from qpacknet.nets.population import PopulationMLP, PopulationNet

__all__ = ["PopulationMLP", "PopulationNet", "build", "build_from_meta"]


def build(cfg: NetConfig, input_shape: tuple[int, ...], num_classes: int, k: int) -> PopulationNet:
    """A population of ``k`` candidates of the configured backbone."""
    if cfg.backbone == "mlp":
        in_features = 1
        for d in input_shape:
            in_features *= d
        return PopulationMLP(in_features, cfg.hidden, num_classes, k)
    raise ValueError(f"unknown backbone {cfg.backbone!r}")


def build_from_meta(meta: dict[str, Any], k: int = 1) -> PopulationNet:
    """Rebuild a backbone from :meth:`PopulationNet.describe` (stored in the model file)."""
    if meta.get("backbone") == "mlp":
        return PopulationMLP(
            int(meta["in_features"]), list(meta["hidden"]), int(meta["num_classes"]), k
        )
    raise ValueError(f"model file describes an unknown backbone: {meta.get('backbone')!r}")
