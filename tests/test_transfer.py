"""Task data survives the numpy hand-over to Ray actors unchanged."""

from __future__ import annotations

import torch

from qpacknet.cluster.transfer import pack_task, unpack_task
from tests.conftest import BlobStream


def test_pack_unpack_round_trip() -> None:
    data = BlobStream(num_tasks=2).task(1)
    back = unpack_task(pack_task(data))
    assert (back.index, back.name, back.num_classes) == (data.index, data.name, data.num_classes)
    for split in ("train", "val", "test"):
        a, b = getattr(data, split), getattr(back, split)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        assert b.x.dtype == torch.float32 and b.y.dtype == torch.int64
