"""Permuted MNIST (DESIGN.md §3): every task is MNIST under its own fixed pixel permutation.

Ten permuted float copies of MNIST would take about 1.9 GB, so only the decoded uint8 images
are kept and each task is materialised when asked for. The permutation and the validation
split are derived from the run seed alone, so any process rebuilds exactly the same task.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from pathlib import Path

import numpy as np
import torch

from qpacknet.preparation import Preparation
from qpacknet.scenarios.base import (
    Split,
    TaskData,
    TaskStream,
    check_stream_args,
    holdout_split,
)
from qpacknet.scenarios.mnist_files import load_mnist
from qpacknet.seeding import generator

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class PermutedStream(TaskStream):
    """Shared machinery of pixel-permuted streams: lazy tasks, cached test splits.

    Subclasses hold the base rows (``_train_x`` / ``_test_x``, flattened) and turn a block of
    them into standardised float32 features in :meth:`_features`.
    """

    num_classes: int = 10
    _perm_key: str

    def __init__(
        self,
        *,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        train_idx: torch.Tensor,
        val_idx: torch.Tensor,
        num_tasks: int,
        seed: int,
        train_limit: int | None,
        device: torch.device | str,
    ) -> None:
        check_stream_args(num_tasks, train_limit)
        self._num_tasks = int(num_tasks)
        self.seed = int(seed)
        self.device = torch.device(device)
        self._train_x = train_x
        self._train_y = train_y
        self._test_x = test_x
        self._test_y = test_y
        self._train_idx = train_idx if train_limit is None else train_idx[:train_limit]
        self._val_idx = val_idx
        self._test_cache: dict[int, Split] = {}

    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def split_sizes(self) -> tuple[int, int, int]:
        """``(train, val, test)`` rows per task, without building a task."""
        return len(self._train_idx), len(self._val_idx), int(self._test_y.shape[0])

    @abstractmethod
    def _features(self, rows: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """Standardised float32 features ``[N, num_features]`` of base ``rows``, permuted."""

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self._num_tasks:
            raise IndexError(
                f"task index {index} out of range: {self.name} has {self._num_tasks} tasks "
                f"(0..{self._num_tasks - 1})"
            )
        return int(index)

    def permutation(self, index: int) -> torch.Tensor:
        """Task ``index``'s pixel permutation (int64 ``[num_features]``): feature j of the
        task is base pixel ``perm[j]``. Every task is permuted, task 0 included."""
        index = self._check_index(index)
        return torch.randperm(
            self.num_features, generator=generator(self.seed, self._perm_key, index)
        )

    def _split(self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> Split:
        return Split(self._features(x, perm), y.clone()).to(self.device)

    def test_split(self, index: int) -> Split:
        index = self._check_index(index)
        split = self._test_cache.get(index)
        if split is None:
            split = self._split(self._test_x, self._test_y, self.permutation(index))
            self._test_cache[index] = split
        return split

    def val_split(self, index: int) -> Split:
        index = self._check_index(index)
        rows = self._val_idx
        return self._split(self._train_x[rows], self._train_y[rows], self.permutation(index))

    def fit_splits(self, index: int) -> tuple[Split, Split]:
        index = self._check_index(index)
        perm = self.permutation(index)
        train = self._split(self._train_x[self._train_idx], self._train_y[self._train_idx], perm)
        val = self._split(self._train_x[self._val_idx], self._train_y[self._val_idx], perm)
        return train, val

    def for_workers(self) -> PermutedStream:
        """This stream on the CPU without its test cache: the base images (uint8 for MNIST,
        47 MB) travel once per run instead of 170 MB of float32 features per task."""
        clone = copy.copy(self)
        clone.device = torch.device("cpu")
        clone._test_cache = {}
        return clone

    def task(self, index: int) -> TaskData:
        index = self._check_index(index)
        train, val = self.fit_splits(index)
        return TaskData(
            index=index,
            name=f"{self.name}-{index}",
            num_classes=self.num_classes,
            train=train,
            val=val,
            test=self.test_split(index),
        )


class PermutedMNIST(PermutedStream):
    """p-MNIST: 784 standardised pixels per image, 10 classes, ``num_tasks`` permutations.

    ``val_fraction`` of the 60k training images are held out (the same rows for every task);
    ``train_limit`` keeps only the first rows of the rest, for quick runs.
    """

    name = "pmnist"
    input_shape = (784,)
    num_classes = 10
    _perm_key = "pmnist-perm"

    def __init__(
        self,
        root: Path,
        num_tasks: int = 10,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        device: torch.device | str = "cpu",
        download: bool = True,
    ) -> None:
        x_train, y_train, x_test, y_test = load_mnist(Path(root), download=download)
        train_idx, val_idx = holdout_split(len(y_train), val_fraction, seed, "pmnist-val")
        super().__init__(
            train_x=torch.from_numpy(x_train.reshape(len(x_train), -1)),
            train_y=torch.from_numpy(y_train),
            test_x=torch.from_numpy(x_test.reshape(len(x_test), -1)),
            test_y=torch.from_numpy(y_test),
            train_idx=train_idx,
            val_idx=val_idx,
            num_tasks=num_tasks,
            seed=seed,
            train_limit=train_limit,
            device=device,
        )

    def _features(self, rows: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        x = rows.index_select(1, perm).to(torch.float32)
        return x.div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)

    def input_preparation(self, index: int) -> Preparation:
        """Raw input: the task's permuted uint8 image, 784 pixels (or 28x28), scaled to [0, 1]
        and standardised with MNIST's published mean and std, as :meth:`_features` does."""
        self._check_index(index)
        return Preparation(
            kind="features",
            shape=self.input_shape,
            dtype="uint8",
            value_range=(0.0, 255.0),
            scale=255.0,
            mean=(MNIST_MEAN,),
            std=(MNIST_STD,),
            scenario=self.name,
        )
