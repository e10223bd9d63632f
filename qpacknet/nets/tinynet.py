"""TinyNet of TinyImagenet (DESIGN.md §3), as a population of K candidates."""

from __future__ import annotations

import torch

from qpacknet.nets.conv import ConvPopulationNet, scaled


class PopulationTinyNet(ConvPopulationNet):
    """Four bias-free 3×3 convolutions with stride 2 and padding 1 (160 channels), ReLU, then
    fc 2560→640→640 with ReLU and a linear head per task (DESIGN.md §3; 64×64×3 inputs give
    160·4·4 = 2560 features). The public reference network has neither normalisation nor
    dropout, so neither has this one; ``width`` scales channels and fc widths."""

    backbone = "tinynet"

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        k: int = 1,
        width: float = 1.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__(k, input_shape, num_classes, self.backbone, channels_last)
        self.width = width
        cin, h, w = self.input_shape
        chans, hidden = scaled(width, 160), scaled(width, 640)
        for i in range(4):
            self._prunable(f"conv{i + 1}", (chans, cin, 3, 3))
            h, w, cin = (h - 1) // 2 + 1, (w - 1) // 2 + 1, chans
        self._prunable("fc1", (hidden, cin * h * w))
        self._prunable("fc2", (hidden, hidden))
        self._head(hidden)

    def options(self) -> dict[str, object]:
        return {"width": self.width}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.begin(x)
        for i in range(4):
            x = torch.relu(self.conv(x, f"conv{i + 1}", stride=2, padding=1, first=i == 0))
        h = self.flatten(x)
        for name in ("fc1", "fc2"):
            h = torch.relu(self.linear(h, name))
        return h
