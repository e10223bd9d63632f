"""Conv backbones (DESIGN.md §3): populations equal separate trainings (dropout and batch norm
included), per-task normalisation keeps old tasks bit-identical, describe() round-trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qpacknet.config import NetConfig, SearchConfig, TrainConfig
from qpacknet.model import PackedModel
from qpacknet.nets import PopulationNet, build, build_from_meta
from qpacknet.pipeline import MODEL_FILE
from qpacknet.scenarios.base import Split, TaskData, TaskStream
from qpacknet.search import draw_mask
from qpacknet.train import EpochReport, logits_of
from tests.conftest import BlobStream, tiny_config
from tests.helpers import (
    all_available,
    assert_same_candidate,
    fit_first_task,
    learn_checking_old_logits,
    local_pipeline,
    search_results,
)

# backbone -> (net settings, input shape): the smallest inputs and widths each one allows
BACKBONES: dict[str, tuple[dict, tuple[int, int, int]]] = {
    "alexnet": ({"backbone": "alexnet", "width": 1 / 16}, (3, 20, 20)),
    "resnet18_reduced": ({"backbone": "resnet18_reduced", "width": 0.2}, (3, 8, 8)),
    "resnet18": ({"backbone": "resnet18", "width": 1 / 16}, (3, 16, 16)),
    "tinynet": ({"backbone": "tinynet", "width": 1 / 16}, (3, 16, 16)),
}
CLASSES = 4


class ImageBlobs(TaskStream):
    """:class:`BlobStream` reshaped to images: each task permutes the pixels and relabels."""

    name = "image-blobs"

    def __init__(self, shape: tuple[int, int, int], num_tasks: int = 3, n: int = 96) -> None:
        self.input_shape = shape
        self.num_classes = CLASSES
        self._flat = BlobStream(num_tasks, dim=math.prod(shape), classes=CLASSES, n=n)

    @property
    def num_tasks(self) -> int:
        return self._flat.num_tasks

    def task(self, index: int) -> TaskData:
        t = self._flat.task(index)
        img = [Split(s.x.reshape(-1, *self.input_shape), s.y) for s in (t.train, t.val, t.test)]
        return TaskData(t.index, t.name, t.num_classes, *img)


def _net(name: str, k: int, dtype: torch.dtype = torch.float32) -> PopulationNet:
    settings, shape = BACKBONES[name]
    return build(NetConfig(**settings), shape, CLASSES, k).to(dtype)


def _candidates(
    name: str, candidates: list[int], dtype: torch.dtype
) -> tuple[PopulationNet, list[dict[str, torch.Tensor]]]:
    """Candidates as SEARCH starts them: masks and Xavier weights keyed by candidate index."""
    net = _net(name, len(candidates), dtype)
    avail = all_available(net.layer_specs)
    masks = [draw_mask(net.layer_specs, avail, SearchConfig(), 5, 0, c) for c in candidates]
    net.init_candidates(5, 0, candidates)
    net.set_masks(masks)
    return net, masks


def _train(
    net: PopulationNet, stream: ImageBlobs, dtype: torch.dtype
) -> tuple[list[float], list[list[float]], list[list[float]]]:
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, lr_min=0.001, weight_decay=1e-4)
    reports: list[EpochReport] = []
    accs = fit_first_task(net, stream, dtype, cfg, on_epoch=reports.append)
    return accs, [r.loss for r in reports], [r.val_acc for r in reports]


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_population_equals_separate_trainings(name: str, dtype: torch.dtype, atol: float) -> None:
    # float32's 1e-4 agreement was measured with 2 threads (the suite runs with 1, see
    # conftest); 1 thread rounds the ResNet-18's float32 loss 1.3e-3 apart. float64 is exact.
    torch.set_num_threads(2)
    """K=3 trained together == 3 separate K=1 trainings with the same init, masks, batches and
    (per-candidate) dropout: losses, accuracies, weights, heads and norm statistics. float64
    agrees to rounding (in practice exactly); float32 rounding differs between grouped and
    single convolutions and grows through ResNet's 20 batch norms to about 1e-5."""
    stream = ImageBlobs(BACKBONES[name][1], num_tasks=1, n=48)
    pop, _ = _candidates(name, [0, 1, 2], dtype)
    before = pop.candidate(1)[2]
    pop_acc, pop_loss, pop_val = _train(pop, stream, dtype)
    for i in range(3):
        single, _ = _candidates(name, [i], dtype)
        acc, loss, val = _train(single, stream, dtype)
        assert acc[0] == pop_acc[i]
        assert [v[0] for v in val] == [v[i] for v in pop_val]
        for got, want in zip(loss, pop_loss, strict=True):
            assert got[0] == pytest.approx(want[i], abs=atol)
        assert_same_candidate(pop, i, single, atol, state_rtol=atol)
    after = pop.candidate(1)[2]
    assert not torch.equal(before["head.weight"], after["head.weight"])
    stats = [k for k in after if k.endswith("running_var")]
    assert (name == "tinynet") == (not stats)
    for key in stats:  # running statistics were learned (they are the task's state)
        assert not torch.equal(before[key], after[key])


