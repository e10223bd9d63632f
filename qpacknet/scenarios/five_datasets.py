"""5-datasets (DESIGN.md §3): MNIST, SVHN, FashionMNIST, CIFAR-10 and notMNIST as five
10-class tasks, every image 32×32×3 (grey ones resized from 28×28 and repeated over channels).

File names and layouts follow torchvision's data sets (``MNIST/raw``, ``FashionMNIST/raw``,
SVHN's ``*_32x32.mat``, ``cifar-10-batches-py``); notMNIST is an image folder per letter. The
idx files are parsed by :mod:`qpacknet.scenarios.mnist_files` (gzipped files stay packed, a
read-only data folder stays untouched) and the CIFAR pickles by :mod:`qpacknet.scenarios.cifar`.
All data sets a run uses are checked when the stream opens, so a missing one fails before any
training; each is read only when its task is built (the worker copy of a distributed run reads
them all once, on the driver).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10, SVHN, FashionMNIST
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from qpacknet.errors import ConfigError, DataError
from qpacknet.scenarios import mnist_files
from qpacknet.scenarios.cifar import (
    CIFAR10_FOLDER,
    cifar10_files,
    load_cifar10,
    missing,
)
from qpacknet.scenarios.datadir import ENV_VAR
from qpacknet.scenarios.images import (
    ArraySource,
    ImageSource,
    ImageStream,
    decode_images,
    grey_to_rgb,
    listing,
    resolve_threads,
)

DATASETS: tuple[str, ...] = ("mnist", "svhn", "fashion_mnist", "cifar10", "notmnist")
TITLES: dict[str, str] = {
    "mnist": "MNIST",
    "svhn": "SVHN",
    "fashion_mnist": "FashionMNIST",
    "cifar10": "CIFAR-10",
    "notmnist": "notMNIST",
}
SIZE = 32
SVHN_FOLDER = "svhn"
SVHN_FILES: tuple[str, ...] = (SVHN.split_list["train"][1], SVHN.split_list["test"][1])
SVHN_URL = SVHN.split_list["train"][0].rsplit("/", 1)[0] + "/"
FASHION_FOLDER = "FashionMNIST"
NOTMNIST_FOLDER = "notMNIST"
NOTMNIST_LETTERS: tuple[str, ...] = tuple("ABCDEFGHIJ")
NOTMNIST_URL = (
    "https://github.com/facebookresearch/Adversarial-Continual-Learning/raw/main/data/notMNIST.zip"
)
NOTMNIST_SOURCE = "http://yaroslavvb.blogspot.com/2011/09/notmnist-dataset.html"

Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _idx_listing(absent: list[str]) -> str:
    return listing([(f"{stem}.gz", stem not in absent) for stem in mnist_files.FILES])


def _mnist_missing(root: Path) -> str | None:
    absent = mnist_files.missing_files(root)
    if not absent:
        return None
    folder = mnist_files.raw_dir(root)
    return (
        f"MNIST: put these four files (gzipped or unpacked) into {folder}/:\n"
        f"{_idx_listing(absent)}\n"
        f"  Download them from {mnist_files.FALLBACK_MIRRORS[0]} (same file names)."
    )


def fashion_dir(root: Path) -> Path:
    """``<root>/FashionMNIST/raw``: torchvision's layout."""
    return Path(root) / FASHION_FOLDER / "raw"


def _fashion_absent(root: Path) -> list[str]:
    folder = fashion_dir(root)
    return [s for s in mnist_files.FILES if mnist_files.find_file(folder, s) is None]


def _fashion_missing(root: Path) -> str | None:
    absent = _fashion_absent(root)
    if not absent:
        return None
    folder = fashion_dir(root)
    return (
        f"FashionMNIST: put these four files (gzipped or unpacked) into {folder}/:\n"
        f"{_idx_listing(absent)}\n"
        f"  Download them from {FashionMNIST.mirrors[0]} (same file names)."
    )


def _svhn_missing(root: Path) -> str | None:
    folder = Path(root) / SVHN_FOLDER
    absent = missing(folder, SVHN_FILES)
    if not absent:
        return None
    return (
        f"SVHN: put these files into {folder}/:\n"
        f"{listing([(name, name not in absent) for name in SVHN_FILES])}\n"
        f"  Download them from {SVHN_URL} (format 2, cropped digits; same file names)."
    )


