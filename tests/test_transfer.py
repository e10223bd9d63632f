"""Task data reaches Ray actors unchanged, whichever way it travels."""

from __future__ import annotations

import pickle

import pytest
import torch

from qpacknet.cluster.transfer import pack_splits, unpack_splits
from qpacknet.scenarios import PermutedDigits
from tests.conftest import BlobStream


def test_pack_unpack_round_trip() -> None:
    data = BlobStream(num_tasks=2).task(1)
    train, val = unpack_splits(pack_splits(data.train, data.val))
    for a, b in ((data.train, train), (data.val, val)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        assert b.x.dtype == torch.float32 and b.y.dtype == torch.int64
        assert b.x.data_ptr() != a.x.data_ptr()


def test_streams_without_a_worker_copy_send_each_task() -> None:
    assert BlobStream(num_tasks=2).for_workers() is None


@pytest.mark.parametrize("train_limit", [None, 300])
def test_worker_copy_of_a_permuted_stream_builds_identical_splits(
    train_limit: int | None,
) -> None:
    """The copy an actor unpickles must rebuild the driver's train/val splits bit for bit,
    without carrying the driver's cached test splits."""
    stream = PermutedDigits(num_tasks=3, seed=7, train_limit=train_limit)
    stream.test_split(0)
    copy = pickle.loads(pickle.dumps(stream.for_workers()))
    assert copy._test_cache == {} and stream._test_cache
    for t in range(3):
        data = stream.task(t)
        train, val = copy.fit_splits(t)
        assert torch.equal(stream.val_split(t).x, data.val.x)
        assert torch.equal(train.x, data.train.x) and torch.equal(train.y, data.train.y)
        assert torch.equal(val.x, data.val.x) and torch.equal(val.y, data.val.y)
    assert not torch.equal(copy.fit_splits(1)[0].x, copy.fit_splits(2)[0].x)
