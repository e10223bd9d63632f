"""The EVALUATE stage: the accuracy-matrix row and the task-inference pairs of a committed
task, computed from the packed store where the candidates train (DESIGN.md §4: heavy work runs
on the workers; the driver only records).

The same generator runs in-process (local executor) and inside the run's designated evaluation
actor (Ray executor); one device per run computes every reported accuracy, so that no figure
in a row mixes devices.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from qpacknet.events import Event, StageDone, StepDone
from qpacknet.metrics import PairStats, pair_stats
from qpacknet.model import PackedModel
from qpacknet.recognise import kinds_of, scores
from qpacknet.scenarios.base import Split
from qpacknet.store import PackedStore
from qpacknet.worker import perturbed


@dataclass(frozen=True)
class EvalRequest:
    """Evaluate after task ``task`` was committed: test and validation accuracy of tasks
    ``0..task`` (the rows R[task] of both matrices) and the missing task-inference ``pairs``
    (sub-network i, test task j)."""

    task: int
    pairs: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Evaluation:
    """What EVALUATE reports: the test row, the validation row (what selection may use:
    DESIGN.md §2, test data is for reports only), and per pair the entropies and
    correctness flags."""

    task: int
    row: list[float]
    pairs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
    val_row: list[float]


def evaluate_stage(
    store: PackedStore,
    request: EvalRequest,
    test_split: Callable[[int], Split],
    val_split: Callable[[int], Split],
    device: str,
    batch_size: int,
    where: dict[str, Any],
) -> Iterator[Event]:
    """Re-evaluate every committed task from the packed words (never copied from an earlier
    row, DESIGN.md §2 Metrics) and the requested pairs; each test split is built once."""
    started = time.time()
    model = PackedModel(store, device, batch_size)
    needed = sorted({j for _, j in request.pairs} | set(range(request.task + 1)))
    row: list[float] = []
    pairs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for j in needed:
        split = test_split(j).to(device)
        if j <= request.task:
            row.append(perturbed(model.accuracy(j, split)))
            yield StepDone(
                "evaluate", request.task, f"task {j + 1}, test acc", row[-1], time.time(), where
            )
        for i, jj in request.pairs:
            if jj == j:
                pairs[(i, j)] = _pair(model, i, _as_task(split, store, i))
    val_row = [
        perturbed(model.accuracy(j, val_split(j).to(device))) for j in range(request.task + 1)
    ]
    result = Evaluation(request.task, row, pairs, val_row)
    yield StageDone("evaluate", request.task, (), result, started, time.time(), where)


def _pair(model: PackedModel, i: int, split: Split) -> PairStats:
    """Sub-network i on a test split: its correctness and every recogniser's scores that task
    i's statistics allow (:mod:`qpacknet.recognise`)."""
    stats = model.store.recognition_stats(i)
    kinds = kinds_of(stats)
    if "feature" in kinds:
        logits, features = model.outputs(i, split)
    else:
        logits, features = model.split_logits(i, split), None
    x = split.inputs() if "input" in kinds else split.x[:0]
    return pair_stats(logits, split.y, scores(stats, x, logits.float().cpu(), features))


def _as_task(split: Split, store: PackedStore, task: int) -> Split:
    """Test images as task ``task`` prepares them: an image scenario standardises each task
    with its own statistics, and without a task id every sub-network sees the raw input its
    own way (:func:`qpacknet.preparation.task_inputs`), so the reported figures are those of
    ``qpacknet predict``. Splits of network inputs (features, permuted pixels) are unchanged."""
    doc = store.input_preparation(task)
    if not split.compact or doc is None or split.mean is None:
        return split
    mean, std = doc.get("mean"), doc.get("std")
    usable = (
        doc.get("dtype") == "uint8"
        and doc.get("scale") is None
        and doc.get("compute", "float32") == "float32"
        and isinstance(mean, list)
        and isinstance(std, list)
        and len(mean) == len(std) == len(split.mean)
    )
    if not usable:
        return split
    to = split.mean
    return Split(
        split.x,
        split.y,
        torch.tensor(mean, dtype=torch.float32, device=to.device),
        torch.tensor(std, dtype=torch.float32, device=to.device),
    )
