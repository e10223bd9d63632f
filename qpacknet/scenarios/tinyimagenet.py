"""TinyImagenet (DESIGN.md §3): the 200 classes of the ``tiny-imagenet-200`` release split into
40 tasks of 5 classes, in the order of its ``wnids.txt``.

The release's labelled ``val`` set serves as the test split (its ``test`` images carry no
labels); the validation split is held out of each task's training images. Images are 64×64 JPEG
files decoded when their task is built: the 100 000 training images would take 1.2 GB as uint8,
a task's 2 500 take 31 MB. The worker copy of a distributed run decodes them all once, on the
driver (:meth:`~qpacknet.scenarios.images.ImageStream.for_workers`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from qpacknet.errors import DataError
from qpacknet.scenarios.images import (
    FileSource,
    ImageSource,
    ImageStream,
    class_split_check,
    data_dir_hint,
    listing,
    resolve_threads,
)

TINY_FOLDER = "tiny-imagenet-200"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
SIZE = 64
WNIDS = "wnids.txt"
VAL_ANNOTATIONS = "val/val_annotations.txt"


def tiny_dir(root: Path) -> Path:
    """``<root>/tiny-imagenet-200``, or ``root`` itself when it is that folder."""
    root = Path(root)
    return root if (root / WNIDS).is_file() else root / TINY_FOLDER


def _missing_error(root: Path, folder: Path, entries: list[tuple[str, bool]]) -> DataError:
    absent = sum(not present for _, present in entries)
    return DataError(
        f"TinyImagenet not found: {absent} of the {len(entries)} parts of the release are "
        f"missing from {folder}/.\n"
        f"Put the tiny-imagenet-200 release there, so that {folder}/ holds:\n"
        f"{listing(entries)}\n"
        f"(one train/<wnid>/ folder for each line of {WNIDS}).\n"
        f"Download {TINY_URL} and unzip it into {Path(root)}/ (it unpacks to {TINY_FOLDER}/).\n"
        + data_dir_hint(f"{TINY_FOLDER}/")
    )


def _read_wnids(path: Path) -> list[str]:
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{path} lists a class twice; unzip {TINY_URL} again")
    return wnids


def _read_val_annotations(path: Path) -> dict[str, list[str]]:
    """wnid → sorted file names under ``val/images``; a line is ``file<TAB>wnid<TAB>box``."""
    by_class: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise DataError(
                f"{path}, line {number}: expected 'file<TAB>wnid<TAB>box', got {line!r}; "
                f"unzip {TINY_URL} again"
            )
        by_class.setdefault(fields[1], []).append(fields[0])
    return {wnid: sorted(files) for wnid, files in by_class.items()}


class TinyImagenet(ImageStream):
    """TinyImagenet as ``num_tasks`` tasks of ``classes_per_task`` classes (40 × 5 in the
    paper), inputs ``[3, 64, 64]``; task t holds the classes on lines ``t·k .. t·k + k - 1``
    of ``wnids.txt``, relabelled ``0..k-1``. Grey JPEGs are converted to RGB."""

    name = "tinyimagenet"
    input_shape = (3, SIZE, SIZE)
    _resize = "shorter_side_crop"
    _key = "tinyimagenet"

    def __init__(
        self,
        root: Path,
        num_tasks: int = 40,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        device: torch.device | str = "cpu",
        classes_per_task: int = 5,
        decode_threads: int | None = None,
    ) -> None:
        super().__init__(
            num_tasks=num_tasks,
            val_fraction=val_fraction,
            seed=seed,
            train_limit=train_limit,
            device=device,
        )
        self.root = Path(root)
        self.folder = tiny_dir(self.root)
        self._threads = resolve_threads(decode_threads)
        entries = [
            (WNIDS, (self.folder / WNIDS).is_file()),
            ("train/<wnid>/images/*.JPEG", (self.folder / "train").is_dir()),
            ("val/images/*.JPEG", (self.folder / "val" / "images").is_dir()),
            (VAL_ANNOTATIONS, (self.folder / VAL_ANNOTATIONS).is_file()),
        ]
        if not all(present for _, present in entries):
            raise _missing_error(self.root, self.folder, entries)
        self.wnids = _read_wnids(self.folder / WNIDS)
        class_split_check(
            "TinyImagenet",
            num_tasks,
            classes_per_task,
            len(self.wnids),
            str(self.folder / WNIDS),
            error=DataError,
        )
        self._use_classes(self.wnids, classes_per_task)
        used = self.wnids[: num_tasks * self.classes_per_task]
        no_train = [w for w in used if not (self.folder / "train" / w).is_dir()]
        if no_train:
            raise DataError(
                f"TinyImagenet: {self.folder}/train/ lacks the folders of {len(no_train)} "
                f"classes listed in {WNIDS}: {', '.join(no_train[:5])}"
                f"{' …' if len(no_train) > 5 else ''} (each needs images/*.JPEG). "
                f"Unzip {TINY_URL} again into {self.root}/."
            )
        self._val_files = _read_val_annotations(self.folder / VAL_ANNOTATIONS)
        no_val = [w for w in used if not self._val_files.get(w)]
        if no_val:
            raise DataError(
                f"TinyImagenet: {self.folder / VAL_ANNOTATIONS} names no validation image for "
                f"{len(no_val)} classes: {', '.join(no_val[:5])}{' …' if len(no_val) > 5 else ''}. "
                f"Unzip {TINY_URL} again into {self.root}/."
            )

    def _load(self, index: int) -> tuple[ImageSource, ImageSource]:
        wnids = self.task_classes(index)
        label_of = {wnid: j for j, wnid in enumerate(wnids)}
        train_dir = self.folder / "train"
        try:
            samples = make_dataset(train_dir, label_of, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as exc:
            raise DataError(f"TinyImagenet: {train_dir}/: {exc}") from exc
        train = FileSource(
            [Path(p) for p, _ in samples],
            torch.tensor([y for _, y in samples], dtype=torch.int64),
            size=SIZE,
            threads=self._threads,
        )
        val_images = self.folder / "val" / "images"
        test_paths = [val_images / f for wnid in wnids for f in self._val_files[wnid]]
        test_labels = [label_of[wnid] for wnid in wnids for _ in self._val_files[wnid]]
        test = FileSource(
            test_paths,
            torch.tensor(test_labels, dtype=torch.int64),
            size=SIZE,
            threads=self._threads,
        )
        return train, test
