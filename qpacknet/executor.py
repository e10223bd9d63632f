"""The executor interface the pipeline drives, and its in-process implementation.

The pipeline only calls ``begin_task → search → train → quantize → end_task``; where the
candidates train is the executor's business. The Ray executor (cluster module) implements the
same interface with one :class:`~qpacknet.worker.CandidateWorker` per actor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from qpacknet.scenarios.base import Split, TaskStream
from qpacknet.search import CandidateResult
from qpacknet.tracking.candidates import CandidateRuns, open_runs
from qpacknet.train import EpochReport
from qpacknet.worker import CandidateWorker, QuantizedTask, TaskContext, TrainOutcome

ChunkEpochCallback = Callable[[list[int], EpochReport], None]


def chunks(population: int, per_worker: int | None) -> list[list[int]]:
    """Candidate indices split into consecutive chunks of ``per_worker`` (None: one chunk)."""
    size = population if per_worker is None else per_worker
    return [list(range(i, min(i + size, population))) for i in range(0, population, size)]


def _tee(
    keep: list[EpochReport], on_epoch: ChunkEpochCallback | None, chunk: list[int]
) -> Callable[[EpochReport], None]:
    """An epoch callback that keeps each report (for tracking) and passes it on live."""

    def callback(rep: EpochReport) -> None:
        keep.append(rep)
        if on_epoch is not None:
            on_epoch(chunk, rep)

    return callback


class Executor(ABC):
    """Runs one task's stages. Calls come in order; each method's output is checked by the
    pipeline before the next stage starts."""

    def begin_run(self, stream: TaskStream) -> None:  # noqa: B027 - optional hook
        """Called once before the first task; an executor may ship the stream to its workers
        (see :meth:`TaskStream.for_workers`) so that tasks need not be sent one by one."""

    @abstractmethod
    def begin_task(self, ctx: TaskContext, stream: TaskStream) -> None:
        """Prepare task ``ctx.task`` of ``stream``; may return before its data is ready
        (the driver builds its own evaluation splits meanwhile)."""

    @abstractmethod
    def search(self, on_epoch: ChunkEpochCallback | None = None) -> list[CandidateResult]: ...

    @abstractmethod
    def train(self, winner: int, on_epoch: ChunkEpochCallback | None = None) -> TrainOutcome: ...

    @abstractmethod
    def quantize(self) -> QuantizedTask: ...

    @abstractmethod
    def end_task(self) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (actors, processes); the local executor has none."""

    @property
    def name(self) -> str:
        return type(self).__name__


class LocalExecutor(Executor):
    """In-process: the chunks run one after another in this process."""

    def __init__(self) -> None:
        self._ctx: TaskContext | None = None
        self._splits: tuple[Split, Split] | None = None
        self._workers: list[CandidateWorker] = []
        self._winner: CandidateWorker | None = None
        self._runs: CandidateRuns | None = None

    @property
    def name(self) -> str:
        return "local"

    def begin_task(self, ctx: TaskContext, stream: TaskStream) -> None:
        self._ctx, self._splits = ctx, stream.fit_splits(ctx.task)
        self._workers, self._winner = [], None
        self._runs = open_runs(ctx.tracking)

    def search(self, on_epoch: ChunkEpochCallback | None = None) -> list[CandidateResult]:
        if self._ctx is None or self._splits is None:
            raise RuntimeError("begin_task() first")
        cfg = self._ctx.config
        results: list[CandidateResult] = []
        for chunk in chunks(cfg.search.population, cfg.executor.candidates_per_worker):
            worker = CandidateWorker(self._ctx, *self._splits)
            reports: list[EpochReport] = []
            chunk_results = worker.search(chunk, _tee(reports, on_epoch, chunk))
            if self._runs is not None:
                self._runs.searched(chunk_results, reports)
            results.extend(chunk_results)
            self._workers.append(worker)
        return results

    def train(self, winner: int, on_epoch: ChunkEpochCallback | None = None) -> TrainOutcome:
        holders = [w for w in self._workers if w.holds(winner)]
        if not holders:
            raise RuntimeError(f"no worker holds candidate {winner}")
        self._winner = holders[0]
        for w in self._workers:
            if w is not self._winner:
                w.population = None
        reports: list[EpochReport] = []
        outcome = self._winner.train(winner, _tee(reports, on_epoch, [winner]))
        if self._runs is not None:
            self._runs.trained(winner, reports)
        return outcome

    def quantize(self) -> QuantizedTask:
        if self._winner is None:
            raise RuntimeError("train() first")
        return self._winner.quantize()

    def end_task(self) -> None:
        if self._runs is not None:
            self._runs.close()
        self._workers, self._winner, self._splits, self._runs = [], None, None, None
