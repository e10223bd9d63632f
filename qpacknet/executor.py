"""The executor interface the pipeline drives, and its in-process implementation.

The pipeline only calls ``begin_task → search → train → quantize → evaluate → end_task``;
where the candidates train is the executor's business. Every stage passes the workers'
events (:mod:`qpacknet.events`) to the pipeline's callback as they happen and returns the
stage's result. The Ray executor (cluster module) implements the same interface with one
:class:`~qpacknet.worker.CandidateWorker` per chunk in Ray actors. Executors know nothing of
MLflow: the driver logs what the events say.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from qpacknet.config import RunConfig
from qpacknet.devices import configure, describe, resolve_device
from qpacknet.evaluation import EvalRequest, Evaluation, evaluate_stage
from qpacknet.events import EventCallback, drive
from qpacknet.method import QuantizedTask
from qpacknet.scenarios.base import Split, TaskStream
from qpacknet.search import CandidateResult
from qpacknet.store import PackedStore
from qpacknet.worker import CandidateWorker, TaskContext, TrainOutcome


def chunks(population: int, per_worker: int | None, workers: int = 1) -> list[list[int]]:
    """Candidate indices in consecutive chunks: of ``per_worker`` each when it is set, else
    spread evenly over ``workers`` (sizes differ by at most one), so that every worker trains
    a chunk at the same time. The chunking is part of what a run computes (a population's
    float rounding depends on its size), so it is recorded with the results."""
    if per_worker is None:
        n = max(1, min(workers, population))
        size, extra = divmod(population, n)
        out, start = [], 0
        for i in range(n):
            end = start + size + (1 if i < extra else 0)
            out.append(list(range(start, end)))
            start = end
        return out
    return [
        list(range(i, min(i + per_worker, population))) for i in range(0, population, per_worker)
    ]


class Executor(ABC):
    """Runs one task's stages. Calls come in order; each method's output is checked by the
    pipeline before the next stage starts."""

    @abstractmethod
    def begin_run(self, stream: TaskStream, config: RunConfig) -> None:
        """Called once before the first task; an executor may ship the stream to its workers
        (see :meth:`TaskStream.for_workers`) so that tasks need not be sent one by one."""

    @abstractmethod
    def begin_task(self, ctx: TaskContext, stream: TaskStream) -> None:
        """Prepare task ``ctx.task`` of ``stream``."""

    @abstractmethod
    def search(self, on_event: EventCallback | None = None) -> list[CandidateResult]: ...

    @abstractmethod
    def train(self, winner: int, on_event: EventCallback | None = None) -> TrainOutcome: ...

    @abstractmethod
    def quantize(self, on_event: EventCallback | None = None) -> QuantizedTask: ...

    @abstractmethod
    def evaluate(
        self, store: PackedStore, request: EvalRequest, on_event: EventCallback | None = None
    ) -> Evaluation:
        """The test and validation rows and the task-inference pairs from ``store``, on the
        run's evaluation worker (the driver records which one evaluated each row)."""

    @abstractmethod
    def end_task(self) -> None: ...

    def driver_device(self, config: RunConfig) -> str:
        """The device of the process that drives the run (where the local executor trains)."""
        return resolve_device(config.device, where="the driver")

    @abstractmethod
    def worker_info(self) -> list[dict[str, Any]]:
        """What each worker reported about itself (device, GPU name, node), after
        :meth:`begin_run`: shown when the run starts, so a CPU fallback is never silent."""

    def chunk_plan(self, population: int) -> list[list[int]]:
        """How this executor splits a population (recorded in results.json)."""
        return chunks(population, None)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (actors, processes); the local executor has none."""

    @property
    def name(self) -> str:
        return type(self).__name__


class LocalExecutor(Executor):
    """In-process: the chunks run one after another in this process, on this process's
    device (``config.device`` resolved by :func:`~qpacknet.devices.resolve_device`)."""

    def __init__(self) -> None:
        self._config: RunConfig | None = None
        self._ctx: TaskContext | None = None
        self._splits: tuple[Split, Split] | None = None
        self._stream: TaskStream | None = None
        self._workers: list[CandidateWorker] = []
        self._winner: CandidateWorker | None = None
        self._device: str | None = None
        self._where: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "local"

    def worker_info(self) -> list[dict[str, Any]]:
        return [dict(self._where)] if self._where else []

    def chunk_plan(self, population: int) -> list[list[int]]:
        """``candidates_per_worker``, else ``executor.workers`` chunks when it is a number
        (the same plan as a Ray run with that many actors), else one chunk."""
        if self._config is None:
            return chunks(population, None)
        ex = self._config.executor
        workers = ex.workers if isinstance(ex.workers, int) else 1
        return chunks(population, ex.candidates_per_worker, workers)

    def begin_run(self, stream: TaskStream, config: RunConfig) -> None:
        self._stream, self._config = stream, config
        self._device = resolve_device(config.device, where="the driver (local executor)")
        self._where = {**describe(self._device), **configure(self._device, config.train.allow_tf32)}

    def begin_task(self, ctx: TaskContext, stream: TaskStream) -> None:
        self._ctx, self._splits, self._stream = ctx, stream.fit_splits(ctx.task), stream
        self._workers, self._winner = [], None

    def search(self, on_event: EventCallback | None = None) -> list[CandidateResult]:
        if self._ctx is None or self._splits is None or self._device is None:
            raise RuntimeError("begin_task() first")
        results: list[CandidateResult] = []
        for chunk in self.chunk_plan(self._ctx.config.search.population):
            worker = CandidateWorker(self._ctx, *self._splits, self._device, self._where)
            results.extend(drive(worker.search(chunk), on_event))
            self._workers.append(worker)
        return results

    def train(self, winner: int, on_event: EventCallback | None = None) -> TrainOutcome:
        holders = [w for w in self._workers if w.holds(winner)]
        if not holders:
            raise RuntimeError(f"no worker holds candidate {winner}")
        self._winner = holders[0]
        for w in self._workers:
            if w is not self._winner:
                w.population = None
        return drive(self._winner.train(winner), on_event)

    def quantize(self, on_event: EventCallback | None = None) -> QuantizedTask:
        if self._winner is None or self._ctx is None or self._stream is None:
            raise RuntimeError("train() first")
        return drive(self._winner.quantize(self._stream.test_split(self._ctx.task)), on_event)

    def evaluate(
        self, store: PackedStore, request: EvalRequest, on_event: EventCallback | None = None
    ) -> Evaluation:
        if self._stream is None or self._device is None or self._config is None:
            raise RuntimeError("begin_run() first")
        batch = self._config.train.eval_batch_size
        stream = self._stream
        stage = evaluate_stage(
            store, request, stream.test_split, stream.val_split, self._device, batch, self._where
        )
        return drive(stage, on_event)

    def end_task(self) -> None:
        self._workers, self._winner, self._splits = [], None, None
