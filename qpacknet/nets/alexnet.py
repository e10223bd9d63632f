"""The reduced AlexNet of split CIFAR-100 (DESIGN.md §3), as a population of K candidates."""

from __future__ import annotations

import torch

from qpacknet.nets.conv import ConvPopulationNet, scaled

CONV_DROPOUT = 0.2
FC_DROPOUT = 0.5


class PopulationAlexNet(ConvPopulationNet):
    """Conv 3→64 k4, 64→128 k3, 128→256 k2, each followed by batch norm, ReLU, dropout and a
    2×2 max-pool; fc 1024→2048→2048, each with batch norm, ReLU and dropout; a linear head per
    task (DESIGN.md §3, sizes of the public reference code for 32×32×3 inputs). Dropout is 0.2
    after conv1-2 and 0.5 after conv3 and fc1-2, as in the reference code; the batch norms are
    per task (:mod:`qpacknet.nets.conv`). ``width`` scales every channel and fc width (tests
    and quick runs); the fc1 input size follows from the input shape."""

    backbone = "alexnet"

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        k: int = 1,
        width: float = 1.0,
        dropout: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__(k, input_shape, num_classes, self.backbone, channels_last)
        self.width = width
        self.use_dropout = dropout
        cin, h, w = self.input_shape
        chans = [scaled(width, c) for c in (64, 128, 256)]
        hidden = scaled(width, 2048)
        for i, (ksize, cout) in enumerate(zip((4, 3, 2), chans, strict=True)):
            self._prunable(f"conv{i + 1}", (cout, cin, ksize, ksize))
            self._norm(f"bn{i + 1}", cout)
            h, w, cin = (h - ksize + 1) // 2, (w - ksize + 1) // 2, cout
        if h < 1 or w < 1:
            raise ValueError(
                f"alexnet: input {self.input_shape} is too small (the feature map vanishes "
                "after the third pooling; 32×32 is the reference size, 20×20 the smallest)"
            )
        self._prunable("fc1", (hidden, cin * h * w))
        self._norm("bn4", hidden)
        self._prunable("fc2", (hidden, hidden))
        self._norm("bn5", hidden)
        self._head(hidden)

    def options(self) -> dict[str, object]:
        return {"width": self.width, "dropout": self.use_dropout}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.begin(x)
        rates = (CONV_DROPOUT, CONV_DROPOUT, FC_DROPOUT) if self.use_dropout else (0.0,) * 3
        for i, p in enumerate(rates):
            x = self.conv(x, f"conv{i + 1}", first=i == 0)
            x = self.dropout(torch.relu(self.norm(x, f"bn{i + 1}")), p, site=i)
            x = torch.max_pool2d(x, 2)
        h = self.flatten(x)
        p_fc = FC_DROPOUT if self.use_dropout else 0.0
        for i, name in enumerate(("fc1", "fc2")):
            h = torch.relu(self.norm_fc(self.linear(h, name), f"bn{i + 4}"))
            h = self.dropout(h, p_fc, site=3 + i)
        return h
