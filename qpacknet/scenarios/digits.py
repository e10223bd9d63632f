"""Permuted 8x8 digits: a p-MNIST stand-in that needs no download and trains in seconds.

scikit-learn ships the 1797 images inside the wheel, so tests, demos and offline machines
get a real (if small) permuted-pixel stream with the same shape of pipeline as p-MNIST.
"""

from __future__ import annotations

import torch

from qpacknet.preparation import Preparation
from qpacknet.scenarios.pmnist import PermutedStream
from qpacknet.seeding import generator

TEST_FRACTION = 0.2
NUM_CLASSES = 10


def stratified_split(
    labels: torch.Tensor, val_fraction: float, seed: int, key: str = "digits-split"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded ``(train_idx, val_idx, test_idx)``, each sorted, split class by class.

    With only ~180 images per class, a plain random split can leave a class visibly short
    in the small validation set; splitting per class keeps every split's class mix close to
    the data set's.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    g = generator(seed, key)
    train: list[torch.Tensor] = []
    val: list[torch.Tensor] = []
    test: list[torch.Tensor] = []
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        n_test = round(len(rows) * TEST_FRACTION)
        rest = rows[n_test:]
        n_val = round(len(rest) * val_fraction)
        test.append(rows[:n_test])
        val.append(rest[:n_val])
        train.append(rest[n_val:])
    train_idx, val_idx, test_idx = (torch.cat(parts).sort().values for parts in (train, val, test))
    return train_idx, val_idx, test_idx


class PermutedDigits(PermutedStream):
    """scikit-learn's digits as a permuted stream: 64 standardised pixels, 10 classes.

    20% of the images are the test set, ``val_fraction`` of the rest validation; the split is
    the same for every task, each task has its own pixel permutation.
    """

    name = "digits"
    input_shape = (64,)
    num_classes = NUM_CLASSES
    _perm_key = "digits-perm"

    def __init__(
        self,
        num_tasks: int = 10,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        from sklearn.datasets import load_digits  # 1 s import: only when this stream is used

        data = load_digits()
        x = torch.as_tensor(data.data, dtype=torch.float64) / 16.0
        mean, std = x.mean(), x.std()
        x = ((x - mean) / std).to(torch.float32)
        y = torch.as_tensor(data.target, dtype=torch.int64)
        train_idx, val_idx, test_idx = stratified_split(y, val_fraction, seed)
        super().__init__(
            train_x=x,
            train_y=y,
            test_x=x[test_idx],
            test_y=y[test_idx],
            train_idx=train_idx,
            val_idx=val_idx,
            num_tasks=num_tasks,
            seed=seed,
            train_limit=train_limit,
            device=device,
        )
        self._mean, self._std = float(mean), float(std)

    def input_preparation(self, index: int) -> Preparation:
        """Raw input: the 64 pixel values 0..16 of ``load_digits().data``, permuted by the
        task (:meth:`permutation`), divided by 16 and standardised in float64 with the whole
        data set's mean and std, as above."""
        self._check_index(index)
        return Preparation(
            kind="features",
            shape=self.input_shape,
            dtype="float",
            value_range=(0.0, 16.0),
            compute="float64",
            scale=16.0,
            mean=(self._mean,),
            std=(self._std,),
            scenario=self.name,
        )

    def _features(self, rows: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        return rows.index_select(1, perm)
