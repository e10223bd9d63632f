"""Continual-learning metrics: accuracy matrix, ACC, BWT, task inference (DESIGN.md §2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
    """Class-incremental figures over the tasks committed so far (means over tasks, in %), by
    the headline ``recogniser``, and ``by_recogniser`` for every recogniser the model has the
    statistics for (:mod:`qpacknet.recognise`)."""

    task_inference_acc: float
    class_incremental_acc: float
    per_task: list[dict[str, float]]
    recogniser: str = "entropy"
    by_recogniser: dict[str, dict[str, float]] = field(default_factory=dict)


# a pair's record: per recogniser the score of each input (higher: more likely this task),
# and whether the sub-network's argmax is the label
PairStats = tuple[dict[str, torch.Tensor], torch.Tensor]


class TaskInference:
    """Class-incremental evaluation (DESIGN.md §2, Inference): without a task id, score every
    task's sub-network on the input and take the best task (:mod:`qpacknet.recognise`: lowest
    prediction entropy, or the stronger recognisers whose statistics the model file keeps).

    For test task j, *task-inference accuracy* is the share of its inputs whose inferred task is
    j; *class-incremental accuracy* the share whose inferred task is j and whose prediction under
    that task's head is the label. Ties go to the lower task index.

    Because committed tasks are frozen, sub-network i's outputs on test set j never change once
    both exist; each pair (i, j) is therefore evaluated once and cached, so adding task T costs
    the ``2T+1`` new pairs rather than ``(T+1)²``. After a resume the cache is rebuilt from the
    packed model, which gives the same figures.

    ``recogniser`` names the headline figures' recogniser; where some pair lacks its scores
    (statistics not kept) the headline falls back to ``entropy``, which every pair has.
    """

    def __init__(self, recogniser: str = "entropy") -> None:
        self.recogniser = recogniser
        self._pairs: dict[tuple[int, int], PairStats] = {}

    def missing(self, num_tasks: int) -> list[tuple[int, int]]:
        """The ``(sub-network i, test task j)`` pairs over tasks ``0..num_tasks-1`` not yet
        evaluated: what an evaluation stage must compute before :meth:`figures`."""
        return [
            (i, j) for j in range(num_tasks) for i in range(num_tasks) if (i, j) not in self._pairs
        ]

    def add(self, pairs: dict[tuple[int, int], PairStats]) -> None:
        """Record pairs computed elsewhere (:func:`pair_stats`, e.g. on a worker's GPU)."""
        for key, (scores, correct) in pairs.items():
            self._pairs[key] = ({k: v.cpu() for k, v in scores.items()}, correct.cpu())

    def update(
        self,
        num_tasks: int,
        logits: Callable[[int, int], torch.Tensor],
        labels: Callable[[int], torch.Tensor],
    ) -> InferenceFigures:
        """Figures over tasks ``0..num_tasks-1``; ``logits(i, j)`` is sub-network i on test
        task j's inputs (``[N_j, C]``), ``labels(j)`` test task j's labels (entropy only)."""
        ys: dict[int, torch.Tensor] = {}
        for i, j in self.missing(num_tasks):
            if j not in ys:
                ys[j] = labels(j)
            self._pairs[(i, j)] = pair_stats(logits(i, j), ys[j])
        return self.figures(num_tasks)

    def recognisers(self, num_tasks: int) -> list[str]:
        """The recognisers every pair over tasks ``0..num_tasks-1`` has scores for."""
        names: list[str] | None = None
        for i in range(num_tasks):
            for j in range(num_tasks):
                have = list(self._pairs[(i, j)][0])
                names = have if names is None else [n for n in names if n in have]
        return names or []

    def _by(self, num_tasks: int, name: str) -> list[dict[str, float]]:
        per_task = []
        for j in range(num_tasks):
            scores = torch.stack([self._pairs[(i, j)][0][name] for i in range(num_tasks)])
            correct = torch.stack([self._pairs[(i, j)][1] for i in range(num_tasks)])
            right = scores.argmax(0) == j  # the first maximum: ties to the lower task
            per_task.append(
                {
                    "task_inference_acc": 100.0 * int(right.sum()) / right.numel(),
                    "class_incremental_acc": 100.0
                    * int((right & correct[j]).sum())
                    / right.numel(),
                }
            )
        return per_task

    def figures(self, num_tasks: int) -> InferenceFigures:
        """Figures over tasks ``0..num_tasks-1`` from the recorded pairs."""
        names = self.recognisers(num_tasks)
        by: dict[str, dict[str, float]] = {}
        per: dict[str, list[dict[str, float]]] = {}
        for name in names:
            per[name] = self._by(num_tasks, name)
            by[name] = {
                key: sum(p[key] for p in per[name]) / num_tasks
                for key in ("task_inference_acc", "class_incremental_acc")
            }
        head = self.recogniser if self.recogniser in by else "entropy"
        return InferenceFigures(
            task_inference_acc=by[head]["task_inference_acc"],
            class_incremental_acc=by[head]["class_incremental_acc"],
            per_task=per[head],
            recogniser=head,
            by_recogniser=by,
        )


def pair_stats(
    logits: torch.Tensor, labels: torch.Tensor, scores: dict[str, torch.Tensor] | None = None
) -> PairStats:
    """Sub-network i on test task j: each input's score per recogniser (``entropy``: the
    negated prediction entropy, always; ``scores`` adds the others) and whether its argmax is
    the label (all on the CPU), all that task inference keeps of a pair."""
    out = logits.detach().float().cpu()
    every = {"entropy": -prediction_entropy(out).double()}
    every.update({k: v.detach().cpu() for k, v in (scores or {}).items() if k != "entropy"})
    return every, out.argmax(-1) == labels.cpu()


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax (float32, on the CPU): the score the task is inferred by,
    one function so that serving (:mod:`qpacknet.recognise`) and the reported figures agree."""
    logp = torch.log_softmax(logits.detach().float().cpu(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
