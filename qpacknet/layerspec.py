"""A prunable layer's name and weight shape: what the backbones declare and the packed store
lays its words out by (shared by both, so that neither imports the other)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qpacknet.errors import StoreError


@dataclass(frozen=True)
class LayerSpec:
    """A prunable layer: its name (any string, e.g. ``"layers.0"``) and weight shape."""

    name: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise StoreError(f"layer name must be a non-empty string, got {self.name!r}")
        shape = tuple(self.shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise StoreError(
                f"layer {self.name!r}: shape must be a non-empty tuple of positive ints, "
                f"got {self.shape!r}"
            )
        object.__setattr__(self, "shape", shape)

    @property
    def numel(self) -> int:
        """Number of weights ``|θ_l|`` in the layer."""
        return math.prod(self.shape)
