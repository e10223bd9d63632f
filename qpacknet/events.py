"""What workers report to the driver, as plain data (DESIGN.md §4: events flow worker → driver
→ printer and MLflow, never back into the method).

A worker stage is a generator: it yields an :class:`EpochEnded` the moment each epoch ends (a
:class:`StepDone` per bit width or evaluated task in the stages without epochs) and finishes
with one :class:`StageDone` that carries the stage's result. The local executor
iterates it in-process; the Ray executor runs the same generator inside an actor as a Ray
streaming generator, so every event reaches the driver while the stage is still running. The
driver is the only consumer: it prints progress and it alone writes MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from qpacknet.train import EpochReport

STAGES = ("search", "train", "quantize", "evaluate")


@dataclass(frozen=True)
class EpochEnded:
    """One epoch of ``candidates`` (a chunk in SEARCH, the winner in TRAIN) has ended;
    ``ended_at`` is the worker's wall clock (``time.time()``) at that moment."""

    task: int
    candidates: tuple[int, ...]
    report: EpochReport
    ended_at: float
    worker: dict[str, Any]


@dataclass(frozen=True)
class StepDone:
    """A step inside a stage that has no epochs: QUANTIZE tried one bit width, EVALUATE
    measured one task. ``what`` says which (e.g. ``"4 bits"``), ``value`` the accuracy (%)."""

    stage: str
    task: int
    what: str
    value: float
    ended_at: float
    worker: dict[str, Any]


@dataclass(frozen=True)
class StageDone:
    """A stage finished on ``worker``; ``result`` is what the executor returns for it
    (a chunk's ``list[CandidateResult]``, a ``TrainOutcome``, a ``QuantizedTask`` or an
    ``Evaluation``)."""

    stage: str
    task: int
    candidates: tuple[int, ...]
    result: Any
    started_at: float
    ended_at: float
    worker: dict[str, Any]


@dataclass(frozen=True)
class WorkerLost:
    """The worker running ``stage`` for ``candidates`` died (``error`` names how); the
    executor re-runs that work on another worker, so the lost attempt's events may come
    again. ``worker`` is what the lost worker had reported about itself (may be empty)."""

    stage: str
    task: int
    candidates: tuple[int, ...]
    error: str
    worker: dict[str, Any]


Event = EpochEnded | StepDone | StageDone | WorkerLost
EventCallback = Callable[[Event], None]


def worker_key(worker: dict[str, Any]) -> str:
    """A short stable name of a worker process: ``host:pid``."""
    return f"{worker.get('host')}:{worker.get('pid')}"


def drive(events: Iterator[Event], on_event: EventCallback | None) -> Any:
    """Run a stage generator to its end in this process, passing every event on; the result
    of its :class:`StageDone`."""
    done: StageDone | None = None
    for event in events:
        if on_event is not None:
            on_event(event)
        if isinstance(event, StageDone):
            done = event
    if done is None:
        raise RuntimeError("a worker stage ended without reporting its result")
    return done.result
