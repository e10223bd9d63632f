"""A population of K candidates trains exactly like K separate trainings (DESIGN.md §7)."""

from __future__ import annotations

import torch

from qpacknet.config import TrainConfig
from qpacknet.method import draw_candidates
from qpacknet.nets import PopulationMLP
from qpacknet.train import population_loss
from tests.conftest import BlobStream, tiny_config
from tests.helpers import all_available, assert_same_candidate, fit_first_task, search_results


def _population(k: int, dtype: torch.dtype) -> tuple[PopulationMLP, BlobStream]:
    stream = BlobStream(num_tasks=1, dim=12, classes=4, n=96)
    net = PopulationMLP(12, [10, 8], 4, k).to(dtype)
    cfg = tiny_config(seed=7)
    draw_candidates(net, all_available(net.layer_specs), cfg, 0, list(range(k)))
    return net, stream


def _train(
    net: PopulationMLP, stream: BlobStream, dtype: torch.dtype, opt: str, smoothing: float = 0.0
) -> list[float]:
    cfg = TrainConfig(
        epochs=3,
        batch_size=10,
        lr=0.05,
        lr_min=0.001,
        optimizer=opt,
        weight_decay=1e-4,
        label_smoothing=smoothing,
    )
    return fit_first_task(net, stream, dtype, cfg)


def _compare(dtype: torch.dtype, opt: str, atol: float, smoothing: float = 0.0) -> None:
    k = 4
    pop, stream = _population(k, dtype)
    singles = []
    for i in range(k):
        net = PopulationMLP(12, [10, 8], 4, 1).to(dtype)
        w, m, s = pop.candidate(i)
        net.load_candidate(0, w, m, s)
        singles.append(net)
    pop_acc = _train(pop, stream, dtype, opt, smoothing)
    single_acc = [_train(n, stream, dtype, opt, smoothing)[0] for n in singles]
    assert pop_acc == single_acc
    for i, net in enumerate(singles):
        assert_same_candidate(pop, i, net, atol)


def test_population_equals_separate_trainings_float64_sgd() -> None:
    _compare(torch.float64, "sgd", 1e-12)


def test_population_equals_separate_trainings_float64_adam() -> None:
    _compare(torch.float64, "adam", 1e-12)


def test_population_equals_separate_trainings_float32() -> None:
    _compare(torch.float32, "sgd", 1e-5)


def test_label_smoothing_is_per_candidate_and_matches_its_definition() -> None:
    """``train.label_smoothing`` = ε: each candidate's loss is (1-ε)·CE(label) + ε·mean over
    classes of -log p, and a population still trains exactly like separate trainings."""
    logits = torch.tensor([[[2.0, 0.0, -1.0]], [[0.0, 1.0, 0.0]]], dtype=torch.float64)
    y = torch.tensor([0])
    total, per = population_loss(logits, y, 0.3)
    logp = logits.log_softmax(-1)[:, 0]
    expected = 0.7 * -logp[:, 0] + 0.3 * -logp.mean(-1)
    assert torch.allclose(per, expected, atol=1e-12) and float(total) == float(per.sum())
    assert not torch.allclose(population_loss(logits, y)[1], expected)
    _compare(torch.float64, "sgd", 1e-12, smoothing=0.1)


def test_training_changes_only_masked_weights_effectively() -> None:
    pop, stream = _population(2, torch.float32)
    _train(pop, stream, torch.float32, "sgd")
    for spec in pop.layer_specs:
        w = pop.weight(spec.name)
        assert torch.all(w[pop.mask(spec.name) == 0] == 0)


def _search(per_worker: int | None) -> list[tuple[int, float, float]]:
    cfg = tiny_config(executor={"candidates_per_worker": per_worker})
    avail = {
        "fc0": torch.ones(16, 12, dtype=torch.bool),
        "fc1": torch.ones(16, 16, dtype=torch.bool),
    }
    return search_results(cfg, BlobStream(num_tasks=1), avail)


def test_candidate_results_do_not_depend_on_chunking() -> None:
    whole = _search(None)
    assert [r[0] for r in whole] == [0, 1, 2, 3]
    assert _search(1) == whole
    assert _search(3) == whole
