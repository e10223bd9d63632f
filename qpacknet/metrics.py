"""Continual-learning metrics: accuracy matrix, ACC, BWT, task inference (DESIGN.md §2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class AccuracyMatrix:
    """``R[i][j]``: test accuracy (%) on task j after task i was committed, j ≤ i.

    Rows are only ever filled by re-evaluating the packed model (``add_row`` takes an
    evaluation function, not numbers), never copied from an earlier row.
    """

    def __init__(self) -> None:
        self.rows: list[list[float]] = []

    def add_row(self, evaluate: Callable[[int], float]) -> list[float]:
        i = len(self.rows)
        row = [evaluate(j) for j in range(i + 1)]
        self.rows.append(row)
        return row

    @property
    def acc(self) -> float:
        """Average accuracy over all tasks after the last one: ``mean_j R[T-1][j]``."""
        last = self.rows[-1]
        return sum(last) / len(last)

    @property
    def bwt(self) -> float:
        """Backward transfer ``mean_{j<T-1} (R[T-1][j] - R[j][j])``; 0 for a single task."""
        t = len(self.rows)
        if t < 2:
            return 0.0
        return sum(self.rows[-1][j] - self.rows[j][j] for j in range(t - 1)) / (t - 1)

    def table(self) -> str:
        """The matrix as text, one row per committed task."""
        t = len(self.rows)
        head = "after\\on " + " ".join(f"{j:>6d}" for j in range(t))
        lines = [head]
        for i, row in enumerate(self.rows):
            cells = " ".join(f"{v:6.2f}" for v in row)
            lines.append(f"task {i:>3d} {cells}")
        return "\n".join(lines)


@dataclass(frozen=True)
class InferenceFigures:
    """Class-incremental figures over the tasks committed so far (means over tasks, in %)."""

    task_inference_acc: float
    class_incremental_acc: float
    per_task: list[dict[str, float]]


class TaskInference:
    """Class-incremental evaluation (DESIGN.md §2, Inference): without a task id, run every
    task's sub-network and take the task whose prediction has the lowest entropy.

    For test task j, *task-inference accuracy* is the share of its inputs whose inferred task is
    j; *class-incremental accuracy* the share whose inferred task is j and whose prediction under
    that task's head is the label. Ties in entropy go to the lower task index.

    Because committed tasks are frozen, sub-network i's outputs on test set j never change once
    both exist; each pair (i, j) is therefore evaluated once and cached, so adding task T costs
    the ``2T+1`` new pairs rather than ``(T+1)²``. After a resume the cache is rebuilt from the
    packed model, which gives the same figures.
    """

    def __init__(self) -> None:
        self._pairs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def missing(self, num_tasks: int) -> list[tuple[int, int]]:
        """The ``(sub-network i, test task j)`` pairs over tasks ``0..num_tasks-1`` not yet
        evaluated: what an evaluation stage must compute before :meth:`figures`."""
        return [
            (i, j) for j in range(num_tasks) for i in range(num_tasks) if (i, j) not in self._pairs
        ]

    def add(self, pairs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Record pairs computed elsewhere (:func:`pair_stats`, e.g. on a worker's GPU)."""
        for key, (entropy, correct) in pairs.items():
            self._pairs[key] = (entropy.cpu(), correct.cpu())

    def update(
        self,
        num_tasks: int,
        logits: Callable[[int, int], torch.Tensor],
        labels: Callable[[int], torch.Tensor],
    ) -> InferenceFigures:
        """Figures over tasks ``0..num_tasks-1``; ``logits(i, j)`` is sub-network i on test
        task j's inputs (``[N_j, C]``), ``labels(j)`` test task j's labels."""
        ys: dict[int, torch.Tensor] = {}
        for i, j in self.missing(num_tasks):
            if j not in ys:
                ys[j] = labels(j)
            self._pairs[(i, j)] = pair_stats(logits(i, j), ys[j])
        return self.figures(num_tasks)

    def figures(self, num_tasks: int) -> InferenceFigures:
        """Figures over tasks ``0..num_tasks-1`` from the recorded pairs."""
        per_task = []
        for j in range(num_tasks):
            entropies = torch.stack([self._pairs[(i, j)][0] for i in range(num_tasks)])
            correct = torch.stack([self._pairs[(i, j)][1] for i in range(num_tasks)])
            inferred = entropies.argmin(0)
            right = inferred == j
            per_task.append(
                {
                    "task_inference_acc": 100.0 * int(right.sum()) / right.numel(),
                    "class_incremental_acc": 100.0
                    * int((right & correct[j]).sum())
                    / right.numel(),
                }
            )
        return InferenceFigures(
            task_inference_acc=sum(p["task_inference_acc"] for p in per_task) / num_tasks,
            class_incremental_acc=sum(p["class_incremental_acc"] for p in per_task) / num_tasks,
            per_task=per_task,
        )


def pair_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-network i on test task j: each input's prediction entropy and whether its argmax
    is the label (both on the CPU), all that task inference keeps of a pair."""
    out = logits.detach().float().cpu()
    return prediction_entropy(out), out.argmax(-1) == labels.cpu()


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax (float32, on the CPU): the score the task is inferred by,
    one function so that serving (:mod:`qpacknet.recognise`) and the reported figures agree."""
    logp = torch.log_softmax(logits.detach().float().cpu(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
