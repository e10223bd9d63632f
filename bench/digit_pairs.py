"""Small two-class task streams cut from scikit-learn's 8x8 digits, written as ``.npz`` files.

Why: the bit-width search must hold on streams with few validation images per task (issue 11,
point 4). scikit-learn ships the digits inside its wheel, so these streams need no download.
Each task tells two digits apart (labels 0 and 1) and is one ``task-NNN.npz`` file in the
format :class:`qpacknet.scenarios.npz.NpzStream` reads: ``x``/``y`` (training), ``x_val``/``y_val``
and ``x_test``/``y_test``, drawn per class (stratified) with a seeded numpy generator. Inputs
are the 64 pixels scaled to [0, 1] and standardised over the whole data set (as the ``digits``
scenario does), float32.

    python bench/digit_pairs.py OUT_DIR [--pairs 3-8,1-7,4-9,2-5] [--val-per-class 20]
        [--test-per-class 60] [--train-per-class 0 (all the rest)] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

EASY = ((0, 1), (2, 3), (4, 6), (5, 7))
HARD = ((3, 8), (1, 7), (4, 9), (2, 5))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float64) / 16.0
    x = ((x - x.mean()) / x.std()).astype(np.float32)
    return x, data.target.astype(np.int64)


def write_pairs(
    root: Path,
    pairs: tuple[tuple[int, int], ...] = HARD,
    val_per_class: int = 20,
    test_per_class: int = 60,
    train_per_class: int | None = None,
    seed: int = 0,
) -> Path:
    """One ``task-NNN.npz`` per pair under ``root`` (created); returns ``root``. Per class,
    ``val_per_class`` validation and ``test_per_class`` test images, and the rest (at most
    ``train_per_class``) for training; the label is the digit's position in its pair."""
    x, y = _digits()
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for t, pair in enumerate(pairs):
        parts: dict[str, list[np.ndarray]] = {"": [], "_val": [], "_test": []}
        for label, digit in enumerate(pair):
            rows = rng.permutation(np.flatnonzero(y == digit))
            test = rows[:test_per_class]
            val = rows[test_per_class : test_per_class + val_per_class]
            train = rows[test_per_class + val_per_class :]
            if train_per_class is not None:
                train = train[:train_per_class]
            for key, idx in (("", train), ("_val", val), ("_test", test)):
                parts[key].append(np.stack([idx, np.full(len(idx), label)], 1))
        arrays: dict[str, np.ndarray] = {}
        for key, chunks in parts.items():
            rows_labels = np.concatenate(chunks)
            rows_labels = rows_labels[np.argsort(rows_labels[:, 0], kind="stable")]
            arrays[f"x{key}"] = x[rows_labels[:, 0]]
            arrays[f"y{key}"] = rows_labels[:, 1]
        np.savez(root / f"task-{t:03d}.npz", **arrays)
    return root


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in text.split(","):
        a, b = (int(d) for d in item.split("-"))
        out.append((a, b))
    return tuple(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pairs", type=_pairs, default=HARD, help="e.g. 3-8,1-7")
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=60)
    parser.add_argument("--train-per-class", type=int, default=0, help="0: all the rest")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = write_pairs(
        args.out,
        args.pairs,
        args.val_per_class,
        args.test_per_class,
        args.train_per_class or None,
        args.seed,
    )
    print(f"wrote {len(args.pairs)} tasks to {root}")


if __name__ == "__main__":
    main()
