"""Task streams (DESIGN.md §3): permuted MNIST and digits, the image scenarios, the user's own
.npz files or image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qpacknet.config import ScenarioConfig
from qpacknet.errors import ConfigError
from qpacknet.scenarios.base import InMemoryStream, Split, TaskData, TaskStream
from qpacknet.scenarios.cifar import SplitCIFAR100
from qpacknet.scenarios.datadir import is_writable, resolve_data_dir
from qpacknet.scenarios.digits import PermutedDigits
from qpacknet.scenarios.five_datasets import FiveDatasets
from qpacknet.scenarios.folders import FolderStream
from qpacknet.scenarios.imagefolder import Imagenet100
from qpacknet.scenarios.mnist_files import load_mnist
from qpacknet.scenarios.npz import NpzStream
from qpacknet.scenarios.pmnist import PermutedMNIST, PermutedStream
from qpacknet.scenarios.tinyimagenet import TinyImagenet

_IMAGE_STREAMS: dict[str, Any] = {
    "cifar100": SplitCIFAR100,
    "five_datasets": FiveDatasets,
    "tinyimagenet": TinyImagenet,
    "imagenet100": Imagenet100,
}

__all__ = [
    "FolderStream",
    "InMemoryStream",
    "NpzStream",
    "PermutedDigits",
    "PermutedMNIST",
    "PermutedStream",
    "Split",
    "TaskData",
    "TaskStream",
    "build_stream",
    "is_writable",
    "load_mnist",
    "resolve_data_dir",
]


def build_stream(
    cfg: ScenarioConfig, seed: int, data_dir: str | None, device: torch.device | str
) -> TaskStream:
    """The task stream a config names. ``data_dir`` (``--data-dir``) is the data root of the
    downloadable data sets (p-MNIST and the image scenarios; Imagenet100 lives in
    ``<data_dir>/imagenet100``); ``scenario.path`` names the user's ``npz`` or ``folders`` root, or
    overrides an image scenario's root.

    Kept as the single place that maps scenario names to classes, so the CLI, jobs and tests
    build identical streams from the same config and seed.
    """
    common = {
        "num_tasks": cfg.num_tasks,
        "val_fraction": cfg.val_fraction,
        "seed": seed,
        "train_limit": cfg.train_limit,
        "device": device,
    }
    if cfg.name == "pmnist":
        return PermutedMNIST(resolve_data_dir(data_dir), **common)
    if cfg.name == "digits":
        return PermutedDigits(**common)
    if cfg.name == "npz" and cfg.path:
        return NpzStream(Path(cfg.path), **common)
    if cfg.name == "folders" and cfg.path:
        return FolderStream(Path(cfg.path), **common)
    if cfg.name in _IMAGE_STREAMS:
        root = Path(cfg.path) if cfg.path else resolve_data_dir(data_dir)
        if cfg.name == "imagenet100" and not cfg.path:
            root = root / "imagenet100"
        return _IMAGE_STREAMS[cfg.name](root, **common)
    known = ", ".join(["pmnist", "digits", "npz", "folders", *_IMAGE_STREAMS])
    raise ConfigError(f"scenario.name: unknown scenario {cfg.name!r} (known: {known})")
