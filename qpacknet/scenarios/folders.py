"""The user's own image stream: one folder of images per task, learned in sorted name order.

``scenario.path`` holds one sub-folder per task. A task folder is either

* ``<task>/train/<class>/*.png`` with optional ``<task>/val/<class>/…`` and
  ``<task>/test/<class>/…``, or
* ``<task>/<class>/*.png`` directly (no ``train/``), the ImageFolder layout.

Missing validation or test splits are held out of the training images (seeded, per task), as
:class:`~qpacknet.scenarios.npz.NpzStream` does. Labels are the task's sorted training
class-folder names ``0..k-1`` (task-incremental heads: every task has its own label space), and
``num_classes``, the width of every head, is the largest ``k`` over the stream's tasks, the way
NpzStream takes the largest label over its files. The folder structure of every task (classes,
empty class folders, validation or test classes unknown to training) is checked when the stream
is opened, so a bad folder fails before any training; images are decoded, and checked for one
shared shape, when their task is loaded. Adding a task folder makes a next task that
``qpacknet learn`` (or a resumed run with more tasks) can learn.

Images are not resized: the network's input shape is the first image's ``[C, H, W]``, and a
resized copy of someone's data set is better made once by the user than silently on every run.
Every split stays uint8 with the per-channel statistics of the task's training rows and is
standardised batch by batch, as the other image streams do (:mod:`qpacknet.scenarios.images`);
the worker copy (:meth:`FolderStream.for_workers`) carries every task's decoded images.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms.v2 import functional as tvf

from qpacknet.errors import DataError
from qpacknet.preparation import Preparation
from qpacknet.scenarios.base import Split, TaskData, TaskStream, check_stream_args, holdout_split
from qpacknet.scenarios.images import channel_stats, resolve_threads
from qpacknet.seeding import generator

# PIL modes decoded as one grey channel; every other mode (palette, RGBA, CMYK…) becomes RGB.
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
_EXAMPLE = "<task>/train/<class>/*.png (optionally <task>/val/… and <task>/test/…)"


@dataclass(frozen=True)
class TaskFiles:
    """One task folder, listed: its training classes and every split's ``(file, label)``."""

    folder: Path
    train_dir: Path
    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]


def _class_folders(folder: Path) -> list[str]:
    """Sorted class-folder names (hidden ones such as ``.ipynb_checkpoints`` skipped)."""
    try:
        classes, _ = find_classes(folder)
    except FileNotFoundError:
        return []
    return [c for c in classes if not c.startswith(".")]


