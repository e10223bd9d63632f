"""Codebook fine-tuning (issue 13, Deep Compression §3): centroids train, codes never move,
nothing else changes, the result is reproducible, and what COMMIT writes is what was judged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qpacknet.codebook_tuning import tune_codebooks
from qpacknet.config import QuantizeConfig
from qpacknet.executor import drive
from qpacknet.model import PackedModel
from qpacknet.nets import build
from qpacknet.pipeline import MODEL_FILE
from qpacknet.quantize import dequantize, kmeans_1d
from qpacknet.scenarios.digits import PermutedDigits
from qpacknet.train import logits_of
from tests.helpers import learn_checking_old_logits, local_pipeline, trained_digits_worker

_trained = trained_digits_worker


def _train_loss(net, weights, masks, state, split) -> float:
    net.load_candidate(0, weights, masks, state)
    return float(F.cross_entropy(logits_of(net, split, 8192)[0], split.y))


def test_centroids_train_codes_and_head_stay() -> None:
    worker, stream = _trained()
    assert worker.single is not None
    weights, masks, state = worker.single.candidate(0)
    books = {n: kmeans_1d(w[masks[n]], 2) for n, w in weights.items()}
    probe = build(worker.cfg.net, stream.input_shape, stream.num_classes, 1)
    kwargs = {"epochs": 2, "lr": 1e-3, "batch_size": 16, "seed": 3, "task": 0}
    tuned, head = tune_codebooks(probe, books, masks, state, worker.train_split, **kwargs)
    again, _ = tune_codebooks(probe, books, masks, state, worker.train_split, **kwargs)
    for name, book in tuned.items():
        assert torch.equal(book.codes, books[name].codes)
        assert book.centroids.dtype == torch.float32 and book.centroids.shape == (4,)
        assert not torch.equal(book.centroids, books[name].centroids)
        assert torch.equal(book.centroids, again[name].centroids)  # bit-reproducible
    _, _, after = probe.candidate(0)
    assert all(torch.equal(after[k], v) for k, v in state.items())  # the head did not train
    assert all(torch.equal(head[k], v) for k, v in state.items())
    before_loss = _train_loss(
        probe, dequantize(books, masks, weights), masks, state, worker.train_split
    )
    tuned_loss = _train_loss(
        probe, dequantize(tuned, masks, weights), masks, state, worker.train_split
    )
    assert tuned_loss < before_loss


def _two_bit_setup() -> tuple:
    """The trained digits winner's (weights, masks, state), its train split, the float
    network's logits on it, 2-bit k-means codebooks and a K=1 probe net."""
    worker, stream = _trained()
    assert worker.single is not None
    weights, masks, state = worker.single.candidate(0)
    split = worker.train_split
    targets = logits_of(worker.single, split, 8192)[0]
    books = {n: kmeans_1d(w[masks[n]], 2) for n, w in weights.items()}
    probe = build(worker.cfg.net, stream.input_shape, stream.num_classes, 1)
    return weights, masks, state, split, targets, books, probe


def test_float_target_brings_back_the_float_networks_function() -> None:
    """``finetune_target=float``: the centroids move to shrink the KL divergence from the float
    network's softmax on the training inputs, not to fit the labels."""
    weights, masks, state, split, targets, books, probe = _two_bit_setup()
    kwargs = {"epochs": 2, "lr": 1e-3, "batch_size": 16, "seed": 3, "task": 0}

    def kl(b: dict) -> float:
        probe.load_candidate(0, dequantize(b, masks, weights), masks, state)
        got = F.log_softmax(logits_of(probe, split, 8192)[0], -1)
        want = F.log_softmax(targets, -1)
        return float(F.kl_div(got, want, log_target=True, reduction="batchmean"))

    distilled, _ = tune_codebooks(probe, books, masks, state, split, targets=targets, **kwargs)
    labelled, _ = tune_codebooks(probe, books, masks, state, split, **kwargs)
    assert kl(distilled) < kl(books)
    assert kl(distilled) < kl(labelled)


def test_quantize_commits_the_tuned_codebooks_it_judged() -> None:
    worker, stream = _trained(finetune_epochs=1, finetune_lr=1e-3)
    assert worker.single is not None
    weights, masks, state = worker.single.candidate(0)
    q = drive(worker.quantize(stream.test_split(0)), None)
    assert q.finetune_epochs == 1 and q.within_delta
    probe = build(worker.cfg.net, stream.input_shape, stream.num_classes, 1)
    books = {n: kmeans_1d(w[masks[n]], q.bit_width) for n, w in weights.items()}
    targets = logits_of(worker.single, worker.train_split, 8192)[0]
    expected, _ = tune_codebooks(
        probe, books, masks, state, worker.train_split,
        epochs=1, lr=1e-3, batch_size=16, seed=3, task=0, targets=targets,
    )  # fmt: skip
    for name in masks:
        assert torch.equal(q.codebooks[name], expected[name].centroids)
        assert torch.equal(q.codes[name], books[name].codes)
    assert all(torch.equal(q.task_state[k], v.cpu()) for k, v in state.items())
    probe.load_candidate(0, dequantize(expected, masks, weights), masks, state)
    judged = logits_of(probe, worker.val_split, 8192)[0].argmax(-1)
    assert q.quant_acc == 100.0 * int((judged == worker.val_split.y).sum()) / len(judged)
    paper = _trained()[0]
    plain = drive(paper.quantize(stream.test_split(0)), None)
    assert plain.tried[0][1] < q.tried[0][1], "fine-tuned 1-bit codebooks beat k-means alone"


