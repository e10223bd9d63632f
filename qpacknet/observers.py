"""Hooks that see a run's progress without being part of it (Tune reporting, tracking).

The pipeline calls every observer after a task is committed and checkpointed, so an observer
always sees a state that a resumed run would also reach; observers never change the run.
Workers' events (:mod:`qpacknet.events`) reach observers on the driver as they arrive, which
is how candidate runs are logged without any worker knowing about MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpacknet.events import Event


@dataclass(frozen=True)
class RunStarted:
    """A run (new or resumed) is about to learn tasks ``first..num_tasks-1``."""

    config: Any
    scenario: str
    preset: str | None
    executor: str
    device: str
    first: int
    num_tasks: int
    out_dir: Path


@dataclass(frozen=True)
class TaskCommitted:
    """What a run knows right after task ``task`` (0-based) is committed and checkpointed."""

    task: int
    num_tasks: int
    row: list[float]
    acc: float
    val_acc: float
    bwt: float
    capacity_pct: float
    report: dict[str, Any]
    out_dir: Path


class RunObserver:
    """Base class with no-op hooks; override the ones you need."""

    def run_started(self, event: RunStarted) -> None:
        """Called once before the first task of this invocation (after a resume, too)."""

    def task_started(self, task: int) -> None:
        """Called before task ``task``'s SEARCH."""

    def worker_event(self, event: Event) -> None:
        """Called on the driver for every worker event, in arrival order, while the stage
        runs (an epoch ended; a stage finished on some worker)."""

    def task_committed(self, event: TaskCommitted) -> None:
        """Called once per committed task, in task order."""

    def run_finished(self, results: dict[str, Any]) -> None:
        """Called with the final ``results.json`` content after it is written."""

    def run_failed(self, error: BaseException) -> None:
        """Called when the run stops with an exception (it is re-raised afterwards)."""
