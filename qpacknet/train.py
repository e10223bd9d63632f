"""Training and evaluation loops for populations (SEARCH, Algorithm 1) and winners (TRAIN).

The loss is the *sum over candidates* of each candidate's mean cross-entropy, so each
candidate receives exactly the gradient it would get alone; SGD/Adam are element-wise, so
the optimiser keeps candidates apart as well (DESIGN.md §7). Batch order derives from
(seed, task, stage, epoch) only, never from the candidate, so every candidate sees the same
batches whichever population or executor trains it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qpacknet.config import TrainConfig
from qpacknet.nets import PopulationNet
from qpacknet.scenarios.base import Split
from qpacknet.seeding import generator

EpochCallback = Callable[["EpochReport"], None]


@dataclass(frozen=True)
class EpochReport:
    """One epoch of a population: per-candidate training loss and validation accuracy (%)."""

    stage: str
    epoch: int
    epochs: int
    lr: float
    loss: list[float]
    val_acc: list[float]
    train_seconds: float
    eval_seconds: float


def make_optimizer(net: PopulationNet, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.SGD(
        params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True
    )


def cosine_lr(cfg: TrainConfig, epoch: int, epochs: int) -> float:
    """Learning rate of ``epoch`` (0-based): cosine decay from ``lr`` to the floor ``lr_min``."""
    if epochs <= 1:
        return cfg.lr
    t = epoch / (epochs - 1)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(net: PopulationNet, split: Split, batch_size: int) -> list[float]:
    """Accuracy (%) of every candidate on ``split``; evaluation mode, fixed chunking."""
    was_training = net.training
    net.eval()
    correct = torch.zeros(net.k, dtype=torch.long, device=split.y.device)
    for i in range(0, len(split), batch_size):
        logits = net(split.inputs(slice(i, i + batch_size)))
        correct += (logits.argmax(-1) == split.y[i : i + batch_size]).sum(dim=1)
    net.train(was_training)
    n = max(len(split), 1)
    return [100.0 * c / n for c in correct.tolist()]


@torch.no_grad()
def logits_of(net: PopulationNet, x: torch.Tensor | Split, batch_size: int) -> torch.Tensor:
    """Logits ``[K, N, C]`` in evaluation mode with a fixed chunking (bit-reproducible), of
    network inputs ``x`` or of a split's inputs (standardised per chunk when compact)."""
    was_training = net.training
    net.eval()
    chunks = [slice(i, i + batch_size) for i in range(0, len(x), batch_size)]
    out = torch.cat([net(x.inputs(c) if isinstance(x, Split) else x[c]) for c in chunks], 1)
    net.train(was_training)
    return out


@torch.no_grad()
def outputs_of(
    net: PopulationNet, x: torch.Tensor | Split, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [K, N, C], features [K, N, F])`` like :func:`logits_of`, with the same
    chunking; the logits are the head on those features, exactly what the forward pass
    computes (:meth:`PopulationNet.forward` is ``head(features(x))``)."""
    was_training = net.training
    net.eval()
    logits, features = [], []
    for c in [slice(i, i + batch_size) for i in range(0, len(x), batch_size)]:
        f = net.features(x.inputs(c) if isinstance(x, Split) else x[c])
        logits.append(net.head(f))
        features.append(f)
    net.train(was_training)
    return torch.cat(logits, 1), torch.cat(features, 1)


def population_loss(
    logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over candidates of each one's mean cross-entropy (against labels smoothed by
    ``label_smoothing``, Szegedy et al. 2016), plus the per-candidate losses."""
    k, b, c = logits.shape
    per = F.cross_entropy(
        logits.reshape(k * b, c), y.repeat(k), reduction="none", label_smoothing=label_smoothing
    )
    per_cand = per.reshape(k, b).mean(dim=1)
    return per_cand.sum(), per_cand.detach()


def fit(
    net: PopulationNet,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    *,
    seed: int,
    task: int,
    stage: str,
    epochs: int,
    schedule: bool,
    keep_best: bool,
    on_epoch: EpochCallback | None = None,
) -> list[float]:
    """Train all candidates of ``net`` for ``epochs``; returns final validation accuracies
    (:func:`fit_epochs` with a callback instead of a generator)."""
    steps = fit_epochs(
        net,
        train,
        val,
        cfg,
        seed=seed,
        task=task,
        stage=stage,
        epochs=epochs,
        schedule=schedule,
        keep_best=keep_best,
    )
    while True:
        try:
            report = next(steps)
        except StopIteration as stop:
            return stop.value
        if on_epoch is not None:
            on_epoch(report)


def fit_epochs(
    net: PopulationNet,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    *,
    seed: int,
    task: int,
    stage: str,
    epochs: int,
    schedule: bool,
    keep_best: bool,
) -> Generator[EpochReport, None, list[float]]:
    """Train all candidates of ``net`` for ``epochs``, yielding each epoch's report as soon as
    it ends (workers stream them to the driver); returns final validation accuracies.

    ``schedule``: cosine decay to ``lr_min`` (TRAIN) instead of a constant ``lr`` (SEARCH).
    ``keep_best``: restore, per candidate, the weights of its best validation epoch (TRAIN
    keeps the best epoch, DESIGN.md §2 stage 2).
    """
    device = train.x.device
    opt = make_optimizer(net, cfg, cfg.lr)
    n = len(train)
    best_acc = [-1.0] * net.k
    best_state: dict[str, torch.Tensor] | None = None
    accs: list[float] = []
    net.train()
    for epoch in range(epochs):
        start = time.perf_counter()
        lr = cosine_lr(cfg, epoch, epochs) if schedule else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        perm = torch.randperm(n, generator=generator(seed, "batches", task, stage, epoch))
        perm = perm.to(device)
        loss_sum = torch.zeros(net.k, device=device)
        steps = 0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            logits = net(train.inputs(idx))
            loss, per_cand = population_loss(logits, train.y[idx], cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += per_cand
            steps += 1
        trained = time.perf_counter()
        accs = evaluate(net, val, cfg.eval_batch_size)
        if keep_best:
            improved = [a > b for a, b in zip(accs, best_acc, strict=True)]
            if any(improved):
                best_state = _merge_best(net, best_state, improved)
                best_acc = [max(a, b) for a, b in zip(accs, best_acc, strict=True)]
        yield EpochReport(
            stage,
            epoch + 1,
            epochs,
            lr,
            (loss_sum / max(steps, 1)).tolist(),
            accs,
            trained - start,
            time.perf_counter() - trained,
        )
    if keep_best and best_state is not None:
        net.load_state_dict(best_state)
        return best_acc
    return accs


@torch.no_grad()
def _merge_best(
    net: PopulationNet, best: dict[str, torch.Tensor] | None, improved: list[bool]
) -> dict[str, torch.Tensor]:
    current = net.state_dict()
    if best is None:
        return {k: v.detach().clone() for k, v in current.items()}
    sel = torch.tensor(improved, device=next(iter(current.values())).device)
    for key, value in current.items():
        shape = (net.k,) + (1,) * (value.dim() - 1)
        best[key] = torch.where(sel.reshape(shape), value, best[key])
    return best