def test_dropout_is_per_candidate_and_keyed_by_candidate() -> None:
    """Two slots holding the same sub-network drop different units in training (their own
    generators) and agree in evaluation; a lone net of candidate 1 draws slot 1's masks, and so
    does a copy of the slot keyed with ``key_dropout``."""
    pop, _ = _candidates("alexnet", [0, 1], torch.float64)
    pop.load_candidate(0, *pop.candidate(1))
    x = torch.randn(6, *BACKBONES["alexnet"][1], dtype=torch.float64)
    pop.eval()
    out = pop(x)
    assert torch.equal(out[0], out[1])
    pop.train()
    out = pop(x)
    assert not torch.allclose(out[0], out[1])
    alone, _ = _candidates("alexnet", [1], torch.float64)
    alone.train()
    torch.testing.assert_close(alone(x)[0], out[1], atol=1e-12, rtol=0)
    loaded = _net("alexnet", 1, torch.float64)  # a copied slot keyed like TRAIN's winner could be
    loaded.load_candidate(0, *pop.candidate(1))
    loaded.key_dropout(5, 0, [1])
    torch.testing.assert_close(loaded(x)[0], out[1], atol=1e-12, rtol=0)


def _search(name: str, per_worker: int | None) -> list[tuple[int, float, float]]:
    settings, shape = BACKBONES[name]
    stream = ImageBlobs(shape, num_tasks=1, n=48)
    cfg = tiny_config(
        net=settings,
        search={"population": 3, "epochs": 2},
        executor={"candidates_per_worker": per_worker},
    )
    return search_results(cfg, stream, all_available(_net(name, 1).layer_specs))


def test_candidate_results_do_not_depend_on_chunking() -> None:
    """Dropout masks and initial weights are keyed by candidate, not by population slot."""
    whole = _search("alexnet", None)
    assert [r[0] for r in whole] == [0, 1, 2]
    assert _search("alexnet", 1) == whole
    assert _search("alexnet", 2) == whole


PIPELINE_CASES = [(name, False) for name in BACKBONES] + [("alexnet", True)]


@pytest.mark.parametrize(("name", "channels_last"), PIPELINE_CASES)
def test_old_tasks_bit_identical_through_the_pipeline(
    name: str, channels_last: bool, tmp_path: Path
) -> None:
    """Three tasks through the real pipeline: every earlier task's logits from the reloaded
    model file stay bit-identical, and its norm state is its own."""
    settings, shape = BACKBONES[name]
    settings = {**settings, "channels_last": channels_last}
    stream = ImageBlobs(shape, num_tasks=3)
    pipe = local_pipeline(
        tmp_path,
        stream,
        net=settings,
        search={"population": 3, "epochs": 1},
        train={"epochs": 2, "batch_size": 16},
    )
    probe = torch.randn(20, *shape, generator=torch.Generator().manual_seed(9))
    recorded = learn_checking_old_logits(pipe, probe, label=f"{name}: ")
    assert pipe.matrix.bwt == 0.0
    model = PackedModel.load(tmp_path / MODEL_FILE)
    assert model.input_shape == shape
    net = model.net(0)
    states = [model.store.task_state(t) for t in range(3)]
    assert set(states[0]) == set(net.task_param_names)
    for key in states[0]:
        if "running" in key:
            assert not torch.equal(states[0][key], states[1][key]), key
    # evaluation uses running statistics only: a row's logits do not depend on the batch
    torch.testing.assert_close(logits_of(net, probe[:3], 2)[0], recorded[0][:3])


@pytest.mark.parametrize("name", list(BACKBONES))
def test_describe_round_trip(name: str) -> None:
    net = _net(name, 1)
    net.init_candidates(2, 0, [0])
    meta = json.loads(json.dumps(net.describe()))
    assert meta["backbone"] == name
    again = build_from_meta(meta, k=2)
    assert again.describe() == meta
    assert again.layer_specs == net.layer_specs
    assert again.task_param_names == net.task_param_names
    assert all(s.name and len(s.shape) in (2, 4) for s in net.layer_specs)
    again.load_candidate(1, *net.candidate(0))
    x = torch.randn(5, *BACKBONES[name][1])
    torch.testing.assert_close(logits_of(again, x, 8)[1], logits_of(net, x, 8)[0])


def test_config_defaults_and_bad_inputs() -> None:
    assert NetConfig().backbone == "mlp" and NetConfig().hidden == [100, 100]
    with pytest.raises(ValueError, match="image inputs"):
        build(NetConfig(backbone="tinynet"), (64,), 4, 1)
    with pytest.raises(ValueError, match="too small"):
        build(NetConfig(backbone="alexnet"), (3, 16, 16), 4, 1)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_from_meta({"backbone": "vgg"})


def test_reference_sizes() -> None:
    """The full-size backbones have the sizes of DESIGN.md §3 (no bias in prunable layers)."""
    alex = build(NetConfig(backbone="alexnet"), (3, 32, 32), 10, 1)
    assert [s.shape for s in alex.layer_specs] == [
        (64, 3, 4, 4),
        (128, 64, 3, 3),
        (256, 128, 2, 2),
        (2048, 1024),
        (2048, 2048),
    ]
    assert alex.task_param("head.weight").shape == (1, 10, 2048)
    tiny = build(NetConfig(backbone="tinynet"), (3, 64, 64), 5, 1)
    assert [s.shape for s in tiny.layer_specs][-2:] == [(640, 2560), (640, 640)]
    assert tiny.task_param("head.weight").shape == (1, 5, 640)
    reduced = build(NetConfig(backbone="resnet18_reduced"), (3, 32, 32), 10, 1)
    assert reduced.layer_specs[0].shape == (20, 3, 3, 3)
    assert reduced.task_param("head.weight").shape == (1, 10, 640)
    full = build(NetConfig(backbone="resnet18"), (3, 64, 64), 10, 1)
    assert full.num_prunable() == 11_166_912  # torchvision's ResNet-18 without fc and biases
    assert full.task_param("head.weight").shape == (1, 10, 512)
    for net in (alex, tiny, reduced, full):  # weights only: prunable layers have no bias
        assert len(net.thetas) == len(net.layer_specs)
        assert net.num_prunable() == sum(p.numel() for p in net.thetas.values())
