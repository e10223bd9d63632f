"""Ray executor: the population is split into chunks, each trained by a candidate actor.

The stream's worker copy goes into the object store once per run and each actor builds a
task's splits itself; streams without one have each task's tensors put in the object store once
and the reference handed to every actor. Actors take chunks from a queue (a population larger
than the cluster's slots simply waits for a free actor). An actor that dies is replaced and
its chunk re-run: training is a pure function of (seed, task, candidate, committed store), so
the re-run gives the same result. The winner's actor continues with TRAIN and QUANTIZE on the
state it holds.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from qpacknet.cluster.actor import CandidateActor
from qpacknet.cluster.connect import connect
from qpacknet.cluster.transfer import pack_splits
from qpacknet.config import ExecutorConfig
from qpacknet.executor import ChunkEpochCallback, Executor, chunks
from qpacknet.scenarios.base import TaskStream
from qpacknet.search import CandidateResult
from qpacknet.worker import QuantizedTask, TaskContext, TrainOutcome

log = logging.getLogger(__name__)
_ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


class RayExecutor(Executor):
    """Candidate actors on the Ray cluster; see the module docstring."""

    def __init__(
        self,
        cfg: ExecutorConfig,
        address: str | None = None,
        population: int | None = None,
        owns_ray: bool = False,
    ) -> None:
        """Connect to (or start) Ray; ``owns_ray`` says the caller started Ray for this run
        (see :func:`~qpacknet.cluster.connect.connect`) and it is shut down on close. With
        ``population`` the candidate actors start now, so that their imports overlap the
        driver's data loading instead of delaying task 1."""
        self.cfg = cfg
        self._started = connect(address) or owns_ray
        self._actors: list[Any] = []
        self._ctx: TaskContext | None = None
        self._stream_ref: Any = None
        self._data_ref: Any = None
        self._holder: dict[int, Any] = {}
        self._chunk_of: dict[int, list[int]] = {}
        self._winner_actor: Any = None
        self._winner: int | None = None
        self.restarts = 0
        self.actors_started = 0
        self._planned = 1
        self.placements: dict[int, str] = {}
        self._node_of: dict[Any, str] = {}
        if population is not None:
            self._ensure_actors(population)

    @property
    def name(self) -> str:
        return "ray"

    def _gpus(self) -> float:
        if self.cfg.gpus_per_worker != "auto":
            return float(self.cfg.gpus_per_worker)
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def _slots(self, wanted: int) -> int:
        if self.cfg.workers != "auto":
            return min(int(self.cfg.workers), wanted)
        res = ray.cluster_resources()
        gpus = self._gpus()
        if gpus > 0:
            fit = int(res.get("GPU", 0) // gpus)
        elif self.cfg.cpus_per_worker == "auto":
            fit = int(res.get("CPU", 1))
        else:
            fit = int(res.get("CPU", 1) // self.cfg.cpus_per_worker)
        return max(1, min(fit, wanted))

    def _cpus(self) -> float:
        """CPUs per actor: as configured, or with ``"auto"`` one per actor on GPU clusters and
        an equal share of the cluster's CPUs otherwise (never more threads than cores)."""
        if self.cfg.cpus_per_worker != "auto":
            return float(self.cfg.cpus_per_worker)
        if self._gpus() > 0:
            return 1.0
        return float(max(1, int(ray.cluster_resources().get("CPU", 1)) // self._planned))

    def _new_actor(self) -> Any:
        """Start one actor (without waiting for it); it gets the run's stream if there is one."""
        gpus = self._gpus()
        cpus = self._cpus()
        remote = ray.remote(CandidateActor).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0
        )
        self.actors_started += 1
        actor = remote.remote(max(1, int(cpus)))
        if self._stream_ref is not None:
            actor.begin_run.remote(self._stream_ref)
        return actor

    def _ensure_actors(self, population: int) -> None:
        """As many actors as this population's chunks can use and the cluster fits."""
        n_chunks = len(chunks(population, self.cfg.candidates_per_worker))
        want = self._slots(n_chunks)
        self._planned = max(want, len(self._actors))
        while len(self._actors) < want:
            self._actors.append(self._new_actor())

    def begin_run(self, stream: TaskStream) -> None:
        """Put the stream's worker copy in the object store once; actors then build each task
        themselves and only the task context travels per task."""
        shippable = stream.for_workers()
        if shippable is None:
            return
        self._stream_ref = ray.put(shippable)
        for actor in self._actors:
            actor.begin_run.remote(self._stream_ref)

    def _node(self, actor: Any) -> str:
        """The node id an actor runs on (asked once per actor)."""
        if actor not in self._node_of:
            self._node_of[actor] = ray.get(actor.info.remote())["node_id"]
        return self._node_of[actor]

    def begin_task(self, ctx: TaskContext, stream: TaskStream) -> None:
        self._ensure_actors(ctx.config.search.population)
        device = "cuda" if self._gpus() > 0 else "cpu"
        self._ctx = dataclasses.replace(ctx, device=device)
        if self._stream_ref is None:
            self._data_ref = ray.put(pack_splits(*stream.fit_splits(ctx.task)))
        self._holder, self._chunk_of = {}, {}
        self._winner_actor, self._winner = None, None
        ray.get([a.begin_task.remote(self._ctx, self._data_ref) for a in self._actors])

    def _replace(self, actor: Any) -> Any:
        """Swap a dead actor for a fresh one that has the current task's context."""
        self.restarts += 1
        idx = self._actors.index(actor)
        try:
            ray.kill(actor)
        except Exception:  # already gone
            log.debug("actor already gone")
        fresh = self._new_actor()
        ray.get(fresh.begin_task.remote(self._ctx, self._data_ref))
        self._actors[idx] = fresh
        return fresh

    def search(self, on_epoch: ChunkEpochCallback | None = None) -> list[CandidateResult]:
        if self._ctx is None:
            raise RuntimeError("begin_task() first")
        cfg = self._ctx.config
        todo = chunks(cfg.search.population, cfg.executor.candidates_per_worker)
        tries = {c[0]: 0 for c in todo}
        idle = list(self._actors)
        running: dict[Any, tuple[Any, list[int]]] = {}
        results: list[CandidateResult] = []
        while todo or running:
            while todo and idle:
                actor, chunk = idle.pop(0), todo.pop(0)
                running[actor.search.remote(chunk)] = (actor, chunk)
            done, _ = ray.wait(list(running), num_returns=1)
            actor, chunk = running.pop(done[0])
            try:
                chunk_results, reports = ray.get(done[0])
            except _ACTOR_LOST as exc:
                tries[chunk[0]] += 1
                if tries[chunk[0]] > self.cfg.max_retries:
                    raise RuntimeError(
                        f"candidates {chunk}: actor died {tries[chunk[0]]} times; giving up"
                    ) from exc
                log.warning(
                    "actor training candidates %s died (%s); re-running on a new actor",
                    chunk,
                    type(exc).__name__,
                )
                self._forget(actor)
                idle.append(self._replace(actor))
                todo.insert(0, chunk)
                continue
            for rep in reports:
                if on_epoch is not None:
                    on_epoch(chunk, rep)
            for r in chunk_results:
                self._holder[r.index] = actor
                self._chunk_of[r.index] = chunk
                self.placements[r.index] = self._node(actor)
            results.extend(chunk_results)
            idle.append(actor)
        return sorted(results, key=lambda r: r.index)

    def _forget(self, actor: Any) -> None:
        """Drop the candidates a dead actor held (they are re-trained if one is needed)."""
        for held in [c for c, a in self._holder.items() if a is actor]:
            del self._holder[held]

    def _rerun_chunk(self, candidate: int) -> Any:
        """Re-train the chunk holding ``candidate`` on a fresh actor; same seeds, same result."""
        chunk = self._chunk_of[candidate]
        actor = self._new_spare()
        ray.get(actor.search.remote(chunk))
        for c in chunk:
            self._holder[c] = actor
        return actor

    def _new_spare(self) -> Any:
        actor = self._new_actor()
        ray.get(actor.begin_task.remote(self._ctx, self._data_ref))
        self._actors.append(actor)
        return actor

    def train(self, winner: int, on_epoch: ChunkEpochCallback | None = None) -> TrainOutcome:
        if winner not in self._chunk_of:
            raise RuntimeError(f"candidate {winner} was never searched")
        for attempt in range(self.cfg.max_retries + 1):
            actor = self._holder.get(winner) or self._rerun_chunk(winner)
            try:
                outcome, reports = ray.get(actor.train.remote(winner))
                break
            except _ACTOR_LOST:
                if attempt == self.cfg.max_retries:
                    raise
                log.warning("the actor holding winner %d died; re-training its chunk", winner)
                self._forget(actor)
                self._actors.remove(actor)
        for rep in reports:
            if on_epoch is not None:
                on_epoch([winner], rep)
        self._winner_actor, self._winner = actor, winner
        return outcome

    def quantize(self) -> QuantizedTask:
        if self._winner_actor is None or self._winner is None:
            raise RuntimeError("train() first")
        try:
            return ray.get(self._winner_actor.quantize.remote(self._winner))
        except _ACTOR_LOST:
            log.warning("the winner's actor died before QUANTIZE; re-training it")
            self._forget(self._winner_actor)
            self._actors.remove(self._winner_actor)
            self.train(self._winner)
            return ray.get(self._winner_actor.quantize.remote(self._winner))

    def end_task(self) -> None:
        ray.get([a.end_task.remote() for a in self._actors])
        self._data_ref, self._holder, self._winner_actor = None, {}, None

    def close(self) -> None:
        for a in self._actors:
            try:
                ray.kill(a)
            except Exception:
                log.debug("actor already gone")
        self._actors = []
        if self._started:
            self._started = False
            ray.shutdown()
