"""Ray executor: the population is split into chunks, each trained by a candidate actor.

By default the population is spread evenly over the actors (one actor per GPU, or an equal
share of the CPUs), so N workers train N chunks at once; ``candidates_per_worker`` fixes the
chunk size instead (chunks then queue for a free actor). Every actor method is a Ray streaming
generator: the driver multiplexes them with ``ray.wait`` and passes each epoch event on the
moment it arrives, so the run's log never waits for a stage to end.

The stream's worker copy goes into the object store once per run and each actor builds a
task's splits itself; streams without one have each task's tensors put in the object store once
and the reference handed to every actor. An actor that dies is replaced and its chunk re-run:
training is a pure function of (seed, task, candidate, committed store), so the re-run gives
the same result. The winner's actor continues with TRAIN and QUANTIZE on the state it holds.
Every loss is reported as a :class:`~qpacknet.events.WorkerLost` event (the driver prints it),
and the lost attempt's events may come again from the re-run.

EVALUATE runs on one actor (the first one started), so every reported accuracy comes from one
device; only if that actor dies does a fresh actor take over, and the driver records which
worker evaluated each task.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from qpacknet.cluster.actor import CandidateActor
from qpacknet.cluster.connect import connect
from qpacknet.cluster.placement import gpus_per_worker, scalable_gpu_total
from qpacknet.cluster.transfer import pack_split, pack_splits
from qpacknet.config import RunConfig
from qpacknet.devices import DeviceError
from qpacknet.evaluation import EvalRequest, Evaluation
from qpacknet.events import EventCallback, StageDone, WorkerLost, drive
from qpacknet.executor import Executor, chunks
from qpacknet.method import QuantizedTask
from qpacknet.scenarios.base import TaskStream
from qpacknet.search import CandidateResult
from qpacknet.store import PackedStore, save_store
from qpacknet.worker import TaskContext, TrainOutcome

log = logging.getLogger(__name__)
_ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)
PLACEMENT_REPORT_S = 60


class RayExecutor(Executor):
    """Candidate actors on the Ray cluster; see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        address: str | None = None,
        owns_ray: bool = False,
        start_actors: bool = True,
    ) -> None:
        """Connect to (or start) Ray; ``owns_ray`` says the caller started Ray for this run
        (see :func:`~qpacknet.cluster.connect.connect`) and it is shut down on close. With
        ``start_actors`` the candidate actors start now, so that their imports overlap the
        driver's data loading instead of delaying task 1."""
        self.config = config
        self.cfg = config.executor
        self._started = connect(address) or owns_ray
        self._actors: list[Any] = []
        self._info: dict[Any, dict[str, Any]] = {}
        self._ctx: TaskContext | None = None
        self._stream: TaskStream | None = None
        self._stream_ref: Any = None
        self._data_ref: Any = None
        self._test_refs: dict[int, Any] = {}
        self._val_refs: dict[int, Any] = {}
        self._holder: dict[int, Any] = {}
        self._chunk_of: dict[int, list[int]] = {}
        self._winner_actor: Any = None
        self._winner: int | None = None
        self._evaluator: Any = None
        self.restarts = 0
        self.actors_started = 0
        self.placements: dict[int, str] = {}
        self._gpus = gpus_per_worker(self.cfg.gpus_per_worker, config.device)
        self._planned = self._slots(config.search.population)
        if start_actors:
            self._ensure_actors()

    @property
    def name(self) -> str:
        return "ray"

    def _slots(self, population: int) -> int:
        """How many actors this population can use and the cluster fits."""
        wanted = len(chunks(population, self.cfg.candidates_per_worker, population))
        if self.cfg.workers != "auto":
            return min(int(self.cfg.workers), wanted)
        res = ray.cluster_resources()
        if self._gpus > 0:
            gpus = float(res.get("GPU", 0))
            if gpus < wanted * self._gpus:  # an autoscaler may add GPU nodes for the actors
                gpus = max(gpus, min(scalable_gpu_total(), wanted * self._gpus))
            fit = int(gpus // self._gpus)
        elif self.cfg.cpus_per_worker == "auto":
            fit = int(res.get("CPU", 1))
        else:
            fit = int(res.get("CPU", 1) // self.cfg.cpus_per_worker)
        return max(1, min(fit, wanted))

    def chunk_plan(self, population: int) -> list[list[int]]:
        return chunks(population, self.cfg.candidates_per_worker, self._planned)

    def _cpus(self) -> float:
        """CPUs per actor: as configured, or with ``"auto"`` one per actor on GPU clusters and
        an equal share of the cluster's CPUs otherwise (never more threads than cores)."""
        if self.cfg.cpus_per_worker != "auto":
            return float(self.cfg.cpus_per_worker)
        if self._gpus > 0:
            return 1.0
        return float(max(1, int(ray.cluster_resources().get("CPU", 1)) // self._planned))

    def _new_actor(self) -> Any:
        """Start one actor (without waiting for it); it gets the run's stream if there is one."""
        cpus = self._cpus()
        remote = ray.remote(CandidateActor).options(
            num_cpus=cpus, num_gpus=self._gpus, max_restarts=0, max_task_retries=0
        )
        self.actors_started += 1
        actor = remote.remote(self.config, max(1, int(cpus)))
        if self._stream_ref is not None:
            actor.begin_run.remote(self._stream_ref)
        return actor

    def _ensure_actors(self) -> None:
        while len(self._actors) < self._planned:
            self._actors.append(self._new_actor())

    def _where(self, actor: Any) -> dict[str, Any]:
        """What an actor reported about itself; a failed start (e.g. a GPU it cannot see)
        stops the run with the actor's own message. An actor that waits for resources (an
        autoscaler adding a node) is reported every minute, never waited for silently."""
        if actor not in self._info:
            ref = actor.info.remote()
            waited = 0
            while not ray.wait([ref], timeout=PLACEMENT_REPORT_S)[0]:
                waited += PLACEMENT_REPORT_S
                log.warning(
                    "a candidate actor has waited %d s to start (it asks for %g CPU and %g GPU; "
                    "cluster resources now %s); still waiting",
                    waited,
                    self._cpus(),
                    self._gpus,
                    ray.available_resources(),
                )
            try:
                self._info[actor] = ray.get(ref)
            except _ACTOR_LOST as exc:
                text = str(exc)
                if "DeviceError" in text:
                    detail = text[text.rfind("DeviceError") :].split("\n", 1)[0]
                    raise DeviceError(f"a candidate actor could not start: {detail}") from None
                raise RuntimeError(f"a candidate actor could not start: {text}") from exc
        return self._info[actor]

    def driver_device(self, config: RunConfig) -> str:
        """The driver only checks and records; the actors resolve (and enforce) the device."""
        return "cpu"

    def worker_info(self) -> list[dict[str, Any]]:
        return [self._where(a) for a in self._actors]

    def begin_run(self, stream: TaskStream, config: RunConfig) -> None:
        """Put the stream's worker copy in the object store once; actors then build each task
        themselves and only the task context travels per task. Waits for every actor to
        report where it runs (and fails loudly if one cannot use its device)."""
        self._ensure_actors()
        self._stream = stream
        shippable = stream.for_workers()
        if shippable is not None:
            self._stream_ref = ray.put(shippable)
            for actor in self._actors:
                actor.begin_run.remote(self._stream_ref)
        for actor in self._actors:
            self._where(actor)
        self._evaluator = self._actors[0]

    def begin_task(self, ctx: TaskContext, stream: TaskStream) -> None:
        self._ensure_actors()
        self._ctx = ctx
        if self._stream_ref is None:
            self._data_ref = ray.put(pack_splits(*stream.fit_splits(ctx.task)))
        self._holder, self._chunk_of = {}, {}
        self._winner_actor, self._winner = None, None
        ray.get([a.begin_task.remote(self._ctx, self._data_ref) for a in self._actors])

    def _lose(
        self,
        actor: Any,
        stage: str,
        candidates: list[int],
        exc: BaseException,
        on_event: EventCallback | None,
    ) -> None:
        """An actor died: say so (a WorkerLost event the driver prints), drop what it held
        and, if it was the evaluation actor, let the next EVALUATE start a fresh one."""
        self.restarts += 1
        where = self._info.get(actor, {})
        log.debug("actor %s lost during %s: %s", where.get("pid"), stage, exc)
        if on_event is not None and self._ctx is not None:
            on_event(
                WorkerLost(stage, self._ctx.task, tuple(candidates), type(exc).__name__, where)
            )
        self._forget(actor)
        if actor in self._actors:
            self._actors.remove(actor)
        if actor is self._evaluator:
            self._evaluator = None
        try:
            ray.kill(actor)
        except Exception:  # already gone
            log.debug("actor already gone")

    def search(self, on_event: EventCallback | None = None) -> list[CandidateResult]:
        if self._ctx is None:
            raise RuntimeError("begin_task() first")
        todo = self.chunk_plan(self._ctx.config.search.population)
        tries = {c[0]: 0 for c in todo}
        finished: set[int] = set()
        idle = list(self._actors)
        running: dict[Any, tuple[Any, list[int]]] = {}
        results: list[CandidateResult] = []
        while todo or running:
            while todo and idle:
                actor, chunk = idle.pop(0), todo.pop(0)
                running[actor.search.remote(chunk)] = (actor, chunk)
            ready, _ = ray.wait(list(running), num_returns=1)
            stream = ready[0]
            actor, chunk = running[stream]
            try:
                event = ray.get(next(stream))
            except StopIteration:
                del running[stream]
                idle.append(actor)
                continue
            except _ACTOR_LOST as exc:
                del running[stream]
                tries[chunk[0]] += 1
                if tries[chunk[0]] > self.cfg.max_retries:
                    raise RuntimeError(
                        f"candidates {chunk}: actor died {tries[chunk[0]]} times; giving up"
                    ) from exc
                self._lose(actor, "search", chunk, exc, on_event)
                idle.append(self._new_spare())
                if chunk[0] not in finished:  # else its results are in; TRAIN re-runs if needed
                    todo.insert(0, chunk)
                continue
            if on_event is not None:
                on_event(event)
            if isinstance(event, StageDone):
                finished.add(chunk[0])
                for r in event.result:
                    self._holder[r.index] = actor
                    self._chunk_of[r.index] = chunk
                    self.placements[r.index] = event.worker.get("node_id") or ""
                results.extend(event.result)
        return sorted(results, key=lambda r: r.index)

    def _forget(self, actor: Any) -> None:
        """Drop the candidates a dead actor held (they are re-trained if one is needed)."""
        for held in [c for c, a in self._holder.items() if a is actor]:
            del self._holder[held]

    def _rerun_chunk(self, candidate: int) -> Any:
        """Re-train the chunk holding ``candidate`` on a fresh actor; same seeds, same result
        (its events are not passed on again: the driver already has them)."""
        chunk = self._chunk_of[candidate]
        actor = self._new_spare()
        _stream_result(actor.search.remote(chunk), None)
        for c in chunk:
            self._holder[c] = actor
        return actor

    def _new_spare(self) -> Any:
        actor = self._new_actor()
        ray.get(actor.begin_task.remote(self._ctx, self._data_ref))
        self._actors.append(actor)
        return actor

    def train(self, winner: int, on_event: EventCallback | None = None) -> TrainOutcome:
        if winner not in self._chunk_of:
            raise RuntimeError(f"candidate {winner} was never searched")
        for attempt in range(self.cfg.max_retries + 1):
            actor = self._holder.get(winner) or self._rerun_chunk(winner)
            try:
                outcome = _stream_result(actor.train.remote(winner), on_event)
                break
            except _ACTOR_LOST as exc:
                self._lose(actor, "train", [winner], exc, on_event)
                if attempt == self.cfg.max_retries:
                    raise
        self._winner_actor, self._winner = actor, winner
        return outcome

    def quantize(self, on_event: EventCallback | None = None) -> QuantizedTask:
        if self._winner_actor is None or self._winner is None or self._ctx is None:
            raise RuntimeError("train() first")
        test = None if self._stream_ref is not None else self._test_ref(self._ctx.task)
        for attempt in range(self.cfg.max_retries + 1):
            try:
                stream = self._winner_actor.quantize.remote(self._winner, test)
                return _stream_result(stream, on_event)
            except _ACTOR_LOST as exc:
                self._lose(self._winner_actor, "quantize", [self._winner], exc, on_event)
                if attempt == self.cfg.max_retries:
                    raise
                self.train(self._winner, on_event)
        raise AssertionError("unreachable")

    def evaluate(
        self, store: PackedStore, request: EvalRequest, on_event: EventCallback | None = None
    ) -> Evaluation:
        """EVALUATE on the evaluation actor, from the packed model file (the compact form the
        driver just saved, checked again on load); streams without a worker copy have each
        task's test split put in the object store once."""
        with tempfile.TemporaryDirectory(prefix="qpacknet-eval-") as tmp:
            path = Path(tmp) / "model.qpk"
            save_store(store, path)
            model_ref = ray.put(path.read_bytes())
        tests = vals = None
        if self._stream_ref is None:
            if self._stream is None:
                raise RuntimeError("begin_run() first")
            needed = {j for _, j in request.pairs} | set(range(request.task + 1))
            for j in sorted(needed):
                self._test_ref(j)
            for j in range(request.task + 1):
                if j not in self._val_refs:
                    self._val_refs[j] = ray.put(pack_split(self._stream.val_split(j)))
            tests = {j: self._test_refs[j] for j in needed}
            vals = {j: self._val_refs[j] for j in range(request.task + 1)}
        for attempt in range(self.cfg.max_retries + 1):
            actor = self._evaluation_actor()
            try:
                return _stream_result(
                    actor.evaluate.remote(model_ref, request, tests, vals), on_event
                )
            except _ACTOR_LOST as exc:
                self._lose(actor, "evaluate", [], exc, on_event)
                if attempt == self.cfg.max_retries:
                    raise
        raise AssertionError("unreachable")

    def _test_ref(self, task: int) -> Any:
        """Task ``task``'s test split in the object store, put there once per run (QUANTIZE
        and EVALUATE share it) for streams without a worker copy."""
        if task not in self._test_refs:
            if self._stream is None:
                raise RuntimeError("begin_run() first")
            self._test_refs[task] = ray.put(pack_split(self._stream.test_split(task)))
        return self._test_refs[task]

    def _evaluation_actor(self) -> Any:
        """The run's evaluation actor; after it died, the first live actor of the pool takes
        over (a new one only when none is left: the pool already holds what the cluster
        fits). The driver records which worker evaluated each task."""
        if self._evaluator is None:
            if not self._actors:
                self._actors.append(self._new_actor())
            self._evaluator = self._actors[0]
            self._where(self._evaluator)
        return self._evaluator

    def end_task(self) -> None:
        ray.get([a.end_task.remote() for a in self._actors])
        self._data_ref, self._holder, self._winner_actor = None, {}, None

    def close(self) -> None:
        for a in self._actors:
            try:
                ray.kill(a)
            except Exception:
                log.debug("actor already gone")
        self._actors, self._evaluator = [], None
        self._stream_ref, self._data_ref, self._test_refs, self._val_refs = None, None, {}, {}
        if self._started:
            self._started = False
            ray.shutdown()


def _stream_result(stream: Any, on_event: Callable[[Any], None] | None) -> Any:
    """Drain one actor stage's streaming generator, passing each event on as it arrives
    (:func:`~qpacknet.events.drive` over the fetched events); the stage's result."""
    return drive((ray.get(ref) for ref in stream), on_event)
