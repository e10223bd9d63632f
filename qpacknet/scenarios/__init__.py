"""Task streams (DESIGN.md §3): permuted MNIST and its offline stand-in, permuted digits."""

from __future__ import annotations

from pathlib import Path

import torch

from qpacknet.config import ScenarioConfig
from qpacknet.errors import ConfigError
from qpacknet.scenarios.base import InMemoryStream, Split, TaskData, TaskStream
from qpacknet.scenarios.datadir import is_writable, resolve_data_dir
from qpacknet.scenarios.digits import PermutedDigits
from qpacknet.scenarios.mnist_files import load_mnist
from qpacknet.scenarios.npz import NpzStream
from qpacknet.scenarios.pmnist import PermutedMNIST, PermutedStream

__all__ = [
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
    """The task stream a config names; ``data_dir`` (``--data-dir``) matters only for p-MNIST,
    ``scenario.path`` only for the user's own ``npz`` stream.

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
    raise ConfigError(f"scenario.name: unknown scenario {cfg.name!r} (known: pmnist, digits, npz)")
