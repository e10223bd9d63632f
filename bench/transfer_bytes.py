"""Bytes an image task puts in Ray's object store: uint8 splits (what the executors ship) vs
the float32 splits shipped before, on a synthetic CIFAR-100 of the real size written in the
official format (``bench/stages.py``'s writer), plus the pickled worker copy of the whole run.

    python bench/transfer_bytes.py
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

from stages import write_cifar100

from qpacknet.cluster.transfer import pack_split, pack_splits
from qpacknet.scenarios.cifar import SplitCIFAR100


def _mb(packed: dict[str, Any]) -> float:
    return sum(getattr(v, "nbytes", 0) for v in packed.values()) / 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cifar100(root)
        stream = SplitCIFAR100(root)
        train, val = stream.fit_splits(0)
        test = stream.test_split(0)
        fit_u8 = _mb(pack_splits(train, val))
        fit_f32 = _mb(pack_splits(train.standardised(), val.standardised()))
        test_u8, test_f32 = _mb(pack_split(test)), _mb(pack_split(test.standardised()))
        copy_mb = len(pickle.dumps(stream.for_workers())) / 1e6
    print(f"task 1: {len(train)} train + {len(val)} val rows, {len(test)} test rows")
    print(f"train+val: uint8 {fit_u8:.1f} MB, float32 {fit_f32:.1f} MB ({fit_f32 / fit_u8:.2f}x)")
    print(f"test:      uint8 {test_u8:.1f} MB, float32 {test_f32:.1f} MB")
    print(f"worker copy of the 10-task stream (pickled): {copy_mb:.1f} MB")


if __name__ == "__main__":
    main()