def _cifar10_missing(root: Path) -> str | None:
    folder = Path(root) / CIFAR10_FOLDER
    absent = missing(folder, cifar10_files())
    if not absent:
        return None
    return (
        f"CIFAR-10: put the python version of CIFAR-10 into {folder}/:\n"
        f"{listing([(name, name not in absent) for name in cifar10_files()])}\n"
        f"  Download {CIFAR10.url} and unpack it into {Path(root)}/ "
        f"(it unpacks to {CIFAR10_FOLDER}/)."
    )


def notmnist_dir(root: Path, split: str) -> Path:
    """``<root>/notMNIST/<split>``; the capitalised ``Train``/``Test`` of the 5-datasets
    reference archive are accepted too."""
    base = Path(root) / NOTMNIST_FOLDER
    for name in (split, split.capitalize()):
        if (base / name).is_dir():
            return base / name
    return base / split


def _notmnist_missing(root: Path) -> str | None:
    entries: list[tuple[str, bool]] = []
    for split in ("train", "test"):
        folder = notmnist_dir(root, split)
        absent = [c for c in NOTMNIST_LETTERS if not (folder / c).is_dir()]
        if len(absent) in (0, len(NOTMNIST_LETTERS)):
            entries.append((f"{split}/A/ … {split}/J/", not absent))
        else:
            entries.extend((f"{split}/{c}/", False) for c in absent)
    if all(present for _, present in entries):
        return None
    base = Path(root) / NOTMNIST_FOLDER
    return (
        f"notMNIST: put 28×28 grey letter images (PNG), one folder per letter A..J, into "
        f"{base}/:\n{listing(entries)}\n"
        f"  Download {NOTMNIST_URL} (the 5-datasets reference split) and unzip it into "
        f"{Path(root)}/ (it unpacks to {NOTMNIST_FOLDER}/Train and {NOTMNIST_FOLDER}/Test), "
        f"or split notMNIST_small ({NOTMNIST_SOURCE}) into train/ and test/ yourself."
    )


_MISSING: dict[str, Callable[[Path], str | None]] = {
    "mnist": _mnist_missing,
    "svhn": _svhn_missing,
    "fashion_mnist": _fashion_missing,
    "cifar10": _cifar10_missing,
    "notmnist": _notmnist_missing,
}


def check_present(root: Path, datasets: tuple[str, ...] = DATASETS) -> None:
    """Raise one DataError that lists every missing file or folder of ``datasets``."""
    root = Path(root)
    sections = {key: _MISSING[key](root) for key in datasets}
    absent = [key for key, text in sections.items() if text is not None]
    if not absent:
        return
    titles = ", ".join(TITLES[key] for key in absent)
    body = "\n\n".join(text for text in sections.values() if text is not None)
    raise DataError(
        f"5-datasets not found: {len(absent)} of the {len(datasets)} data sets it needs are "
        f"missing under {root}/ ({titles}).\n\n{body}\n\n"
        f"To use another data folder, pass --data-dir DIR or set {ENV_VAR}=DIR; the data sets "
        "then go under DIR/ in the same layout."
    )


def _read_fashion(root: Path) -> Arrays:
    folder = fashion_dir(root)
    arrays: dict[str, np.ndarray] = {}
    for stem in mnist_files.FILES:
        path = mnist_files.find_file(folder, stem)
        assert path is not None
        try:
            arr = mnist_files.read_idx(path)
        except DataError as exc:
            raise DataError(
                f"FashionMNIST file {path} is damaged or unreadable. Delete it and download "
                f"{FashionMNIST.mirrors[0]}{stem}.gz again into {folder}/."
            ) from exc
        images = "images" in stem
        if images:
            ok = arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[1:] == (28, 28)
        else:
            ok = arr.dtype == np.uint8 and arr.ndim == 1 and (not arr.size or arr.max() <= 9)
        if not ok:
            raise DataError(
                f"FashionMNIST file {path} does not hold "
                f"{'uint8 28×28 images' if images else 'uint8 labels 0..9'}. Download "
                f"{FashionMNIST.mirrors[0]}{stem}.gz again into {folder}/."
            )
        arrays[stem] = arr
    x_tr, y_tr, x_te, y_te = (torch.from_numpy(arrays[s]) for s in mnist_files.FILES)
    if x_tr.shape[0] != y_tr.shape[0] or x_te.shape[0] != y_te.shape[0]:
        raise DataError(
            f"FashionMNIST files in {folder}/ disagree on the number of images and labels; "
            "download all four again."
        )
    return x_tr.unsqueeze(1), y_tr.long(), x_te.unsqueeze(1), y_te.long()


