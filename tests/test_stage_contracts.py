"""Each stage's contract, tested so that a plausible wrong implementation fails (issue 11,
point 7): Algorithm 1's draw within [V_min, V_max] and the available weights, Xavier bounds,
eq. 8's score on hand-computed numbers, TRAIN keeping its best epoch, and QUANTIZE's Q."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import qpacknet.train as train_module
from qpacknet.config import SearchConfig, TrainConfig
from qpacknet.events import drive
from qpacknet.nets import build
from qpacknet.scenarios import PermutedDigits
from qpacknet.search import (
    CandidateResult,
    draw_mask,
    scores,
    select_winner,
    weighted_sparsity,
)
from qpacknet.train import fit
from qpacknet.worker import CandidateWorker, TaskContext
from tests.conftest import BlobStream, tiny_config
from tests.helpers import all_available, local_pipeline


def test_drawn_masks_stay_in_the_sparsity_range_and_on_available_weights() -> None:
    net = build(tiny_config().net, (12,), 4, 1)
    g = torch.Generator().manual_seed(0)
    available = {s.name: torch.rand(s.shape, generator=g) < 0.9 for s in net.layer_specs}
    cfg = SearchConfig(v_min=0.45, v_max=0.85)
    for c in range(40):
        masks = draw_mask(net.layer_specs, available, cfg, 3, 1, c)
        for spec in net.layer_specs:
            m = masks[spec.name]
            assert not (m & ~available[spec.name]).any(), "owns a weight that is not available"
            density = int(m.sum()) / spec.numel
            lo = 1 - cfg.v_max - 1 / spec.numel
            assert lo <= density <= 1 - cfg.v_min + 1 / spec.numel, (c, spec.name, density)


def test_fresh_weights_are_xavier_uniform() -> None:
    """Bound sqrt(6 / (fan_in + fan_out)): every weight inside it, the spread of a uniform."""
    net = build(tiny_config(net={"hidden": [64, 64]}).net, (96,), 4, 2)
    net.init_candidates(seed=1, task=0, candidates=[0, 1])
    for spec in net.layer_specs:
        fan_out, fan_in = spec.shape[0], int(torch.tensor(spec.shape[1:]).prod())
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = net.theta(spec.name).detach()
        assert w.abs().max() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.05)


def test_score_on_hand_computed_numbers() -> None:
    """α = 0.9, β = 0.1: A = (80, 100), Υ = (0.9, 0.5): scores 0.9·0.8 + 0.1·1 = 0.82 and
    0.9·1 + 0.1·0.5/0.9 = 0.9556; raise β to 0.5 and the sparser candidate wins (0.9 vs 0.78)."""
    a = CandidateResult(0, 80.0, 0.9, {})
    b = CandidateResult(1, 100.0, 0.5, {})
    assert scores([a, b], 0.9, 0.1) == pytest.approx([0.82, 0.9 + 0.05 / 0.9], abs=1e-12)
    assert scores([a, b], 0.5, 0.5) == pytest.approx([0.9, 0.5 + 0.25 / 0.9], abs=1e-12)
    assert select_winner([a, b], 0.9, 0.1) == 1
    assert select_winner([a, b], 0.5, 0.5) == 0
    tie = CandidateResult(2, 100.0, 0.5, {})
    assert select_winner([tie, b], 0.9, 0.1) == 1, "ties go to the lower index"


def test_upsilon_counts_the_union_with_earlier_tasks_and_changes_the_winner() -> None:
    """Eqs. 6-7 on a 10-weight layer whose weights 0-4 an earlier task owns. Candidate A
    takes 3 of those (its words have room), B takes 2 fresh ones. Own-weights reading:
    Υ = 0.7 and 0.8; the paper's (unassigned after commit): 1 - 5/10 = 0.5 and 1 - 7/10 = 0.3.
    With A = 90.0, B = 90.5, α = 0.9, β = 0.1 the own reading picks B
    (0.9·90/90.5 + 0.1·0.7/0.8 = 0.9825 < 1.0) and the paper's picks A
    (0.9·90/90.5 + 0.1·1 = 0.9950 > 0.9 + 0.1·0.3/0.5 = 0.96)."""
    claimed = {"w": torch.tensor([True] * 5 + [False] * 5)}
    a = {"w": torch.tensor([True] * 3 + [False] * 7)}
    b = {"w": torch.tensor([False] * 5 + [True] * 2 + [False] * 3)}
    assert weighted_sparsity(a) == pytest.approx(0.7) and weighted_sparsity(b) == 0.8
    assert weighted_sparsity(a, claimed) == 0.5
    assert weighted_sparsity(b, claimed) == pytest.approx(0.3)
    own = [CandidateResult(0, 90.0, 0.7, {}), CandidateResult(1, 90.5, 0.8, {})]
    paper = [CandidateResult(0, 90.0, 0.5, {}), CandidateResult(1, 90.5, 0.3, {})]
    assert scores(paper, 0.9, 0.1) == pytest.approx([0.9 * 90 / 90.5 + 0.1, 0.96], abs=1e-12)
    assert select_winner(own, 0.9, 0.1) == 1
    assert select_winner(paper, 0.9, 0.1) == 0
    two_layers = {"w": a["w"], "v": torch.tensor([True, False])}
    with_v = {"w": claimed["w"], "v": torch.tensor([False, True])}
    assert weighted_sparsity(two_layers, with_v) == 1 - 7 / 12, "weighted by layer size"


def test_search_reports_upsilon_over_all_tasks_assignments() -> None:
    """A worker's SEARCH of a second task scores Υ = 1 - |claimed ∪ M_i| / |θ| from the
    committed tasks' weights it was given, not the candidate's own sparsity."""
    stream = PermutedDigits(num_tasks=1, seed=3)
    cfg = tiny_config()
    specs = build(cfg.net, stream.input_shape, stream.num_classes, 1).layer_specs
    g = torch.Generator().manual_seed(5)
    claimed = {s.name: torch.rand(s.shape, generator=g) < 0.4 for s in specs}
    ctx = TaskContext(
        cfg, 1, stream.input_shape, stream.num_classes, all_available(specs), claimed=claimed
    )
    worker = CandidateWorker(ctx, *stream.fit_splits(0))
    results = drive(worker.search([0, 1, 2]), None)
    total = sum(s.numel for s in specs)
    for r, c in zip(results, [0, 1, 2], strict=True):
        masks = draw_mask(specs, all_available(specs), cfg.search, cfg.seed, 1, c)
        union = sum(int((masks[s.name] | claimed[s.name]).sum()) for s in specs)
        own = sum(int(masks[s.name].sum()) for s in specs)
        assert r.sparsity == 1 - union / total
        assert r.sparsity < 1 - own / total


def test_train_keeps_the_best_validation_epoch_not_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scripted validation accuracies 50, 90, 70: fit returns 90 and the weights after epoch
    2, not those after epoch 3."""
    stream = BlobStream(num_tasks=1)
    net = build(tiny_config().net, stream.input_shape, stream.num_classes, 1)
    net.init_candidates(1, 0, [0])
    net.set_masks([all_available(net.layer_specs)])
    script = iter([50.0, 90.0, 70.0])
    snapshots: list[dict[str, torch.Tensor]] = []

    def scripted(net_: object, split: object, batch_size: int) -> list[float]:
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
        return [next(script)]

    monkeypatch.setattr(train_module, "evaluate", scripted)
    task = stream.task(0)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, lr_min=0.001)
    accs = fit(
        net,
        task.train,
        task.val,
        cfg,
        seed=1,
        task=0,
        stage="train",
        epochs=3,
        schedule=True,
        keep_best=True,
    )
    assert accs == [90.0]
    final = net.state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[2][k]) for k in final)


