"""Compact image splits (DESIGN.md §4): uint8 pixels with per-channel mean and std, standardised
batch by batch, give exactly the network inputs, trainings and evaluations that splits
standardised as a whole gave."""

from __future__ import annotations

import pytest
import torch

from qpacknet.config import NetConfig, TrainConfig
from qpacknet.nets import build
from qpacknet.scenarios.base import Split, standardise
from qpacknet.train import evaluate, fit, logits_of


def _images(n: int, channels: int = 3, size: int = 6, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    x[:, 0] //= 3  # channels with different statistics
    y = torch.randint(0, 4, (n,), generator=g)
    xf = x.to(torch.float64)
    mean = xf.mean(dim=(0, 2, 3)).to(torch.float32)
    std = xf.std(dim=(0, 2, 3), unbiased=False).to(torch.float32)
    return Split(x, y, mean, std)


def test_batches_standardise_bit_for_bit_like_the_whole_split() -> None:
    split = _images(103)
    assert split.compact and split.x.dtype == torch.uint8
    whole = (split.x.to(torch.float32) - split.mean.view(1, -1, 1, 1)) / split.std.view(1, -1, 1, 1)
    assert torch.equal(split.inputs(), whole)
    assert torch.equal(standardise(split.x, split.mean, split.std), whole)
    for start, stop in ((0, 16), (16, 32), (96, 103), (50, 51)):
        assert torch.equal(split.inputs(slice(start, stop)), whole[start:stop])
    idx = torch.randperm(103, generator=torch.Generator().manual_seed(1))[:40]
    assert torch.equal(split.inputs(idx), whole[idx])
    assert torch.equal(split.standardised().x, whole) and split.standardised().mean is None
    moved = split.to("cpu")
    assert moved.x.dtype == torch.uint8 and torch.equal(moved.mean, split.mean)
    assert len(split) == 103


def test_float_splits_just_index() -> None:
    x = torch.randn(10, 7)
    split = Split(x, torch.zeros(10, dtype=torch.long))
    assert not split.compact and split.standardised() is split
    assert split.inputs() is x and torch.equal(split.inputs(slice(2, 5)), x[2:5])
    idx = torch.tensor([3, 1, 8])
    assert torch.equal(split.inputs(idx), x[idx])


def test_split_rejects_inconsistent_standardisation() -> None:
    x = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.long)
    mean, std = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="uint8 images need"):
        Split(x, y)
    with pytest.raises(ValueError, match="both mean and std"):
        Split(x, y, mean=mean)
    with pytest.raises(ValueError, match="uint8"):
        Split(x.float(), y, mean, std)
    with pytest.raises(ValueError, match=r"mean must be float32 \[3\]"):
        Split(x, y, torch.zeros(2), std)


def test_training_and_evaluation_equal_those_on_standardised_floats() -> None:
    """fit, evaluate and logits_of gather compact splits per batch: the weights, accuracies and
    logits equal those of the same splits standardised up front."""
    train, val = _images(48, seed=2), _images(20, seed=3)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, lr_min=0.001)
    results = []
    for tr, va in ((train, val), (train.standardised(), val.standardised())):
        torch.manual_seed(0)
        net = build(NetConfig(backbone="tinynet", width=1 / 16), (3, 6, 6), 4, 2)
        accs = fit(
            net, tr, va, cfg, seed=1, task=0, stage="t", epochs=2, schedule=True, keep_best=True
        )
        results.append((net, accs, evaluate(net, va, 8), logits_of(net, va, 8)))
    (net_a, acc_a, ev_a, lg_a), (net_b, acc_b, ev_b, lg_b) = results
    assert acc_a == acc_b and ev_a == ev_b and torch.equal(lg_a, lg_b)
    state_b = net_b.state_dict()
    for name, a in net_a.state_dict().items():
        assert torch.equal(a, state_b[name]), name
    assert torch.equal(logits_of(net_a, val, 8), logits_of(net_a, val.standardised().x, 8))
