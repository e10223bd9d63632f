"""The figures a person would rather look at than read, drawn from ``results.json``.

``accuracy_matrix.png``: R[i][j] as a heatmap (rows: after task i; columns: task j).
``bits_capacity.png``: the chosen bit-width per task (bars) and capacity used so far (line).
``candidate_scores.png``: every candidate's α/β score per task, winners marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_heatmap(results: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    rows = results["accuracy_matrix"]
    n = len(rows)
    grid = [[rows[i][j] if j <= i else float("nan") for j in range(n)] for i in range(n)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.5 * n))
    im = ax.imshow(grid, cmap="viridis", vmin=min(min(r) for r in rows), vmax=100.0)
    for i in range(n):
        for j in range(i + 1):
            ax.text(j, i, f"{rows[i][j]:.1f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after learning task")
    ax.set_xticks(range(n), [str(j + 1) for j in range(n)])
    ax.set_yticks(range(n), [str(i + 1) for i in range(n)])
    ax.set_title(f"test accuracy %  (ACC {results['acc']:.2f}, BWT {results['bwt']:.2f})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bits_and_capacity(results: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    tasks = results["tasks"]
    x = [t["task"] + 1 for t in tasks]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(x, [t["bit_width"] for t in tasks], color="tab:blue", alpha=0.7, label="bits")
    ax.set_xlabel("task")
    ax.set_ylabel("bit-width")
    ax.set_xticks(x)
    ax2 = ax.twinx()
    used = [sum(t["capacity_pct"] for t in tasks[: i + 1]) for i in range(len(tasks))]
    ax2.plot(x, used, color="tab:red", marker="o", label="capacity used %")
    ax2.set_ylabel("capacity used so far %")
    ax2.set_ylim(0, max(100.0, max(used)))
    ax.set_title("bits per task and capacity (eq. 10)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def candidate_scores(results: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for t in results["tasks"]:
        xs = [t["task"] + 1] * len(t["candidates"])
        ax.scatter(xs, [c["score"] for c in t["candidates"]], s=12, color="tab:gray")
        win = next(c for c in t["candidates"] if c["index"] == t["winner"])
        ax.scatter([t["task"] + 1], [win["score"]], s=40, color="tab:orange", marker="*")
    ax.set_xlabel("task")
    ax.set_ylabel("score α·acc + β·sparsity")
    ax.set_title("candidate scores (★ winner)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """All three figures into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        accuracy_heatmap(results, out_dir / "accuracy_matrix.png"),
        bits_and_capacity(results, out_dir / "bits_capacity.png"),
        candidate_scores(results, out_dir / "candidate_scores.png"),
    ]
