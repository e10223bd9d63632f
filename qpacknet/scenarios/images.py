"""Shared machinery of the image task streams (DESIGN.md §3): split CIFAR-100, 5-datasets,
TinyImagenet and Imagenet100.

Every image stream keeps its tasks' images as uint8 (or as file paths) and builds a task's
splits only when asked, so that at most one task's training data is decoded at a time. Splits
stay uint8 ``[N, C, H, W]`` with the task's per-channel mean and std, standardised batch by
batch (:class:`~qpacknet.scenarios.base.Split`): a quarter of float32's bytes on the training
device and in the object store (DESIGN.md §4). :meth:`ImageStream.for_workers` decodes every
task once on the driver so that actors build their splits from one compact object per run.

Per-channel standardisation uses the mean and standard deviation of the task's own training
rows (after the validation hold-out and ``train_limit``). The streams read whatever images
the user has (an Imagenet100 subset of their choice, one of several notMNIST releases), so
published constants would not fit them all. The statistics are float64 sums of integers below
2**53, which are exact in any summation order: every process derives the same tensors bit for
bit from the seed and the files alone.
"""

from __future__ import annotations

import copy
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as tvf

from qpacknet.errors import ConfigError, DataError, UsageError
from qpacknet.preparation import Preparation
from qpacknet.scenarios.base import (
    Split,
    TaskData,
    TaskStream,
    check_stream_args,
    holdout_split,
)
from qpacknet.scenarios.datadir import ENV_VAR
from qpacknet.seeding import generator

STATS_CHUNK = 512
MAX_DECODE_THREADS = 8


def data_dir_hint(subpath: str) -> str:
    """The closing sentence of every missing-data message: how to point at another folder."""
    return (
        f"To use another data folder, pass --data-dir DIR or set {ENV_VAR}=DIR; "
        f"the files then go into DIR/{subpath}."
    )


def listing(entries: Sequence[tuple[str, bool]], indent: str = "  ") -> str:
    """One line per expected file or folder, the absent ones marked ``(missing)``."""
    width = max(len(name) for name, _ in entries)
    return "\n".join(
        f"{indent}{name.ljust(width)}   (missing)" if not present else f"{indent}{name}"
        for name, present in entries
    )


def resolve_threads(requested: int | None) -> int:
    """Threads for image decoding: PIL releases the GIL while it decodes and resizes."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"decode_threads must be at least 1, got {requested}")
        return int(requested)
    return max(1, min(MAX_DECODE_THREADS, os.cpu_count() or 1))


def _decode_one(path: Path, mode: str, size: int) -> torch.Tensor:
    with Image.open(path) as img:
        # JPEG only: decode at a reduced DCT scale that still covers the target size.
        img.draft(mode, (size, size))
        img = img.convert(mode)
        if img.size != (size, size):
            img = tvf.center_crop(tvf.resize(img, size, antialias=True), size)
        return tvf.pil_to_tensor(img)


def decode_images(
    paths: Sequence[Path],
    *,
    mode: str = "RGB",
    size: int,
    threads: int = 1,
    skip_unreadable: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """Decode image files into uint8 ``[n, C, size, size]`` (C = 3 for RGB, 1 for L).

    Images of another size have their shorter side resized to ``size`` and are centre-cropped.
    Returns the images and the positions in ``paths`` that were kept: all of them, unless
    ``skip_unreadable`` drops files PIL cannot read (otherwise such a file is a DataError).
    """
    channels = 1 if mode == "L" else 3

    def load(path: Path) -> torch.Tensor | None:
        try:
            return _decode_one(Path(path), mode, size)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            if skip_unreadable:
                return None
            raise DataError(
                f"cannot read image {path} ({exc}). Replace it with an intact copy or delete it."
            ) from exc

    if threads > 1 and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            decoded = list(pool.map(load, paths))
    else:
        decoded = [load(p) for p in paths]
    kept = [i for i, img in enumerate(decoded) if img is not None]
    if len(kept) < len(paths):
        skipped = [str(paths[i]) for i in range(len(paths)) if decoded[i] is None]
        warnings.warn(
            f"skipped {len(skipped)} unreadable image file(s), e.g. {skipped[0]}",
            stacklevel=2,
        )
    if not kept:
        return torch.empty((0, channels, size, size), dtype=torch.uint8), kept
    return torch.stack([decoded[i] for i in kept]), kept  # type: ignore[misc]


def grey_to_rgb(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 ``[n, 1, h, w]`` → ``[n, 3, size, size]``: bilinear resize, channel copies.

    5-datasets (DESIGN.md §3) feeds every data set to one 32×32×3 backbone, so the 28×28 grey
    ones (MNIST, FashionMNIST, notMNIST) are resized and repeated over three channels.
    """
    if x.shape[-2:] != (size, size):
        x = tvf.resize(x, [size, size], antialias=True)
    return x.expand(-1, 3, -1, -1).contiguous()


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (float32 ``[C]``, pixel units 0..255) of uint8
    images ``[N, C, H, W]``, exact: float64 sums of integers stay below 2**53."""
    channels = x.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for chunk in x.split(STATS_CHUNK):
        c = chunk.to(torch.float64)
        total += c.sum(dim=(0, 2, 3))
        squares += c.square().sum(dim=(0, 2, 3))
    count = max(x.shape[0] * x.shape[2] * x.shape[3], 1)
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0.0).sqrt()
    # A constant channel (blank images) would divide by zero; leave it centred only.
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return mean.to(torch.float32), std.to(torch.float32)


class ImageSource(ABC):
    """One split of one task before standardisation: labels now, images when asked."""

    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @abstractmethod
    def images(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 ``[len(rows), C, H, W]`` of the given rows."""


