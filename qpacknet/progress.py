"""Progress display: one readable line per epoch, candidate, stage and task.

Plain lines (no carriage-return bars) so the same output reads well in a terminal, a log
file and ``ray job logs``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from qpacknet.events import WorkerLost
from qpacknet.metrics import InferenceFigures
from qpacknet.search import CandidateResult
from qpacknet.train import EpochReport


class Progress:
    """Writes progress lines to a stream; ``verbose=False`` keeps only stage and task lines."""

    def __init__(self, stream: TextIO | None = None, verbose: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.verbose = verbose
        self.start = time.perf_counter()
        self.num_tasks = 0

    def line(self, text: str) -> None:
        elapsed = time.perf_counter() - self.start
        m, s = divmod(int(elapsed), 60)
        h, m = divmod(m, 60)
        self.stream.write(f"[{h:d}:{m:02d}:{s:02d}] {text}\n")
        self.stream.flush()

    def run_start(self, scenario: str, num_tasks: int, executor: str, device: str) -> None:
        self.num_tasks = num_tasks
        self.line(f"run {scenario}: {num_tasks} tasks, executor {executor}, device {device}")

    def task_start(self, task: int) -> None:
        self.line(f"task {task + 1}/{self.num_tasks} start")

    def epoch(self, task: int, candidates: list[int], rep: EpochReport) -> None:
        if not self.verbose:
            return
        who = (
            f"candidate {candidates[0]}"
            if len(candidates) == 1
            else f"candidates {candidates[0]}-{candidates[-1]}"
        )
        loss = sum(rep.loss) / len(rep.loss)
        acc = (
            f"val acc {rep.val_acc[0]:.2f}"
            if len(rep.val_acc) == 1
            else (
                f"val acc mean {sum(rep.val_acc) / len(rep.val_acc):.2f} max {max(rep.val_acc):.2f}"
            )
        )
        self.line(
            f"task {task + 1} {rep.stage.upper()} {who} epoch {rep.epoch}/{rep.epochs} "
            f"lr {rep.lr:.5f} loss {loss:.4f} {acc} ({rep.train_seconds + rep.eval_seconds:.1f}s)"
        )

    def workers(self, infos: list[dict[str, Any]]) -> None:
        """Where the run trains, said once at the start (a CPU fallback is never silent)."""
        if not infos:
            return
        kinds: dict[str, int] = {}
        for w in infos:
            name = f"{w.get('device')} ({w.get('device_name')})"
            kinds[name] = kinds.get(name, 0) + 1
        nodes = len({w.get("node_id") for w in infos})
        where = ", ".join(f"{n} x {k}" for k, n in kinds.items())
        self.line(f"{len(infos)} worker(s) on {nodes} node(s): {where}")

    def worker_lost(self, task: int, event: WorkerLost, key: str) -> None:
        who = f" for candidates {list(event.candidates)}" if event.candidates else ""
        self.line(
            f"task {task + 1} {event.stage.upper()}: worker {key} died ({event.error}){who}; "
            "re-running on another worker"
        )

    def step(self, task: int, stage: str, what: str, value: float) -> None:
        """A step of QUANTIZE (one bit width) or EVALUATE (one task), as a worker reports it."""
        if self.verbose:
            self.line(f"task {task + 1} {stage.upper()} {what} {value:.2f}")

    def candidate(self, task: int, result: CandidateResult, score: float, winner: bool) -> None:
        mark = "  <- winner" if winner else ""
        shared = f" shares {result.shared:.3f}" if result.shared else ""
        self.line(
            f"task {task + 1} candidate {result.index:>3d}: val acc {result.acc:6.2f} "
            f"sparsity {result.sparsity:.3f}{shared} score {score:.4f}{mark}"
        )

    def stage(self, task: int, stage: str, seconds: float, summary: str) -> None:
        self.line(f"task {task + 1} {stage} done in {seconds:.1f}s: {summary}")

    def task_inference(self, task: int, figures: InferenceFigures) -> None:
        self.line(
            f"task {task + 1} without task ids ({figures.recogniser}): task inferred right "
            f"{figures.task_inference_acc:.2f}%, class-incremental acc "
            f"{figures.class_incremental_acc:.2f}%"
        )

    def task_done(self, task: int, row: list[float], capacity_pct: float) -> None:
        cells = " ".join(f"{v:.2f}" for v in row)
        self.line(
            f"task {task + 1}/{self.num_tasks} committed; test acc of tasks 1..{task + 1}: "
            f"{cells}; capacity {capacity_pct:.2f}%"
        )