def test_run_with_both_settings_keeps_old_tasks_bit_identical(tmp_path: Path) -> None:
    """Fine-tuning (with the head) and per-layer widths with weight sharing: every old task's
    logits stay bit-identical after each later commit, the report lists each layer's width,
    and the file reloads to the same digests (the tuned heads included)."""
    stream = PermutedDigits(num_tasks=3, seed=3)
    quantize = {
        "finetune_epochs": 1,
        "finetune_lr": 1e-3,
        "finetune_head": True,
        "per_layer": True,
        "delta": 2.0,
    }
    pipe = local_pipeline(tmp_path, stream, quantize=quantize, sharing={"enabled": True})
    learn_checking_old_logits(pipe, stream.test_split(0).x[:50])
    model = PackedModel.load(tmp_path / MODEL_FILE)
    reports = json.loads(json.dumps(pipe.task_reports))
    for t, rep in enumerate(reports):
        assert rep["bit_widths"] == model.store.bit_widths(t)
        assert rep["bit_width"] == max(rep["bit_widths"].values())
        assert rep["commit_digest"] == model.store.parts(t).digest()
    assert any(len(set(r["bit_widths"].values())) > 1 for r in reports), reports


def test_finetune_head_trains_the_task_tensors_with_the_centroids() -> None:
    """``head``: the task's head trains with the centroids (codes still fixed), reproducibly,
    and together they give back more of the float network's function than the centroids
    alone, at no bit: the head is the task's private float32 state."""
    weights, masks, state, split, targets, books, probe = _two_bit_setup()
    kwargs = {"epochs": 2, "lr": 1e-3, "batch_size": 16, "seed": 3, "task": 0, "targets": targets}
    alone, kept = tune_codebooks(probe, books, masks, state, split, **kwargs)
    both, head = tune_codebooks(probe, books, masks, state, split, head=True, **kwargs)
    again, head_again = tune_codebooks(probe, books, masks, state, split, head=True, **kwargs)
    assert set(head) == set(state) == {"head.weight", "head.bias"}
    for k, v in state.items():
        assert torch.equal(kept[k], v)
        assert head[k].shape == v.shape and not torch.equal(head[k], v)
        assert torch.equal(head[k], head_again[k])
    for name, book in both.items():
        assert torch.equal(book.codes, books[name].codes)
        assert torch.equal(book.centroids, again[name].centroids)
    _, _, in_net = probe.candidate(0)
    assert all(torch.equal(in_net[k], head[k]) for k in state)  # slot 0 holds the tuned net

    def kl(b: dict, s: dict) -> float:
        probe.load_candidate(0, dequantize(b, masks, weights), masks, s)
        got = F.log_softmax(logits_of(probe, split, 8192)[0], -1)
        want = F.log_softmax(targets, -1)
        return float(F.kl_div(got, want, log_target=True, reduction="batchmean"))

    assert kl(both, head) < kl(alone, state) < kl(books, state)


def test_quantize_commits_the_tuned_head_it_judged() -> None:
    """With ``finetune_head`` the head COMMIT writes is the one trained with the accepted
    width's codebooks, and the reported validation accuracy is that network's."""
    worker, stream = _trained(finetune_epochs=1, finetune_lr=1e-3, finetune_head=True)
    assert worker.single is not None
    weights, masks, state = worker.single.candidate(0)
    q = drive(worker.quantize(stream.test_split(0)), None)
    assert q.finetune_head and q.within_delta
    probe = build(worker.cfg.net, stream.input_shape, stream.num_classes, 1)
    books = {n: kmeans_1d(w[masks[n]], q.bit_width) for n, w in weights.items()}
    targets = logits_of(worker.single, worker.train_split, 8192)[0]
    expected, head = tune_codebooks(
        probe, books, masks, state, worker.train_split,
        epochs=1, lr=1e-3, batch_size=16, seed=3, task=0, targets=targets, head=True,
    )  # fmt: skip
    for name in masks:
        assert torch.equal(q.codebooks[name], expected[name].centroids)
    assert all(torch.equal(q.task_state[k], head[k]) for k in state)
    assert not all(torch.equal(q.task_state[k], v.cpu()) for k, v in state.items())
    probe.load_candidate(0, dequantize(expected, masks, weights), masks, head)
    judged = logits_of(probe, worker.val_split, 8192)[0].argmax(-1)
    assert q.quant_acc == 100.0 * int((judged == worker.val_split.y).sum()) / len(judged)


def test_finetune_head_without_finetuning_is_refused() -> None:
    with pytest.raises(ValueError, match=r"set quantize\.finetune_epochs to 1 or more"):
        QuantizeConfig(finetune_head=True)
    assert QuantizeConfig(finetune_head=True, finetune_epochs=1).finetune_head