class ArraySource(ImageSource):
    """Images already decoded into a uint8 tensor, converted row block by row block."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"expected uint8 [N, C, H, W] images, got {images.dtype} {images.shape}"
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self._images = images
        self.labels = labels.to(torch.int64)
        self._transform = transform

    def images(self, rows: torch.Tensor) -> torch.Tensor:
        block = self._images[rows]
        return self._transform(block) if self._transform is not None else block


class FileSource(ImageSource):
    """Image files decoded only for the rows asked for (large data sets stay on disk)."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: torch.Tensor,
        *,
        size: int,
        threads: int = 1,
    ) -> None:
        if len(paths) != labels.shape[0]:
            raise ValueError(f"{len(paths)} files but {labels.shape[0]} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = labels.to(torch.int64)
        self.size = int(size)
        self.threads = int(threads)

    def images(self, rows: torch.Tensor) -> torch.Tensor:
        images, _ = decode_images(
            [self.paths[int(i)] for i in rows], size=self.size, threads=self.threads
        )
        return images


class DecodedSource(ImageSource):
    """Some rows of another source, decoded to uint8 once (what a worker copy carries): the
    labels of every row, so that row numbers and seeded hold-outs stay those of the source,
    and the images of ``rows`` only."""

    def __init__(self, source: ImageSource, rows: torch.Tensor) -> None:
        self.labels = source.labels
        self._rows = rows.to(torch.int64).unique(sorted=True)
        self._images = source.images(self._rows)

    def images(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(torch.int64)
        at = torch.searchsorted(self._rows, rows).clamp_max(max(len(self._rows) - 1, 0))
        if len(rows) and (len(self._rows) == 0 or not torch.equal(self._rows[at], rows)):
            raise ValueError("asked for rows that were not decoded for the workers")
        return self._images[at]


class ImageStream(TaskStream):
    """Lazy image tasks with seeded validation hold-outs and cached test splits, all uint8 with
    the per-channel statistics of the task's training rows.

    A subclass lists the task's images in :meth:`_load`; this class holds out
    ``val_fraction`` of the training rows (seeded, keyed by task) and optionally keeps a seeded
    subset of ``train_limit`` of the rest. Only the most recently loaded task's sources are
    kept. A subclass names in ``_bulk`` the attributes holding its raw data set, which the
    worker copy leaves behind (it carries its tasks' decoded rows instead).
    """

    _bulk: tuple[str, ...] = ()
    # how an image of another size becomes input_shape (qpacknet.preparation.RESIZES)
    _resize = "none"

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    _key: str

    def __init__(
        self,
        *,
        num_tasks: int,
        val_fraction: float,
        seed: int,
        train_limit: int | None,
        device: torch.device | str,
    ) -> None:
        check_stream_args(num_tasks, train_limit, val_fraction)
        self._num_tasks = int(num_tasks)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.train_limit = train_limit
        self.device = torch.device(device)
        self._loaded: tuple[int, ImageSource, ImageSource] | None = None
        self._stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._test_cache: dict[int, Split] = {}
        self._shipped: dict[int, tuple[ImageSource, ImageSource]] | None = None

    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    @abstractmethod
    def _load(self, index: int) -> tuple[ImageSource, ImageSource]:
        """Task ``index``'s ``(train, test)`` sources, labels already ``0..num_classes-1``."""

    def task_name(self, index: int) -> str:
        return f"{self.name}-{index}"

    def _use_classes(self, order: Sequence[Any], classes_per_task: int) -> None:
        """Class-split streams (split CIFAR-100, TinyImagenet, Imagenet100; DESIGN.md §3):
        task t holds classes ``t·k .. t·k + k - 1`` of ``order``, relabelled ``0..k-1``."""
        self._class_order = list(order)
        self.classes_per_task = int(classes_per_task)
        self.num_classes = self.classes_per_task

    def task_classes(self, index: int) -> list[Any]:
        """Task ``index``'s classes (of a class-split stream); label j of the task is the j-th."""
        index = self._check_index(index)
        k = self.classes_per_task
        return self._class_order[index * k : (index + 1) * k]

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self._num_tasks:
            raise IndexError(
                f"task index {index} out of range: {self.name} has {self._num_tasks} tasks "
                f"(0..{self._num_tasks - 1})"
            )
        return int(index)

    def _sources(self, index: int) -> tuple[ImageSource, ImageSource]:
        if self._shipped is not None:
            return self._shipped[index]
        if self._loaded is None or self._loaded[0] != index:
            self._loaded = None  # release the previous task before loading the next
            self._loaded = (index, *self._load(index))
        return self._loaded[1], self._loaded[2]

    def split_rows(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``index``'s ``(train_rows, val_rows)`` into its training images, each sorted.

        ``train_limit`` keeps a seeded subset rather than the first rows: files listed class
        by class would otherwise leave a quick run with only the first classes.
        """
        index = self._check_index(index)
        train_src, _ = self._sources(index)
        if len(train_src) < 2:
            raise DataError(
                f"{self.task_name(index)} has {len(train_src)} training image(s); at least 2 "
                "are needed to hold out a validation set"
            )
        train, val = holdout_split(
            len(train_src), self.val_fraction, self.seed, f"{self._key}-val-{index}"
        )
        if self.train_limit is not None and self.train_limit < len(train):
            g = generator(self.seed, f"{self._key}-limit", index)
            train = train[torch.randperm(len(train), generator=g)[: self.train_limit]].sort().values
        return train, val

    def standardisation(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``index``'s per-channel ``(mean, std)`` in [0, 1] pixel units (float32 ``[C]``):
        ``x_float = (pixel / 255 - mean) / std``."""
        mean, std = self._pixel_stats(self._check_index(index))
        return mean / 255.0, std / 255.0

    def input_preparation(self, index: int) -> Preparation:
        """Raw input: a uint8 image, standardised per channel with the task's training
        statistics in pixel units, as :class:`~qpacknet.scenarios.base.Split` does."""
        mean, std = self._pixel_stats(self._check_index(index))
        return Preparation.uint8_image(self.input_shape, mean, std, self.name, self._resize)

    def _pixel_stats(
        self, index: int, train_x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Statistics of the task's training rows, computed once (from ``train_x`` when the
        caller has already decoded them)."""
        if index not in self._stats:
            if train_x is None:
                train_src, _ = self._sources(index)
                train_x = train_src.images(self.split_rows(index)[0])
            self._stats[index] = channel_stats(train_x)
        return self._stats[index]

    def _split(
        self,
        source: ImageSource,
        rows: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        images: torch.Tensor | None = None,
    ) -> Split:
        x = source.images(rows) if images is None else images
        return Split(x, source.labels[rows].clone(), mean, std).to(self.device)

    def fit_splits(self, index: int) -> tuple[Split, Split]:
        index = self._check_index(index)
        train_src, _ = self._sources(index)
        train_rows, val_rows = self.split_rows(index)
        train_x = train_src.images(train_rows)
        mean, std = self._pixel_stats(index, train_x)
        train = self._split(train_src, train_rows, mean, std, train_x)
        del train_x
        return train, self._split(train_src, val_rows, mean, std)

    def val_split(self, index: int) -> Split:
        index = self._check_index(index)
        mean, std = self._pixel_stats(index)
        train_src, _ = self._sources(index)
        return self._split(train_src, self.split_rows(index)[1], mean, std)

    def test_split(self, index: int) -> Split:
        """Cached: every old task's test split is re-evaluated after each commit."""
        index = self._check_index(index)
        split = self._test_cache.get(index)
        if split is None:
            mean, std = self._pixel_stats(index)
            _, test_src = self._sources(index)
            split = self._split(test_src, torch.arange(len(test_src)), mean, std)
            self._test_cache[index] = split
        return split

    def task(self, index: int) -> TaskData:
        index = self._check_index(index)
        train, val = self.fit_splits(index)
        return TaskData(
            index=index,
            name=self.task_name(index),
            num_classes=self.num_classes,
            train=train,
            val=val,
            test=self.test_split(index),
        )

    def for_workers(self) -> ImageStream:
        """A CPU copy carrying every task's decoded uint8 images (the training rows of its
        hold-outs and the whole test split), put in the object store once per run; actors
        build each task's splits from it bit for bit, with the same seeded rows and statistics.

        Cost, paid once on the driver when the run starts: every task is decoded up front (all
        image files of a file-backed stream, with ``decode_threads``), and the copy holds them
        as uint8, e.g. TinyImagenet's 40 tasks about 1.2 GB, split CIFAR-100 180 MB, against
        4× that as float32 train and validation tensors for each task. Images are shipped
        decoded rather than as files or raw arrays, so no worker's JPEG decoder or resize
        kernel can make its splits differ from the driver's.
        """
        shipped: dict[int, tuple[ImageSource, ImageSource]] = {}
        for index in range(self._num_tasks):
            train_src, test_src = self._sources(index)
            train_rows, val_rows = self.split_rows(index)
            shipped[index] = (
                DecodedSource(train_src, torch.cat([train_rows, val_rows])),
                DecodedSource(test_src, torch.arange(len(test_src))),
            )
            # the statistics too, while decoded: COMMIT records them in the model file
            self._pixel_stats(index, shipped[index][0].images(train_rows))
        clone = copy.copy(self)
        for name in self._bulk:
            setattr(clone, name, None)
        clone.device = torch.device("cpu")
        clone._loaded = None
        clone._stats = {}
        clone._test_cache = {}
        clone._shipped = shipped
        return clone


def class_split_check(
    stream: str,
    num_tasks: int,
    classes_per_task: int,
    available: int,
    where: str,
    error: type[UsageError] = ConfigError,
) -> None:
    """Fail before any training when the classes cannot fill ``num_tasks`` tasks: a
    ConfigError for a fixed data set, a DataError (``error``) for a folder short of classes."""
    if classes_per_task < 1:
        raise ConfigError(f"{stream}: classes_per_task must be at least 1, got {classes_per_task}")
    if num_tasks * classes_per_task > available:
        raise error(
            f"scenario.num_tasks={num_tasks}: {stream} needs {num_tasks} × {classes_per_task} = "
            f"{num_tasks * classes_per_task} classes but {where} has {available}; at most "
            f"{available // classes_per_task} tasks of {classes_per_task} classes fit"
        )
