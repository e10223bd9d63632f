"""The candidate actor: a :class:`~qpacknet.worker.CandidateWorker` per chunk, kept alive
across the stages of a task so the winner continues where it stopped (no weights shipped).

Every stage method is a generator: Ray runs it as a streaming generator, so each epoch's
:class:`~qpacknet.events.EpochEnded` reaches the driver while the stage still runs, and the
stage's :class:`~qpacknet.events.StageDone` comes last. The actor resolves its own device
(:func:`~qpacknet.devices.resolve_device`) and fails loudly when Ray gave it a GPU that it
cannot see. It imports nothing of MLflow.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qpacknet.cluster.transfer import unpack_split, unpack_splits
from qpacknet.config import RunConfig
from qpacknet.devices import configure, describe, resolve_device
from qpacknet.evaluation import EvalRequest, evaluate_stage
from qpacknet.events import STAGES, Event
from qpacknet.scenarios.base import Split, TaskStream
from qpacknet.store import load_store
from qpacknet.worker import CandidateWorker, TaskContext


class CandidateActor:
    """Plain class; :class:`~qpacknet.cluster.ray_executor.RayExecutor` wraps it with
    ``ray.remote`` and the configured resources."""

    def __init__(self, config: RunConfig, threads: int | None = None) -> None:
        import ray

        if threads:
            torch.set_num_threads(threads)
        node = ray.get_runtime_context().get_node_id()
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        where = f"Ray actor pid {os.getpid()} on node {node} (host {socket.gethostname()})"
        self.device = resolve_device(config.device, gpu_ids=gpu_ids, where=where)
        self.where = {
            **describe(self.device, node),
            **configure(self.device, config.train.allow_tf32),
            "gpu_ids": gpu_ids,
        }
        self.batch_size = config.train.eval_batch_size
        self._ctx: TaskContext | None = None
        self._stream: TaskStream | None = None
        self._splits: tuple[Split, Split] | None = None
        self._workers: dict[int, CandidateWorker] = {}

    def info(self) -> dict[str, Any]:
        """Where this actor runs and on what device (asked once when it starts)."""
        return dict(self.where)

    def begin_run(self, stream: TaskStream) -> None:
        """Keep the run's stream (see :meth:`TaskStream.for_workers`) to build tasks locally."""
        self._stream = stream

    def begin_task(self, ctx: TaskContext, packed: dict[str, Any] | None) -> int:
        """Set up task ``ctx.task``; its splits come from ``packed`` when the driver sent
        them, else this actor builds them from the run's stream."""
        self._ctx = ctx
        if packed is not None:
            self._splits = unpack_splits(packed)
        elif self._stream is not None:
            self._splits = self._stream.fit_splits(ctx.task)
        else:
            raise RuntimeError("begin_task() without data needs begin_run() with a stream")
        self._workers = {}
        return os.getpid()

    def search(self, chunk: list[int]) -> Iterator[Event]:
        _maybe_die("search")
        if self._ctx is None or self._splits is None:
            raise RuntimeError("begin_task() was not called on this actor")
        worker = CandidateWorker(self._ctx, *self._splits, self.device, self.where)
        self._workers[chunk[0]] = worker
        yield from worker.search(chunk)

    def _holder(self, candidate: int) -> CandidateWorker:
        for worker in self._workers.values():
            if worker.holds(candidate):
                return worker
        raise RuntimeError(f"this actor does not hold candidate {candidate}")

    def train(self, winner: int) -> Iterator[Event]:
        _maybe_die("train")
        worker = self._holder(winner)
        self._workers = {0: worker}
        yield from worker.train(winner)

    def quantize(self, winner: int, test: dict[str, Any] | None = None) -> Iterator[Event]:
        """QUANTIZE on the winner's worker. The task's test split (for the float network's
        reported test accuracy) comes from the run's stream, or packed from the driver for
        streams without a worker copy."""
        _maybe_die("quantize")
        if self._ctx is None:
            raise RuntimeError("begin_task() was not called on this actor")
        if test is not None:
            split = unpack_split(test)
        elif self._stream is not None:
            split = self._stream.test_split(self._ctx.task)
        else:
            raise RuntimeError("quantize() needs the run's stream or the task's test split")
        yield from self._holder(winner).quantize(split)

    def evaluate(
        self,
        model: bytes,
        request: EvalRequest,
        tests: dict[int, Any] | None,
        vals: dict[int, Any] | None = None,
    ) -> Iterator[Event]:
        """EVALUATE on this actor's device from ``model``, the packed model file's bytes
        (loaded with all of its checks). Test splits come from the run's stream, or (for
        streams without a worker copy) from ``tests``: object refs of each task's test split,
        each put in the object store once."""
        import ray

        _maybe_die("evaluate")
        with tempfile.TemporaryDirectory(prefix="qpacknet-eval-") as tmp:
            path = Path(tmp) / "model.qpk"
            path.write_bytes(model)
            store = load_store(path)

        def test_split(j: int) -> Split:
            if tests is not None:
                return unpack_split(ray.get(tests[j]))
            if self._stream is None:
                raise RuntimeError("evaluate() needs the run's stream or the test splits")
            return self._stream.test_split(j)

        def val_split(j: int) -> Split:
            if vals is not None:
                return unpack_split(ray.get(vals[j]))
            if self._stream is None:
                raise RuntimeError("evaluate() needs the run's stream or the validation splits")
            return self._stream.val_split(j)

        yield from evaluate_stage(
            store, request, test_split, val_split, self.device, self.batch_size, self.where
        )

    def end_task(self) -> None:
        """Drop the task's state."""
        self._ctx, self._splits, self._workers = None, None, {}


FAULT_MARKER_ENV = "QPACKNET_TEST_DIE_ONCE"


def _maybe_die(stage: str) -> None:
    """Fault injection for tests (Ray's marker-file pattern): if the file named by
    ``$QPACKNET_TEST_DIE_ONCE`` exists and names ``stage`` as its first word (a file naming no
    stage means ``search``), remove it and kill this process as the stage starts."""
    marker = os.environ.get(FAULT_MARKER_ENV)
    if not marker:
        return
    try:
        words = open(marker).read().split()  # noqa: SIM115 - a marker read once
    except FileNotFoundError:
        return
    wanted = words[0] if words and words[0] in STAGES else "search"
    if wanted != stage:
        return
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return
    os._exit(1)
