"""Input preparation: how a scenario turns an input as the user has it (digits' 0..16 pixel
values, MNIST's uint8 pixels, an RGB image) into the float32 network input, recorded per task in
the model file (header entry ``input``, :mod:`qpacknet.store.fileformat`).

Recorded so that a model can be used on new data with neither the data set nor the run's
config: ``qpacknet predict`` and the served model read it from the file. Recorded per task
because image scenarios standardise each task with its own training statistics, and without a
task id each sub-network must see the input as *its* task prepared it.

The arithmetic is the scenarios' own, step for step (cast, divide by ``scale``, subtract
``mean``, divide by ``std``, in ``compute`` precision), so a raw input gives bit for bit the
network input of the scenario's split. A pixel permutation (p-MNIST, digits) is not
preparation: it defines the task, so a task's raw input is already permuted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any

import torch

from qpacknet.errors import DataError, ModelFileError

if TYPE_CHECKING:
    from qpacknet.scenarios.base import TaskStream
    from qpacknet.store import PackedStore

VERSION = 1
KINDS = ("features", "image")
# How an image of another size becomes the scenario's size: not at all (an error), a bilinear
# resize of the whole image (5-datasets' 28x28 grey sets), or the shorter side resized and the
# centre cropped (TinyImagenet, Imagenet100).
RESIZES = ("none", "bilinear", "shorter_side_crop")


@dataclass(frozen=True)
class Preparation:
    """One task's preparation. ``shape`` is one input as the scenario holds it before the
    network flattens it (``[C, H, W]`` for images); ``mean``/``std`` hold one value, or one per
    channel; ``value_range`` is the raw values' range where the scenario fixes one."""

    kind: str
    shape: tuple[int, ...]
    dtype: str
    value_range: tuple[float, float] | None
    compute: str = "float32"
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str = "none"
    scenario: str = ""

    def __post_init__(self) -> None:
        ok = (
            self.kind in KINDS
            and self.dtype in ("uint8", "float")
            and self.compute in ("float32", "float64")
            and self.resize in RESIZES
            and len(self.shape) >= 1
            and all(d >= 1 for d in self.shape)
            and (self.kind == "features" or len(self.shape) == 3)
            and (self.mean is None) == (self.std is None)
            and (self.mean is None or len(self.mean) == len(self.std or ()) >= 1)
            and (self.mean is None or len(self.mean) in (1, self.shape[0]))
        )
        if not ok:
            raise ValueError(f"inconsistent input preparation: {self}")

    @classmethod
    def uint8_image(
        cls,
        shape: tuple[int, ...],
        mean: torch.Tensor,
        std: torch.Tensor,
        scenario: str,
        resize: str = "none",
    ) -> Preparation:
        """A uint8 image standardised per channel with ``mean``/``std`` in pixel units: what
        every image scenario's :class:`~qpacknet.scenarios.base.Split` does."""
        return cls(
            kind="image",
            shape=tuple(shape),
            dtype="uint8",
            value_range=(0.0, 255.0),
            mean=tuple(mean.tolist()),
            std=tuple(std.tolist()),
            resize=resize,
            scenario=scenario,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "range": None if self.value_range is None else list(self.value_range),
            "compute": self.compute,
            "scale": self.scale,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "resize": self.resize,
            "scenario": self.scenario,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Preparation:
        """Raises ValueError for a document this reader does not understand."""
        if doc.get("version") != VERSION:
            raise ValueError(f"version {doc.get('version')!r} (this qpacknet reads {VERSION})")
        try:
            return cls(
                kind=str(doc["kind"]),
                shape=tuple(int(d) for d in doc["shape"]),
                dtype=str(doc["dtype"]),
                value_range=_pair(doc.get("range")),
                compute=str(doc["compute"]),
                scale=None if doc.get("scale") is None else float(doc["scale"]),
                mean=_floats(doc.get("mean")),
                std=_floats(doc.get("std")),
                resize=str(doc.get("resize", "none")),
                scenario=str(doc.get("scenario", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or mistyped field ({exc})") from None

    def describe(self) -> str:
        """What raw inputs look like, for messages: e.g. ``uint8 images [3, 32, 32] (values
        0..255)``."""
        what = "images" if self.kind == "image" else "values"
        span = ""
        if self.value_range is not None:
            lo, hi = (f"{v:g}" for v in self.value_range)
            span = f" (values {lo}..{hi})"
        return f"{self.dtype} {what} {list(self.shape)}{span}"

    def conform(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs ``[N, ...]`` in the scenario's layout ``[N, *shape]``: features of any
        shape with the right count are flattened; images may come as ``[N, H, W]`` (grey),
        ``[N, C, H, W]`` or ``[N, H, W, C]``, grey becomes RGB by repeating the channel, and
        another size is resized as the scenario resizes (or refused where it does not); rows
        of ``C*H*W`` values are taken as flattened ``[C, H, W]`` images."""
        if x.ndim < 2:
            raise self._shape_error(x)
        n, item = x.shape[0], tuple(x.shape[1:])
        if item == self.shape:
            return x
        if self.kind == "features":
            if prod(item) != prod(self.shape):
                raise self._shape_error(x)
            return x.reshape(n, *self.shape)
        c, h, w = self.shape
        if len(item) == 1 and item[0] == c * h * w:
            return x.reshape(n, c, h, w)
        if len(item) == 2:
            x = x.unsqueeze(1)
        elif len(item) == 3 and item[0] not in (1, c) and item[2] in (1, c):
            x = x.permute(0, 3, 1, 2)
        elif len(item) != 3 or item[0] not in (1, c):
            raise self._shape_error(x)
        if tuple(x.shape[2:]) != (h, w):
            x = self._resize(x)
        if x.shape[1] != c:
            x = x.expand(-1, c, -1, -1)
        return x.contiguous()

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as tvf

        _, h, w = self.shape
        if self.resize == "none":
            raise DataError(
                f"images of {x.shape[2]}x{x.shape[3]} pixels: the {self.scenario or 'model'}"
                f"'s images are {h}x{w} ({self.describe()}), and the scenario does not "
                "resize; resize them first"
            )
        pixels = _as_uint8(x, "resizing images")
        if self.resize == "bilinear":
            return tvf.resize(pixels, [h, w], antialias=True)
        from PIL import Image

        out = []
        for img in pixels:
            hwc = img.permute(1, 2, 0).numpy()
            pil = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
            out.append(tvf.pil_to_tensor(tvf.center_crop(tvf.resize(pil, h, antialias=True), h)))
        return torch.stack(out)

    def _shape_error(self, x: torch.Tensor) -> DataError:
        return DataError(
            f"inputs of shape {list(x.shape)} do not fit this model: one input is "
            f"{self.describe()}, so give [N, {', '.join(map(str, self.shape))}]"
            + (" (or [N, H, W, C], or grey [N, H, W])" if self.kind == "image" else "")
        )

    def check_range(self, x: torch.Tensor) -> None:
        """Refuse values outside the raw range (e.g. inputs that were already standardised)."""
        if self.value_range is None or x.numel() == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if lo < self.value_range[0] or hi > self.value_range[1]:
            raise DataError(
                f"inputs hold values in [{lo:g}, {hi:g}], but this model's raw inputs are "
                f"{self.describe()}; inputs that are already network inputs (standardised "
                "floats) go in as prepared inputs (qpacknet predict --prepared, or the served "
                "model without params.raw)"
            )

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """float32 network inputs of raw ``x`` (``[N, *shape]``), bit for bit the scenario's."""
        dtype = torch.float64 if self.compute == "float64" else torch.float32
        out = x.to(dtype)
        if self.scale is not None:
            out = out / self.scale
        if self.mean is not None and self.std is not None:
            if len(self.mean) == 1:
                out = (out - self.mean[0]) / self.std[0]
            else:
                view = (1, -1) + (1,) * (out.ndim - 2)
                mean = torch.tensor(self.mean, dtype=dtype).view(view)
                std = torch.tensor(self.std, dtype=dtype).view(view)
                out = (out - mean) / std
        return out.to(torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs as the user has them → float32 network inputs ``[N, *shape]``."""
        x = self.conform(x)
        self.check_range(x)
        return self.network_input(x)


def _pair(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    lo, hi = value
    return float(lo), float(hi)


def _floats(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


def _as_uint8(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x
    if x.is_floating_point() and not torch.equal(x, x.round()):
        raise DataError(f"{what} needs whole pixel values 0..255, got fractions")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 255):
        raise DataError(f"{what} needs pixel values 0..255")
    return x.to(torch.uint8)


def record(store: PackedStore, stream: TaskStream, task: int) -> None:
    """At COMMIT: store the preparation of every task up to ``task`` that the store lacks
    (earlier tasks too, for a model that was started before preparations were recorded)."""
    for t in range(task + 1):
        if store.input_preparation(t) is None:
            prep = stream.input_preparation(t)
            if prep is not None:
                store.set_input_preparation(t, prep.to_json())


def of_store(store: PackedStore, where: str = "the model") -> list[Preparation] | None:
    """Every task's preparation, or None unless all tasks have one (older files)."""
    docs = [store.input_preparation(t) for t in range(store.num_tasks)]
    if not docs or any(doc is None for doc in docs):
        return None
    try:
        return [Preparation.from_json(doc) for doc in docs if doc is not None]
    except ValueError as exc:
        raise ModelFileError(
            f"{where}: the recorded input preparation cannot be read: {exc}; pass prepared "
            "network inputs, or use the qpacknet release that wrote the file"
        ) from None


def task_inputs(
    preparations: list[Preparation] | None,
    x: torch.Tensor,
    model_shape: tuple[int, ...],
) -> Callable[[int], torch.Tensor]:
    """``task -> network input`` for raw ``x`` under each task's preparation (tasks with the
    same preparation share one tensor), or for already prepared float ``x`` when
    ``preparations`` is None (every task gets ``x`` itself, as TaskInference feeds a test set
    to every sub-network)."""
    if preparations is None:
        per_item = prod(model_shape)
        if x.ndim < 2 or prod(x.shape[1:]) != per_item:
            raise DataError(
                f"inputs of shape {list(x.shape)} do not fit this model: it takes prepared "
                f"float32 inputs of shape {list(model_shape)} each, so give [N, "
                f"{', '.join(map(str, model_shape))}]"
            )
        ready = x.to(torch.float32).reshape(len(x), *model_shape)
        return lambda task: ready

    made: dict[Preparation, torch.Tensor] = {}

    def inputs(task: int) -> torch.Tensor:
        prep = preparations[task]
        if prep not in made:
            made[prep] = prep(x).reshape(len(x), *model_shape)
        return made[prep]

    inputs(0)  # shape and range errors surface before any network runs
    return inputs
