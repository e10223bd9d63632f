"""The unit of work an executor runs: a chunk of candidates, trained as one population.

What each stage computes is :mod:`qpacknet.method` (the method in one file); this module is
where it runs: one process's state between the stages, the devices, and the events.

A :class:`CandidateWorker` is pure torch (no Ray, no MLflow) so the in-process executor and
the Ray actors run the same code. It keeps the trained population, so the winner's worker
continues with TRAIN and QUANTIZE on the state it already holds; losers' weights are never
shipped anywhere. Each stage is a generator of :mod:`~qpacknet.events` (an event per epoch as
it ends, then the stage's result), which the executor drives in-process or streams from a
Ray actor to the driver.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from qpacknet.capacity_policy import chance_accuracy
from qpacknet.config import RunConfig
from qpacknet.errors import IllegalTransition
from qpacknet.events import EpochEnded, Event, StageDone, StepDone
from qpacknet.method import (
    QuantizedTask,
    draw_candidates,
    quantize_winner,
    score_candidates,
    train_short,
    train_winner,
)
from qpacknet.nets import PopulationNet, build
from qpacknet.scenarios.base import Split
from qpacknet.train import EpochReport, evaluate


@dataclass(frozen=True)
class TaskContext:
    """Everything about a task a worker needs besides its data (picklable). ``claimed`` is
    the store's :meth:`~PackedStore.claimed` (the weights the newest network's committed
    tasks own; None for each network's first task): Υ (eqs. 6-7) counts a candidate's
    weights together with it. With weight sharing, ``frozen`` is
    :meth:`~PackedStore.first_values` (None otherwise)."""

    config: RunConfig
    task: int
    input_shape: tuple[int, ...]
    num_classes: int
    available: dict[str, torch.Tensor]
    claimed: dict[str, torch.Tensor] | None = None
    frozen: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class TrainOutcome:
    """TRAIN's result: the best validation accuracy (Algorithm 3's Q) and, for the quality
    gate, chance on the same split (:func:`~qpacknet.capacity_policy.chance_accuracy`)."""

    candidate: int
    float_acc: float
    epochs: int
    seconds: float
    chance_acc: float = 0.0


class CandidateWorker:
    """Trains one chunk of candidates of one task; continues the winner if it holds it.

    ``where`` describes this process (:func:`qpacknet.devices.describe`); every event it emits
    carries it, so the driver records which worker and device trained what."""

    def __init__(
        self,
        ctx: TaskContext,
        train: Split,
        val: Split,
        device: str = "cpu",
        where: dict[str, Any] | None = None,
    ) -> None:
        self.ctx = ctx
        self.cfg = ctx.config
        self.device = torch.device(device)
        self.where = dict(where or {"device": str(self.device)})
        self.train_split = train.to(self.device)
        self.val_split = val.to(self.device)
        self.candidates: list[int] = []
        self.population: PopulationNet | None = None
        self.single: PopulationNet | None = None
        self.single_candidate: int | None = None
        self.float_acc: float | None = None

    def _new_net(self, k: int) -> PopulationNet:
        return build(self.cfg.net, self.ctx.input_shape, self.ctx.num_classes, k).to(self.device)

    def _epochs(
        self, reports: Generator[EpochReport, None, list[float]], candidates: list[int]
    ) -> Generator[Event, None, list[float]]:
        """Wrap each epoch report as an :class:`EpochEnded` the moment it exists."""
        while True:
            try:
                report = next(reports)
            except StopIteration as stop:
                return stop.value
            yield EpochEnded(self.ctx.task, tuple(candidates), report, time.time(), self.where)

    def _done(self, stage: str, candidates: list[int], result: Any, started: float) -> StageDone:
        return StageDone(
            stage, self.ctx.task, tuple(candidates), result, started, time.time(), self.where
        )

    def search(self, candidates: list[int]) -> Iterator[Event]:
        """Algorithm 1 for this chunk: draw masks, Xavier-init, train E_short epochs together;
        ends with a ``StageDone("search")`` holding the chunk's ``list[CandidateResult]``."""
        if self.population is not None:
            raise IllegalTransition("this worker already searched its chunk")
        started = time.time()
        ctx, net = self.ctx, self._new_net(len(candidates))
        masks = draw_candidates(
            net, ctx.available, self.cfg, ctx.task, candidates, ctx.claimed, ctx.frozen
        )
        accs = yield from self._epochs(
            train_short(net, self.train_split, self.val_split, self.cfg, ctx.task), candidates
        )
        self.population = net
        self.candidates = list(candidates)
        results = score_candidates(net, candidates, accs, masks, ctx.claimed)
        yield self._done("search", candidates, results, started)

    def holds(self, candidate: int) -> bool:
        return candidate in self.candidates

    def train(self, candidate: int) -> Iterator[Event]:
        """Stage 2: continue the winner from its short-trained state for E_full epochs with
        the cosine schedule, keeping the best validation epoch's weights; ends with a
        ``StageDone("train")`` holding the :class:`TrainOutcome`."""
        if self.population is None or candidate not in self.candidates:
            raise IllegalTransition(f"candidate {candidate} was not searched by this worker")
        started, start = time.time(), time.perf_counter()
        slot = self.candidates.index(candidate)
        weights, masks, state = self.population.candidate(slot)
        single = self._new_net(1)
        single.load_candidate(0, weights, masks, state)
        self._copy_sharing(self.population, slot, single)
        if hasattr(single, "key_dropout"):
            single.key_dropout(self.cfg.seed, self.ctx.task, [candidate])
        acc = yield from self._epochs(
            train_winner(single, self.train_split, self.val_split, self.cfg, self.ctx.task),
            [candidate],
        )
        self.single, self.single_candidate, self.float_acc = single, candidate, acc[0]
        outcome = TrainOutcome(
            candidate,
            acc[0],
            self.cfg.train.epochs,
            time.perf_counter() - start,
            chance_accuracy(self.val_split.y),
        )
        yield self._done("train", [candidate], outcome, started)

    def quantize(self, test: Split) -> Iterator[Event]:
        """Stage 3 (Algorithms 2-3): the smallest bit-width that ``quantize.criterion`` accepts
        against the float network's validation figures; ends with a ``StageDone("quantize")``
        holding the :class:`QuantizedTask` and the digest of its parts, computed here so that
        the driver can check COMMIT bit for bit. ``test`` (the task's test split) only yields
        the float network's test accuracy for the report; no choice looks at it."""
        if self.single is None or self.float_acc is None or self.single_candidate is None:
            raise IllegalTransition("quantize() needs a trained winner: call train() first")
        started = time.time()
        probe = self._new_net(1)
        self._copy_sharing(self.single, 0, probe)
        batch = self.cfg.train.eval_batch_size
        float_test_acc = evaluate(self.single, test.to(self.device), batch)[0]
        q = self.cfg.quantize
        tuned = ", fine-tuned" if q.finetune_epochs else ""
        tuned += " with the head" if q.finetune_epochs and q.finetune_head else ""
        steps = quantize_winner(
            self.single,
            probe,
            self.val_split,
            self.cfg,
            self.single_candidate,
            self.float_acc,
            train=self.train_split,
            task=self.ctx.task,
        )
        while True:
            try:
                bits, fig, seen = next(steps)
            except StopIteration as stop:
                result: QuantizedTask = stop.value
                break
            yield StepDone(
                "quantize",
                self.ctx.task,
                f"codebooks at {bits} bits{tuned} ({seen}), val acc",
                perturbed(fig.acc),
                time.time(),
                self.where,
            )
        result = dataclasses.replace(result, float_test_acc=float_test_acc)
        yield self._done("quantize", [self.single_candidate], _test_hooks(result), started)

    @staticmethod
    def _copy_sharing(source: PopulationNet, slot: int, target: PopulationNet) -> None:
        """Give ``target`` (K=1) the shared weights of ``source``'s slot, if it shares any."""
        shared, frozen = source.shared_mask(slot), source.frozen_values()
        if shared is not None and frozen is not None:
            target.set_sharing(frozen, [shared])


