"""ResNet-18 backbones (DESIGN.md §3) as populations of K candidates: the reduced one of
5-datasets and the ImageNet one of Imagenet100."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from qpacknet.nets.conv import ConvPopulationNet, scaled

Variant = Literal["reduced", "imagenet"]

BASE_FILTERS: dict[str, int] = {"reduced": 20, "imagenet": 64}
BACKBONES: dict[str, Variant] = {"resnet18_reduced": "reduced", "resnet18": "imagenet"}


class PopulationResNet18(ConvPopulationNet):
    """ResNet-18: a stem, four stages of two basic blocks (3×3 conv, norm, ReLU, 3×3 conv, norm,
    plus the identity or a 1×1 projection with its norm), average pooling and a linear head per
    task. Every convolution is bias-free and prunable (projections included); every norm is a
    per-task batch norm (:mod:`qpacknet.nets.conv`).

    ``"reduced"`` (5-datasets, 32×32×3): 20 base filters, a 3×3 stride-1 stem and a 2×2 average
    pool before the head (8·20·2·2 = 640 features), as in the public reference code.
    ``"imagenet"``: 64 base filters, the 7×7 stride-2 stem with a 3×3 stride-2 max-pool and a
    global average pool (512 features). ``width`` scales the base filters (tests).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        k: int = 1,
        variant: Variant = "reduced",
        width: float = 1.0,
        channels_last: bool = False,
    ) -> None:
        if variant not in BASE_FILTERS:
            raise ValueError(f"unknown ResNet-18 variant {variant!r}")
        backbone = next(name for name, v in BACKBONES.items() if v == variant)
        super().__init__(k, input_shape, num_classes, backbone, channels_last)
        self.backbone = backbone
        self.variant: Variant = variant
        self.width = width
        nf = scaled(width, BASE_FILTERS[variant])
        stem = 3 if variant == "reduced" else 7
        self._prunable("conv1", (nf, self.input_shape[0], stem, stem))
        self._norm("bn1", nf)
        self._blocks: list[tuple[str, int, bool]] = []
        cin = nf
        for stage, mult in enumerate((1, 2, 4, 8)):
            cout = nf * mult
            for b in range(2):
                stride = 2 if stage > 0 and b == 0 else 1
                name = f"layer{stage + 1}.{b}"
                self._prunable(f"{name}.conv1", (cout, cin, 3, 3))
                self._norm(f"{name}.bn1", cout)
                self._prunable(f"{name}.conv2", (cout, cout, 3, 3))
                self._norm(f"{name}.bn2", cout)
                project = stride != 1 or cin != cout
                if project:
                    self._prunable(f"{name}.shortcut", (cout, cin, 1, 1))
                    self._norm(f"{name}.shortcut_bn", cout)
                self._blocks.append((name, stride, project))
                cin = cout
        self.pool = 2 if variant == "reduced" else 1
        self._head(cin * self.pool * self.pool)

    def options(self) -> dict[str, object]:
        return {"width": self.width}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.begin(x)
        if self.variant == "reduced":
            x = self.conv(x, "conv1", stride=1, padding=1, first=True)
        else:
            x = self.conv(x, "conv1", stride=2, padding=3, first=True)
        x = torch.relu(self.norm(x, "bn1"))
        if self.variant == "imagenet":
            x = F.max_pool2d(x, 3, stride=2, padding=1)
        for name, stride, project in self._blocks:
            out = torch.relu(self.norm(self.conv(x, f"{name}.conv1", stride, 1), f"{name}.bn1"))
            out = self.norm(self.conv(out, f"{name}.conv2", 1, 1), f"{name}.bn2")
            if project:
                x = self.norm(self.conv(x, f"{name}.shortcut", stride, 0), f"{name}.shortcut_bn")
            x = torch.relu(out + x)
        return self.flatten(_average_pool(x, self.pool))


def _average_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling to ``size``×``size`` as a plain average pool when the map
    divides evenly: CUDA's adaptive-pool backward has no deterministic kernel and raises
    under ``torch.use_deterministic_algorithms`` (:func:`qpacknet.devices.configure`)."""
    h, w = x.shape[-2:]
    if h % size == 0 and w % size == 0:
        return F.avg_pool2d(x, (h // size, w // size))
    return F.adaptive_avg_pool2d(x, size)
