"""Imagenet100 (DESIGN.md §3): an ImageFolder of 100 ImageNet classes as 10 tasks of 10
classes, taken in sorted class-folder order.

Images are resized (shorter side to ``image_size``, then centre-cropped) when their task is
built. The default of 64×64 keeps a task's ~13 000 training images at about 160 MB of uint8
(the splits stay uint8, standardised per batch); at the usual 224×224 the same task would take
2 GB. JPEGs are decoded at a reduced DCT scale that still covers ``image_size``, several at a
time. The worker copy decodes all tasks once on the driver: about 1.7 GB at 64×64.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from qpacknet.errors import DataError
from qpacknet.scenarios.images import (
    FileSource,
    ImageSource,
    ImageStream,
    class_split_check,
    listing,
    resolve_threads,
)

IMAGENET_URL = "https://image-net.org/download.php"
CLASS_LIST_URL = "https://github.com/HobbitLong/CMC/blob/master/imagenet100.txt"
DEFAULT_SIZE = 64


def _classes(folder: Path) -> list[str]:
    try:
        classes, _ = find_classes(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return classes


def _missing_error(root: Path, entries: list[tuple[str, bool]]) -> DataError:
    return DataError(
        f"Imagenet100 not found: {root}/ needs a train/ and a val/ folder with one subfolder "
        "of images per class, the same class folders in both.\n"
        f"Expected under {root}/:\n{listing(entries)}\n"
        f"Build it from the ILSVRC-2012 training and validation images ({IMAGENET_URL}, "
        f"registration needed), e.g. with the 100 WordNet ids of {CLASS_LIST_URL} as class "
        "folder names; sort the validation images into the same class folders."
    )


class Imagenet100(ImageStream):
    """Imagenet100 from ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``;
    ``val`` is the test split. Task t holds the sorted classes ``t·k .. t·k + k - 1`` (k =
    ``classes_per_task``), relabelled ``0..k-1``; inputs are ``[3, image_size, image_size]``.
    A folder with more classes than the tasks need uses the first ones in sorted order."""

    name = "imagenet100"
    _key = "imagenet100"
    _resize = "shorter_side_crop"

    def __init__(
        self,
        root: Path,
        num_tasks: int = 10,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        device: torch.device | str = "cpu",
        classes_per_task: int = 10,
        image_size: int = DEFAULT_SIZE,
        decode_threads: int | None = None,
    ) -> None:
        super().__init__(
            num_tasks=num_tasks,
            val_fraction=val_fraction,
            seed=seed,
            train_limit=train_limit,
            device=device,
        )
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.root = Path(root)
        self.image_size = int(image_size)
        self.input_shape = (3, self.image_size, self.image_size)
        self._threads = resolve_threads(decode_threads)
        train_classes = _classes(self.root / "train")
        val_classes = _classes(self.root / "val")
        if not train_classes or not val_classes:
            raise _missing_error(
                self.root,
                [
                    ("train/<class>/*.JPEG", bool(train_classes)),
                    ("val/<class>/*.JPEG", bool(val_classes)),
                ],
            )
        class_split_check(
            "Imagenet100",
            num_tasks,
            classes_per_task,
            len(train_classes),
            f"{self.root / 'train'}/",
            error=DataError,
        )
        self.classes = train_classes[: num_tasks * classes_per_task]
        self._use_classes(self.classes, classes_per_task)
        no_val = sorted(set(self.classes) - set(val_classes))
        if no_val:
            raise DataError(
                f"Imagenet100: {self.root / 'val'}/ lacks the class folders {', '.join(no_val[:5])}"
                f"{' …' if len(no_val) > 5 else ''} that {self.root / 'train'}/ has; sort the "
                "validation images of every class into val/<class>/."
            )

    def _source(self, split: str, label_of: dict[str, int]) -> FileSource:
        folder = self.root / split
        try:
            samples = make_dataset(folder, label_of, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as exc:
            raise DataError(f"Imagenet100: {folder}/: {exc}") from exc
        return FileSource(
            [Path(p) for p, _ in samples],
            torch.tensor([y for _, y in samples], dtype=torch.int64),
            size=self.image_size,
            threads=self._threads,
        )

    def _load(self, index: int) -> tuple[ImageSource, ImageSource]:
        label_of = {name: j for j, name in enumerate(self.task_classes(index))}
        return self._source("train", label_of), self._source("val", label_of)
