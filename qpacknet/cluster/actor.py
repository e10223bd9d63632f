"""The candidate actor: a :class:`~qpacknet.worker.CandidateWorker` per chunk, kept alive
across the stages of a task so the winner continues where it stopped (no weights shipped)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from qpacknet.cluster.transfer import unpack_splits
from qpacknet.scenarios.base import Split, TaskStream
from qpacknet.search import CandidateResult
from qpacknet.tracking.candidates import CandidateRuns, open_runs
from qpacknet.train import EpochReport
from qpacknet.worker import CandidateWorker, QuantizedTask, TaskContext, TrainOutcome


class CandidateActor:
    """Plain class; :class:`~qpacknet.cluster.ray_executor.RayExecutor` wraps it with
    ``ray.remote`` and the configured resources."""

    def __init__(self, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self._ctx: TaskContext | None = None
        self._stream: TaskStream | None = None
        self._splits: tuple[Split, Split] | None = None
        self._workers: dict[int, CandidateWorker] = {}
        self._runs: CandidateRuns | None = None

    def info(self) -> dict[str, Any]:
        import ray

        rt = ray.get_runtime_context()
        return {
            "node_id": rt.get_node_id(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda": torch.cuda.is_available(),
            "threads": torch.get_num_threads(),
        }

    def begin_run(self, stream: TaskStream) -> None:
        """Keep the run's stream (see :meth:`TaskStream.for_workers`) to build tasks locally."""
        self._stream = stream

    def begin_task(self, ctx: TaskContext, packed: dict[str, Any] | None) -> int:
        """Set up task ``ctx.task``; its splits come from ``packed`` when the driver sent
        them, else this actor builds them from the run's stream."""
        device = "cuda" if torch.cuda.is_available() and ctx.device.startswith("cuda") else "cpu"
        self._ctx = dataclasses.replace(ctx, device=device)
        if packed is not None:
            self._splits = unpack_splits(packed)
        elif self._stream is not None:
            self._splits = self._stream.fit_splits(ctx.task)
        else:
            raise RuntimeError("begin_task() without data needs begin_run() with a stream")
        self._workers = {}
        if self._runs is not None:
            self._runs.close()
        self._runs = open_runs(ctx.tracking)
        return os.getpid()

    def search(self, chunk: list[int]) -> tuple[list[CandidateResult], list[EpochReport]]:
        _maybe_die()
        if self._ctx is None or self._splits is None:
            raise RuntimeError("begin_task() was not called on this actor")
        reports: list[EpochReport] = []
        worker = CandidateWorker(self._ctx, *self._splits)
        results = worker.search(chunk, reports.append)
        self._workers[chunk[0]] = worker
        if self._runs is not None:
            self._runs.searched(results, reports)
        return results, reports

    def _holder(self, candidate: int) -> CandidateWorker:
        for worker in self._workers.values():
            if worker.holds(candidate):
                return worker
        raise RuntimeError(f"this actor does not hold candidate {candidate}")

    def train(self, winner: int) -> tuple[TrainOutcome, list[EpochReport]]:
        worker = self._holder(winner)
        self._workers = {0: worker}
        reports: list[EpochReport] = []
        outcome = worker.train(winner, reports.append)
        if self._runs is not None:
            self._runs.trained(winner, reports)
        return outcome, reports

    def quantize(self, winner: int) -> QuantizedTask:
        return self._holder(winner).quantize()

    def end_task(self) -> None:
        """Drop the task's state; wait for this actor's candidate runs to be logged."""
        if self._runs is not None:
            self._runs.close()
        self._ctx, self._splits, self._workers, self._runs = None, None, {}, None


FAULT_MARKER_ENV = "QPACKNET_TEST_DIE_ONCE"


def _maybe_die() -> None:
    """Fault injection for tests (Ray's marker-file pattern): if the file named by
    ``$QPACKNET_TEST_DIE_ONCE`` exists, remove it and kill this process mid-search."""
    marker = os.environ.get(FAULT_MARKER_ENV)
    if marker:
        try:
            os.unlink(marker)
        except FileNotFoundError:
            return
        os._exit(1)