def _read_mnist(root: Path) -> Arrays:
    x_tr, y_tr, x_te, y_te = mnist_files.load_mnist(root, download=False)
    return (
        torch.from_numpy(x_tr).unsqueeze(1),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te).unsqueeze(1),
        torch.from_numpy(y_te),
    )


def _read_svhn_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``X`` uint8 ``[32, 32, 3, N]`` and ``y`` ``[N, 1]`` with digit 0 stored as 10."""
    import scipy.io

    hint = f"Delete it and download {SVHN_URL}{path.name} again into {path.parent}/."
    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as exc:
        raise DataError(f"SVHN file {path} is not a readable .mat file ({exc}). {hint}") from exc
    if "X" not in mat or "y" not in mat:
        raise DataError(f"SVHN file {path} lacks the arrays X and y. {hint}")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(
            f"SVHN file {path}: X is {x.dtype} {list(x.shape)}, not uint8 [32, 32, 3, N]. {hint}"
        )
    if y.shape[0] != x.shape[3] or (y.size and (y.min() < 0 or y.max() > 10)):
        raise DataError(f"SVHN file {path}: y must hold one label 1..10 per image. {hint}")
    labels = torch.from_numpy(y.astype(np.int64))
    labels[labels == 10] = 0
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    return images, labels


def _read_svhn(root: Path) -> Arrays:
    folder = Path(root) / SVHN_FOLDER
    train = _read_svhn_split(folder / SVHN_FILES[0])
    test = _read_svhn_split(folder / SVHN_FILES[1])
    return train[0], train[1], test[0], test[1]


def _read_notmnist_split(root: Path, split: str, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    folder = notmnist_dir(root, split)
    classes = {letter: i for i, letter in enumerate(NOTMNIST_LETTERS)}
    try:
        samples = make_dataset(folder, classes, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise DataError(f"notMNIST: {folder}/ lacks images: {exc}") from exc
    # The public notMNIST archives contain a few empty files; the reference loaders skip them.
    images, kept = decode_images(
        [Path(p) for p, _ in samples], mode="L", size=28, threads=threads, skip_unreadable=True
    )
    labels = torch.tensor([samples[i][1] for i in kept], dtype=torch.int64)
    return images, labels


class FiveDatasets(ImageStream):
    """5-datasets: task 0 MNIST, 1 SVHN, 2 FashionMNIST, 3 CIFAR-10, 4 notMNIST (10 classes
    each, inputs ``[3, 32, 32]``). ``num_tasks`` below 5 uses the first data sets only.

    A task's data set is read from disk when the task is built and dropped when the next one
    is; ``val_fraction`` of its training images are held out, seeded per task.
    """

    name = "five_datasets"
    input_shape = (3, SIZE, SIZE)
    _resize = "bilinear"
    num_classes = 10
    _key = "five_datasets"

    def __init__(
        self,
        root: Path,
        num_tasks: int = 5,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        device: torch.device | str = "cpu",
        decode_threads: int | None = None,
    ) -> None:
        if not 1 <= num_tasks <= len(DATASETS):
            raise ConfigError(
                f"scenario.num_tasks={num_tasks}: 5-datasets has {len(DATASETS)} tasks "
                f"({', '.join(TITLES[d] for d in DATASETS)})"
            )
        super().__init__(
            num_tasks=num_tasks,
            val_fraction=val_fraction,
            seed=seed,
            train_limit=train_limit,
            device=device,
        )
        self.root = Path(root)
        self.datasets = DATASETS[:num_tasks]
        self._threads = resolve_threads(decode_threads)
        check_present(self.root, self.datasets)

    def task_name(self, index: int) -> str:
        return f"{self.name}-{index}-{DATASETS[index]}"

    def _load(self, index: int) -> tuple[ImageSource, ImageSource]:
        key = DATASETS[index]
        if key == "svhn":
            x_tr, y_tr, x_te, y_te = _read_svhn(self.root)
            return ArraySource(x_tr, y_tr), ArraySource(x_te, y_te)
        if key == "cifar10":
            x_tr, y_tr, x_te, y_te = load_cifar10(self.root)
            return ArraySource(x_tr, y_tr), ArraySource(x_te, y_te)
        if key == "notmnist":
            x_tr, y_tr = _read_notmnist_split(self.root, "train", self._threads)
            x_te, y_te = _read_notmnist_split(self.root, "test", self._threads)
        else:
            reader = _read_mnist if key == "mnist" else _read_fashion
            x_tr, y_tr, x_te, y_te = reader(self.root)
        return ArraySource(x_tr, y_tr, grey_to_rgb), ArraySource(x_te, y_te, grey_to_rgb)
