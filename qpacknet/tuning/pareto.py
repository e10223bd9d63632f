"""The trade-off Tune leaves to the user: validation accuracy (higher is better) against
capacity used (lower is better, eq. 10). No single best config exists, so the finished trials
that no other trial beats on both are shown as a Pareto table. Test accuracy is printed beside
the chosen trials, never used to rank them (DESIGN.md §2: selection on validation data only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrialPoint:
    """A finished trial's final figures and the sampled values that produced them."""

    trial_id: str
    val_acc: float
    capacity_pct: float
    tasks: int
    params: dict[str, Any]
    path: str = ""
    test_acc: float = float("nan")


def dominates(a: TrialPoint, b: TrialPoint) -> bool:
    """``a`` is at least as good as ``b`` on both axes and strictly better on one."""
    return (
        a.val_acc >= b.val_acc
        and a.capacity_pct <= b.capacity_pct
        and (a.val_acc > b.val_acc or a.capacity_pct < b.capacity_pct)
    )


def pareto_front(points: list[TrialPoint]) -> list[TrialPoint]:
    """Points no other point dominates, best validation accuracy first."""
    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: (-p.val_acc, p.capacity_pct, p.trial_id))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def pareto_table(points: list[TrialPoint]) -> str:
    """The front as aligned text: validation ACC and capacity (what ranks), test ACC
    (reported only), then each sampled setting."""
    front = pareto_front(points)
    if not front:
        return "(no finished trials)"
    keys = sorted({k for p in front for k in p.params})
    header = ["trial", "val ACC %", "capacity %", "test ACC %", *keys]
    rows = [
        [
            p.trial_id,
            f"{p.val_acc:.2f}",
            f"{p.capacity_pct:.2f}",
            f"{p.test_acc:.2f}",
            *(_fmt(p.params.get(k)) for k in keys),
        ]
        for p in front
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
