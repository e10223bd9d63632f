"""Task data reaches Ray actors unchanged, whichever way it travels."""

from __future__ import annotations

import pickle

import pytest
import torch

from qpacknet.cluster.transfer import pack_split, pack_splits, unpack_split, unpack_splits
from qpacknet.scenarios import PermutedDigits, Split
from tests.conftest import BlobStream


def test_pack_unpack_round_trip() -> None:
    data = BlobStream(num_tasks=2).task(1)
    train, val = unpack_splits(pack_splits(data.train, data.val))
    for a, b in ((data.train, train), (data.val, val)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        assert b.x.dtype == torch.float32 and b.y.dtype == torch.int64
        assert b.x.data_ptr() != a.x.data_ptr()


def test_compact_splits_travel_as_uint8_with_their_statistics() -> None:
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        x = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g)
        mean, std = torch.tensor([120.5, 3.0, 64.25]), torch.tensor([50.0, 1.0, 7.5])
        return Split(x, torch.randint(0, 5, (n,), generator=g), mean, std)

    train, val, test = split(12), split(4), split(6)
    packed = pack_splits(train, val)
    assert packed["train.x"].dtype.name == "uint8" and packed["val.mean"].dtype.name == "float32"
    back = (*unpack_splits(packed), unpack_split(pack_split(test)))
    for a, b in zip((train, val, test), back, strict=True):
        assert b.x.dtype == torch.uint8 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
        assert torch.equal(a.inputs(), b.inputs())
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