def load_image(path: Path) -> torch.Tensor:
    """uint8 ``[C, H, W]`` of one file: C = 1 for greyscale files, 3 for everything else."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if img.mode in _GREY_MODES else "RGB")
            return tvf.pil_to_tensor(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"cannot read image {path} ({exc}); replace it with an intact copy or delete it"
        ) from None


class FolderStream(TaskStream):
    """Tasks from ``root/<task>/…`` image folders; ``num_classes`` is the largest number of
    training classes of a task."""

    name = "folders"

    def __init__(
        self,
        root: Path,
        num_tasks: int,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        device: torch.device | str = "cpu",
        decode_threads: int | None = None,
    ) -> None:
        check_stream_args(num_tasks, train_limit, val_fraction)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(
                f"scenario.path {str(self.root)!r} is not a folder; make one sub-folder of "
                f"images per task there: {_EXAMPLE}, or <task>/<class>/*.png"
            )
        self.folders = sorted(
            p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if num_tasks > len(self.folders):
            raise DataError(
                f"scenario.num_tasks={num_tasks} but {self.root} holds {len(self.folders)} task "
                f"folder(s); add task folders ({_EXAMPLE}) or lower num_tasks"
            )
        self._num_tasks = num_tasks
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_limit = train_limit
        self.device = torch.device(device)
        self._threads = resolve_threads(decode_threads)
        self._files = [self._scan(folder) for folder in self.folders[:num_tasks]]
        self.num_classes = max(len(files.classes) for files in self._files)
        self.first_image = self._files[0].splits["train"][0][0]
        self.input_shape: tuple[int, ...] = tuple(load_image(self.first_image).shape)
        self._cache: dict[int, TaskData] = {}
        self._tests: dict[int, Split] = {}
        self._stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._shipped: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None

    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    def classes(self, index: int) -> list[str]:
        """Task ``index``'s class-folder names; label j of the task is the j-th."""
        return list(self._files[self._check_index(index)].classes)

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self._num_tasks:
            raise IndexError(f"task {index} out of range 0..{self._num_tasks - 1}")
        return int(index)

    def _scan(self, folder: Path) -> TaskFiles:
        """List a task folder and check its structure (no image is opened)."""
        split_layout = (folder / "train").is_dir()
        if not split_layout:
            stray = [s for s in ("val", "test") if (folder / s).is_dir()]
            if stray:
                raise DataError(
                    f"{folder} has {stray[0]}/ but no train/; put the training images in "
                    f"{folder}/train/<class>/, or, without train/, put the class folders "
                    f"directly in {folder}/ (validation and test images are then held out)"
                )
        train_dir = folder / "train" if split_layout else folder
        classes = _class_folders(train_dir)
        if not classes:
            raise DataError(
                f"{train_dir} holds no class folders; put each class's images in "
                f"{train_dir}/<class>/ (expected {_EXAMPLE}, or <task>/<class>/*.png)"
            )
        label_of = {name: j for j, name in enumerate(classes)}
        splits = {"train": self._samples(train_dir, classes, label_of)}
        for split in ("val", "test") if split_layout else ():
            split_dir = folder / split
            if not split_dir.is_dir():
                continue
            found = _class_folders(split_dir)
            if not found:
                raise DataError(
                    f"{split_dir} holds no class folders; put its images in {split_dir}/<class>/ "
                    f"with the class names of {train_dir}, or delete {split_dir} to hold "
                    f"{'validation' if split == 'val' else 'test'} images out of train/"
                )
            unknown = [name for name in found if name not in label_of]
            if unknown:
                raise DataError(
                    f"{split_dir / unknown[0]}: class {unknown[0]!r} is not among the training "
                    f"classes of {train_dir} ({', '.join(classes)}), so it has no label in the "
                    f"task's range 0..{len(classes) - 1}; add {train_dir / unknown[0]}/ with "
                    "training images of that class, or remove the folder"
                )
            splits[split] = self._samples(split_dir, found, label_of)
        return TaskFiles(folder, train_dir, classes, splits)

    @staticmethod
    def _samples(
        folder: Path, classes: list[str], label_of: dict[str, int]
    ) -> list[tuple[Path, int]]:
        """``(file, label)`` of every image under ``folder/<class>/``, class by class in sorted
        order (files sorted within a class, as ImageFolder lists them)."""
        samples = make_dataset(
            folder, {c: label_of[c] for c in classes}, extensions=IMG_EXTENSIONS, allow_empty=True
        )
        counts = {label_of[c]: 0 for c in classes}
        for _, label in samples:
            counts[label] += 1
        empty = [c for c in classes if counts[label_of[c]] == 0]
        if empty:
            raise DataError(
                f"class folder {folder / empty[0]} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                "add images of that class or delete the folder"
            )
        return [(Path(path), label) for path, label in samples]

    def _decode(self, samples: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[N, C, H, W]`` and int64 labels of ``samples``; every image must have the
        stream's input shape (PIL releases the GIL while decoding, so threads help)."""
        paths = [path for path, _ in samples]
        if self._threads > 1 and len(paths) > 1:
            with ThreadPoolExecutor(max_workers=self._threads) as pool:
                images = list(pool.map(load_image, paths))
        else:
            images = [load_image(p) for p in paths]
        for path, img in zip(paths, images, strict=True):
            if tuple(img.shape) != self.input_shape:
                c, h, w = self.input_shape
                raise DataError(
                    f"{path}: image has shape {tuple(img.shape)} (channels, height, width) but "
                    f"the stream's first image {self.first_image} has {self.input_shape}; all "
                    f"images must have one size and colour mode: resize them to {w}x{h} pixels "
                    f"and save them all as {'greyscale' if c == 1 else 'RGB'}"
                )
        labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        return torch.stack(images), labels

    def _images(self, index: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``index``'s decoded ``split`` (``train``, ``val`` or ``test``): from the worker
        copy's arrays when this is one, else from the files."""
        if self._shipped is not None:
            return self._shipped[index][split]
        return self._decode(self._files[index].splits[split])

    def for_workers(self) -> FolderStream:
        """A CPU copy carrying every task's decoded uint8 images, put in the object store once
        per run; actors build each task's splits from it bit for bit (same seeded hold-outs,
        same statistics). Cost, paid once on the driver: every image file of the run is
        decoded up front and the copy holds them all as uint8 (a quarter of float32's bytes).
        """
        shipped = {
            index: {split: self._decode(samples) for split, samples in files.splits.items()}
            for index, files in enumerate(self._files)
        }
        clone = copy.copy(self)
        clone.device = torch.device("cpu")
        clone._cache, clone._tests, clone._stats = {}, {}, {}
        clone._shipped = shipped
        return clone

    def _held_out(
        self, index: int, n: int, key: str, train_dir: Path
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded ``(keep, held)`` rows out of ``n``; a DataError where fewer than 2 are left
        (``holdout_split`` would raise a bare ValueError)."""
        if n < 2:
            folder = self._files[index].folder
            raise DataError(
                f"{train_dir} has too few images ({n} left) to hold out {key} images; add "
                f"images, or give the task its own splits: {folder}/train/<class>/, "
                f"{folder}/val/<class>/ and {folder}/test/<class>/"
            )
        return holdout_split(n, self.val_fraction, self.seed, f"folders-{key}-{index}")

    def task(self, index: int) -> TaskData:
        index = self._check_index(index)
        if index in self._cache:
            return self._cache[index]
        files = self._files[index]
        train_dir = files.train_dir
        x, y = self._images(index, "train")
        rest = torch.arange(len(y))
        if "test" in files.splits:
            test_x, test_y = self._images(index, "test")
        else:
            keep, held = self._held_out(index, len(rest), "test", train_dir)
            test_x, test_y = x[held], y[held]
            rest = rest[keep]
        if "val" in files.splits:
            val_x, val_y = self._images(index, "val")
        else:
            keep, held = self._held_out(index, len(rest), "validation", train_dir)
            val_x, val_y = x[rest[held]], y[rest[held]]
            rest = rest[keep]
        missing = sorted(set(range(len(files.classes))) - set(y[rest].tolist()))
        if missing:
            name = files.classes[missing[0]]
            raise DataError(
                f"{train_dir / name} has too few images: none is left for training after "
                f"validation and test images were held out (val_fraction={self.val_fraction}); "
                "add images of that class or give the task val/ and test/ folders"
            )
        if self.train_limit is not None and self.train_limit < len(rest):
            # a seeded subset, not the first rows: files are listed class by class
            g = generator(self.seed, "folders-limit", index)
            rest = rest[torch.randperm(len(rest), generator=g)[: self.train_limit]].sort().values
        train_x = x[rest]
        mean, std = channel_stats(train_x)
        self._stats[index] = (mean, std)
        data = TaskData(
            index,
            f"folders-{files.folder.name}",
            self.num_classes,
            Split(train_x, y[rest], mean, std),
            Split(val_x, val_y, mean, std),
            Split(test_x, test_y, mean, std),
        ).to(self.device)
        self._cache = {index: data}
        self._tests[index] = data.test
        return data

    def test_split(self, index: int) -> Split:
        """Cached: old tasks' test splits are re-evaluated after every commit."""
        return self._tests[index] if index in self._tests else self.task(index).test

    def input_preparation(self, index: int) -> Preparation:
        """Raw input: a uint8 image of the stream's size (not resized, as above), standardised
        per channel with the task's training statistics in pixel units."""
        index = self._check_index(index)
        if index not in self._stats:
            self.task(index)
        mean, std = self._stats[index]
        return Preparation.uint8_image(self.input_shape, mean, std, self.name)

    def standardisation(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``index``'s per-channel ``(mean, std)`` in [0, 1] pixel units (float32 ``[C]``):
        a new image of the task is fed as ``(pixel / 255 - mean) / std``."""
        index = self._check_index(index)
        if index not in self._stats:
            self.task(index)
        mean, std = self._stats[index]
        return mean / 255.0, std / 255.0
