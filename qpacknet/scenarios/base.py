"""Task streams: the data of each task as whole tensors in memory.

DESIGN.md §4 / §7: batches are gathered from one in-memory tensor (``x[perm[i:i+b]]``),
2.5–3× cheaper than a ``DataLoader``; tensors live on the training device when there is one.
Image splits keep their uint8 pixels and are standardised per batch (:class:`Split`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from qpacknet.preparation import Preparation
from qpacknet.seeding import generator


def standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` → float32, each channel centred and scaled by ``mean``/``std``.

    Elementwise only (``sub`` then ``div``), so any subset of rows gives bit for bit the values
    that standardising all rows would: batches can be standardised as they are gathered.
    """
    out = x.to(torch.float32)
    return out.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (``[N, *input_shape]``) and labels ``y`` (int64, ``[N]``).

    ``x`` is either the network input itself (float32; ``mean``/``std`` None) or compact uint8
    images ``[N, C, H, W]`` with per-channel ``mean``/``std`` (float32 ``[C]``, pixel units
    0..255): the network input is then ``(x - mean) / std``, built batch by batch by
    :meth:`inputs`. Images stay uint8 on the training device and in the object store, a
    quarter of the float32 bytes (DESIGN.md §4: data crosses the object store once, compact).
    """

    x: torch.Tensor
    y: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std (per-channel standardisation) or neither")
        if self.mean is None:
            if self.x.dtype == torch.uint8:
                raise ValueError("uint8 images need their per-channel mean and std")
            return
        assert self.std is not None
        channels = self.x.shape[1] if self.x.ndim == 4 else -1
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise ValueError(
                f"mean/std standardise uint8 [N, C, H, W] images, not {self.x.dtype} "
                f"{list(self.x.shape)}"
            )
        for name, v in (("mean", self.mean), ("std", self.std)):
            if v.dtype != torch.float32 or tuple(v.shape) != (channels,):
                raise ValueError(
                    f"{name} must be float32 [{channels}], got {v.dtype} {list(v.shape)}"
                )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def compact(self) -> bool:
        """Whether ``x`` holds uint8 images that :meth:`inputs` standardises per batch."""
        return self.mean is not None

    def inputs(self, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """The float32 network input of ``rows`` (a slice or an index tensor; all rows when
        None), standardised here for a compact split: bit for bit the rows of the whole split
        standardised at once."""
        x = self.x if rows is None else self.x[rows]
        if self.mean is None or self.std is None:
            return x
        return standardise(x, self.mean, self.std)

    def standardised(self) -> Split:
        """This split with float32 network inputs in ``x`` (itself when it has them)."""
        return self if self.mean is None else Split(self.inputs(), self.y)

    def to(self, device: torch.device | str) -> Split:
        if self.mean is None or self.std is None:
            return Split(self.x.to(device), self.y.to(device))
        return Split(
            self.x.to(device), self.y.to(device), self.mean.to(device), self.std.to(device)
        )


@dataclass(frozen=True)
class TaskData:
    """One task's train / validation / test splits; labels are 0..num_classes-1."""

    index: int
    name: str
    num_classes: int
    train: Split
    val: Split
    test: Split

    def to(self, device: torch.device | str) -> TaskData:
        return TaskData(
            self.index,
            self.name,
            self.num_classes,
            self.train.to(device),
            self.val.to(device),
            self.test.to(device),
        )


class TaskStream(ABC):
    """An ordered stream of tasks. Tasks are built on demand so that only one task's
    training data is in memory at a time (10 permuted MNIST copies would take 1.9 GB)."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int

    @property
    @abstractmethod
    def num_tasks(self) -> int: ...

    @abstractmethod
    def task(self, index: int) -> TaskData:
        """Task ``index`` (0-based) with all three splits."""

    def test_split(self, index: int) -> Split:
        """Only the test split of task ``index`` (used to re-evaluate old tasks)."""
        return self.task(index).test

    def val_split(self, index: int) -> Split:
        """Only the validation split of task ``index`` (the driver checks COMMIT against it)."""
        return self.task(index).val

    def fit_splits(self, index: int) -> tuple[Split, Split]:
        """Task ``index``'s ``(train, val)``: all that a candidate worker trains and selects on."""
        task = self.task(index)
        return task.train, task.val

    def input_preparation(self, index: int) -> Preparation | None:
        """How task ``index`` turns an input as the user has it into the network input, as
        recorded in the model file at COMMIT (:mod:`qpacknet.preparation`); None (the default)
        for a stream that cannot say: its model then takes prepared network inputs only."""
        return None

    def for_workers(self) -> TaskStream | None:
        """A CPU copy of this stream that worker processes rebuild tasks from, sent to them once
        per run; ``None`` (the default) when each task's data must be sent instead.

        A stream that returns a copy promises that ``copy.fit_splits(t)`` in any process equals
        the driver's ``task(t)`` splits bit for bit (they are derived from the seed alone).
        """
        return None


class InMemoryStream(TaskStream):
    """A stream over tasks already built in memory (benchmarks, small user streams)."""

    def __init__(self, name: str, tasks: list[TaskData]) -> None:
        if not tasks:
            raise ValueError("an in-memory stream needs at least one task")
        first = tasks[0]
        self.name = name
        self.input_shape = tuple(first.train.x.shape[1:])
        self.num_classes = first.num_classes
        self._tasks = list(tasks)

    @property
    def num_tasks(self) -> int:
        return len(self._tasks)

    def task(self, index: int) -> TaskData:
        return self._tasks[index]


def check_stream_args(
    num_tasks: int, train_limit: int | None, val_fraction: float | None = None
) -> None:
    """The arguments every stream takes, checked the same way (the config already bounds them;
    this guards streams built directly from Python)."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if train_limit is not None and train_limit < 1:
        raise ValueError(f"train_limit must be a positive number of rows, got {train_limit}")


def holdout_split(
    n: int, val_fraction: float, seed: int, key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(train_idx, val_idx)`` over ``n`` rows, each sorted in file order.

    Sorting keeps row gathers cache-friendly and makes "the first N training rows" mean the
    same rows on every run.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 rows to hold out a validation set, got {n}")
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    order = torch.randperm(n, generator=generator(seed, key))
    return order[n_val:].sort().values, order[:n_val].sort().values
