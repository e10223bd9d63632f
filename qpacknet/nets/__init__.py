"""Backbones with a population dimension (DESIGN.md §3-4)."""

from __future__ import annotations

from typing import Any

from qpacknet.config import NetConfig
from qpacknet.nets.alexnet import PopulationAlexNet
from qpacknet.nets.conv import ConvPopulationNet
from qpacknet.nets.population import PopulationMLP, PopulationNet
from qpacknet.nets.resnet import BACKBONES as RESNETS
from qpacknet.nets.resnet import PopulationResNet18
from qpacknet.nets.tinynet import PopulationTinyNet

__all__ = [
    "ConvPopulationNet",
    "PopulationAlexNet",
    "PopulationMLP",
    "PopulationNet",
    "PopulationResNet18",
    "PopulationTinyNet",
    "build",
    "build_from_meta",
]


CONV_BACKBONES = ("alexnet", *RESNETS, "tinynet")


def _conv(
    backbone: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    k: int,
    width: float,
    dropout: bool,
    channels_last: bool,
) -> PopulationNet:
    if backbone == "alexnet":
        return PopulationAlexNet(input_shape, num_classes, k, width, dropout, channels_last)
    if backbone in RESNETS:
        return PopulationResNet18(
            input_shape, num_classes, k, RESNETS[backbone], width, channels_last
        )
    return PopulationTinyNet(input_shape, num_classes, k, width, channels_last)


def build(cfg: NetConfig, input_shape: tuple[int, ...], num_classes: int, k: int) -> PopulationNet:
    """A population of ``k`` candidates of the configured backbone."""
    if cfg.backbone == "mlp":
        in_features = 1
        for d in input_shape:
            in_features *= d
        return PopulationMLP(in_features, cfg.hidden, num_classes, k)
    if cfg.backbone in CONV_BACKBONES:
        return _conv(
            cfg.backbone, input_shape, num_classes, k, cfg.width, cfg.dropout, cfg.channels_last
        )
    raise ValueError(f"unknown backbone {cfg.backbone!r}")


def build_from_meta(meta: dict[str, Any], k: int = 1) -> PopulationNet:
    """Rebuild a backbone from :meth:`PopulationNet.describe` (stored in the model file)."""
    backbone = meta.get("backbone")
    if backbone == "mlp":
        return PopulationMLP(
            int(meta["in_features"]), list(meta["hidden"]), int(meta["num_classes"]), k
        )
    if backbone in CONV_BACKBONES:
        return _conv(
            str(backbone),
            tuple(int(d) for d in meta["input_shape"]),
            int(meta["num_classes"]),
            k,
            float(meta.get("width", 1.0)),
            bool(meta.get("dropout", True)),
            bool(meta.get("channels_last", False)),
        )
    raise ValueError(f"model file describes an unknown backbone: {backbone!r}")
