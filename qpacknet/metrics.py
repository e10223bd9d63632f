"""Continual-learning metrics: accuracy matrix, ACC, BWT (DESIGN.md §2, Metrics)."""

from __future__ import annotations

from collections.abc import Callable


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