FLIP_CODE_BIT_ENV = "QPACKNET_TEST_FLIP_CODE_BIT"
ULP_ENV = "QPACKNET_TEST_EVAL_ULP"


def _hook(env: str) -> bool:
    """A test hook is on while the marker file named by ``$env`` exists (Ray's marker-file
    pattern: tests switch hooks inside actors that started long before)."""
    marker = os.environ.get(env)
    return bool(marker) and os.path.exists(marker)


def perturbed(acc: float) -> float:
    """Test hook: with ``$QPACKNET_TEST_EVAL_ULP`` on, ``acc`` one ulp higher, as another
    device's kernels may give it; nothing may compare such floats across processes."""
    return math.nextafter(acc, math.inf) if _hook(ULP_ENV) else acc


def _test_hooks(result: QuantizedTask) -> QuantizedTask:
    """Fault injection for tests. ``$QPACKNET_TEST_EVAL_ULP``: the reported accuracies move
    by one ulp (must still commit). ``$QPACKNET_TEST_FLIP_CODE_BIT``: the lowest bit of the
    first code of the first layer flips *after* the digest was taken, as a corrupted transfer
    or a packing bug would (the driver's COMMIT check must refuse it)."""
    result = dataclasses.replace(
        result, float_acc=perturbed(result.float_acc), quant_acc=perturbed(result.quant_acc)
    )
    if not _hook(FLIP_CODE_BIT_ENV):
        return result
    name = sorted(result.codes)[0]
    codes = dict(result.codes)
    flipped = codes[name].clone()
    flipped.view(-1)[0] ^= 1
    codes[name] = flipped
    return dataclasses.replace(result, codes=codes)