def test_quantize_measures_against_trains_best_accuracy() -> None:
    """Q (Algorithm 3's reference) is TRAIN's best validation accuracy, and the codes cover
    exactly the owned weights."""
    stream = PermutedDigits(num_tasks=1, seed=3)
    cfg = tiny_config()
    specs = build(cfg.net, stream.input_shape, stream.num_classes, 1).layer_specs
    available = all_available(specs)
    ctx = TaskContext(cfg, 0, stream.input_shape, stream.num_classes, available)
    worker = CandidateWorker(ctx, *stream.fit_splits(0))
    drive(worker.search([0, 1]), None)
    outcome = drive(worker.train(1), None)
    assert outcome.float_acc < 100.0, "a reference of 100 % would not tell Q apart"
    q = drive(worker.quantize(stream.test_split(0)), None)
    assert q.float_acc == outcome.float_acc
    assert q.tried[-1][:2] == (q.bit_width, q.quant_acc)
    for name, mask in q.masks.items():
        assert q.codes[name].numel() == int(mask.sum())


def test_quantize_leaves_shared_weights_to_their_owner(tmp_path: Path) -> None:
    """With weight sharing, QUANTIZE codes only the task's own weights: a shared weight keeps
    the first component's value (its owner's codebook), never a re-quantised one."""
    from qpacknet.pipeline import MODEL_FILE
    from qpacknet.store import load_store

    local_pipeline(tmp_path, BlobStream(num_tasks=2), sharing={"enabled": True}).run()
    store = load_store(tmp_path / MODEL_FILE)
    parts, first = store.parts(1), store.first_values()
    assert parts.shared is not None and any(m.any() for m in parts.shared.values())
    decoded = store.decode(1)
    for name, shared in parts.shared.items():
        assert not (shared & parts.masks[name]).any()
        assert parts.codes[name].numel() == int(parts.masks[name].sum())
        assert torch.equal(decoded[name][shared], first[name][shared])
        assert torch.equal(first[name][shared], store.decode(0)[name][shared])
