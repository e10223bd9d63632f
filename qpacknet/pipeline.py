"""The per-task pipeline SEARCH → TRAIN → QUANTIZE → COMMIT over an executor (DESIGN.md §2).

The pipeline owns the packed store and the metrics; the executor owns the candidates. Each
stage's output is checked before the next stage starts, and after COMMIT the accuracy
matrix row is re-evaluated from the packed words, never copied.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from qpacknet import __version__, capacity_policy, preparation, recognise
from qpacknet.checkpoint import check_same_config, load_checkpoint, save_checkpoint, truncate
from qpacknet.config import RunConfig
from qpacknet.devices import cpu_model, resolve_device
from qpacknet.errors import (
    DataError,
    ForgettingDetected,
    ModelFileError,
    NetworkFull,
    TaskNotLearned,
    UsageError,
)
from qpacknet.evaluation import EvalRequest
from qpacknet.events import (
    EpochEnded,
    Event,
    EventCallback,
    StageDone,
    StepDone,
    WorkerLost,
    worker_key,
)
from qpacknet.executor import Executor
from qpacknet.fileio import atomic_write_json, atomic_write_text
from qpacknet.layout import CONFIG_FILE, MODEL_FILE, RESULTS_FILE
from qpacknet.method import REVISION, QuantizedTask, choose_winner, commit
from qpacknet.metrics import AccuracyMatrix, InferenceFigures, TaskInference
from qpacknet.model import PackedModel
from qpacknet.nets import build
from qpacknet.observers import RunObserver, RunStarted, TaskCommitted
from qpacknet.progress import Progress
from qpacknet.quantize import describe_widths
from qpacknet.scenarios.base import TaskStream
from qpacknet.search import CandidateResult
from qpacknet.stages import Stage, TaskStages
from qpacknet.store import PackedStore, capacity, load_store, save_store
from qpacknet.store.capacity import CapacityReport
from qpacknet.worker import TaskContext

__all__ = ["CONFIG_FILE", "MODEL_FILE", "RESULTS_FILE", "Pipeline", "hardware", "resolve_device"]


def hardware(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "qpacknet": __version__,
    }
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(0)
    return info


LARGE_STATS_BYTES = 1_000_000  # per task; above, COMMIT says what the statistics cost


def _quantize_summary(q: QuantizedTask) -> str:
    """QUANTIZE's progress line: the width, the validation figures it was judged on, and the
    drop when no width met the criterion (Algorithm 3 then falls back to ``b_max``)."""
    text = f"{describe_widths(q.widths)} bits, val acc {q.float_acc:.2f} -> {q.quant_acc:.2f}"
    if q.finetune_epochs:
        head = " with the head" if q.finetune_head else ""
        text += f" (codebooks fine-tuned {q.finetune_epochs} epoch(s){head})"
    if q.criterion == "loss":
        text += f", val loss {q.float_loss:.4f} -> {q.quant_loss:.4f}"
    elif q.criterion == "agreement":
        text += f", agreement {q.agreement:.2f}%"
    if not q.within_delta:
        text += (
            f" (no width met the {q.criterion} criterion: acc drop {q.float_acc - q.quant_acc:.2f})"
        )
    return text


def _bits_tried(q: QuantizedTask) -> list[dict[str, Any]]:
    """Every assignment QUANTIZE judged; a per-layer one (``quantize.per_layer``) also lists
    its ``widths``."""
    rows: list[dict[str, Any]] = []
    widths = q.tried_widths or [{} for _ in q.tried]
    for (b, a, loss, agree, drop), w in zip(q.tried, widths, strict=True):
        row: dict[str, Any] = {
            "bits": b,
            "acc": a,
            "loss": loss,
            "agreement": agree,
            "allowed_drop": drop,
        }
        if len(set(w.values())) > 1:
            row["widths"] = dict(w)
        rows.append(row)
    return rows


@dataclass
class _Timer:
    """Wall time per stage plus the candidate-training time the workers' epochs report
    (summed over workers: with parallel actors it exceeds the wall time)."""

    seconds: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    candidate_epochs: int = 0


@dataclass
class _TaskLog:
    """What one task's worker events said: who ran each stage, every SEARCH and TRAIN epoch,
    and when each SEARCH chunk ran. Kept in the task's report, so that ``qpacknet sync`` can
    write the same MLflow record later as the live tracker writes now."""

    stages: dict[str, Any] = field(default_factory=dict)
    candidates: dict[int, str] = field(default_factory=dict)
    train_epochs: list[dict[str, Any]] = field(default_factory=list)
    capacity: dict[str, Any] = field(default_factory=dict)
    search_epochs: dict[int, dict[int, list[float]]] = field(default_factory=dict)
    search_chunks: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)


def _epoch_rows(epochs: dict[int, list[float]]) -> list[list[float]]:
    """``[epoch, loss, val_acc, lr, ended_at]`` per SEARCH epoch, in epoch order."""
    return [[e, *v] for e, v in sorted(epochs.items())]


class Pipeline:
    """Learns a task stream into a packed store; writes the model and results to ``out_dir``."""

    def __init__(
        self,
        config: RunConfig,
        stream: TaskStream,
        executor: Executor,
        out_dir: str | Path,
        progress: Progress | None = None,
        preset: str | None = None,
        observers: list[RunObserver] | None = None,
    ) -> None:
        self.config = config
        self.stream = stream
        self.executor = executor
        self.out_dir = Path(out_dir)
        self.progress = progress or Progress()
        self.preset = preset
        self.observers = list(observers or [])
        self.device = executor.driver_device(config)
        probe = build(config.net, stream.input_shape, stream.num_classes, 1)
        self.store = PackedStore(
            probe.layer_specs, b_max=config.quantize.b_max, meta=probe.describe()
        )
        self.workers: dict[str, dict[str, Any]] = {}
        self._evaluator: str | None = None
        self.latencies: list[float] = []
        self._log = _TaskLog()
        self._begun = False
        self._forced_share = False
        self._said_stats_size = False
        self.matrix = AccuracyMatrix()
        self.val_matrix = AccuracyMatrix()
        self._last_val_row: list[float] | None = None
        self.inference = TaskInference(config.inference.recogniser)
        self.inference_figures: InferenceFigures | None = None
        self.task_reports: list[dict[str, Any]] = []
        self._learned_from: dict[str, Any] | None = None
        self.totals = _Timer()
        self._seconds_before = 0.0
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def model_path(self) -> Path:
        return self.out_dir / MODEL_FILE

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        atomic_write_text(
            self.out_dir / CONFIG_FILE, yaml.safe_dump(self.config.model_dump(), sort_keys=False)
        )
        num_tasks = min(self.config.scenario.num_tasks, self.stream.num_tasks)
        self.progress.run_start(self.stream.name, num_tasks, self.executor.name, self.device)
        try:
            first = self._resume()
            if first:
                self.progress.line(
                    f"resuming after task {first}: tasks 1..{first} are committed in "
                    f"{self.model_path}"
                )
            self._begin_run()
            started = RunStarted(
                self.config,
                self.stream.name,
                self.preset,
                self.executor.name,
                self.device,
                first,
                num_tasks,
                self.out_dir,
            )
            for obs in self.observers:
                obs.run_started(started)
            for t in range(first, num_tasks):
                self.learn_task(t)
                self._checkpoint(time.perf_counter() - start)
                self._notify(t, num_tasks)
            if self.inference_figures is None and self.store.num_tasks:
                last = self.store.num_tasks - 1
                timer = _Timer()
                self.inference_figures = self._evaluate(
                    last, add_row=False, on_event=lambda e: self._on_event(last, timer, e)
                )
        except BaseException as exc:
            for obs in self.observers:
                obs.run_failed(exc)
            raise
        finally:
            self.executor.close()
        results = self._results(time.perf_counter() - start + self._seconds_before)
        atomic_write_json(self.out_dir / RESULTS_FILE, results)
        for obs in self.observers:
            obs.run_finished(results)
        return results

    def _notify(self, t: int, num_tasks: int) -> None:
        event = TaskCommitted(
            task=t,
            num_tasks=num_tasks,
            row=list(self.matrix.rows[t]),
            acc=self.matrix.acc,
            val_acc=self.val_matrix.acc,
            bwt=self.matrix.bwt,
            capacity_pct=capacity(self.store).capacity_pct,
            report=self.task_reports[t],
            out_dir=self.out_dir,
        )
        for obs in self.observers:
            obs.task_committed(event)

    def _resume(self) -> int:
        """Load the committed tasks of an interrupted run in ``out_dir``; the next task index."""
        state = load_checkpoint(self.out_dir)
        if state is None:
            return 0
        check_same_config(state, self.config.model_dump(mode="json"), self.out_dir)
        if state.get("method_revision", 1) != REVISION:
            self.progress.line(
                f"WARNING: {self.out_dir} was started by an earlier qpacknet (method revision "
                f"{state.get('method_revision', 1)}, now {REVISION}: Υ counted only the "
                "candidate's own weights); its tasks stay as committed, later tasks use eqs. 6-7 "
                "over every task's weights, so this run will differ from an uninterrupted one"
            )
        if len(state["tasks"]) > self.config.scenario.num_tasks:
            raise UsageError(
                f"{self.out_dir} already holds {len(state['tasks'])} tasks, more than "
                f"scenario.num_tasks={self.config.scenario.num_tasks}; use a new --out"
            )
        if not self.model_path.exists():
            raise ModelFileError(
                f"{self.out_dir} has a checkpoint but no {MODEL_FILE}; use a new --out"
            )
        loaded = load_store(self.model_path)
        self._check_same_backbone(loaded.meta)
        self.store = truncate(loaded, len(state["tasks"]))
        self.matrix.rows = [list(r) for r in state["matrix"]]
        # checkpoints from before validation rows were kept have none for their tasks
        saved_val = state.get("val_matrix") or []
        self.val_matrix.rows = [list(r) for r in saved_val] + [
            [None] * (i + 1) for i in range(len(saved_val), len(self.matrix.rows))
        ]
        self.task_reports = list(state["tasks"])
        self._learned_from = state.get("learned_from")
        self.workers = dict(state.get("workers", {}))
        t = state["totals"]
        self.totals = _Timer(
            dict(t["seconds"]), t["train_seconds"], t["eval_seconds"], t["candidate_epochs"]
        )
        self._seconds_before = float(state["seconds"])
        return len(self.task_reports)

    def _check_same_backbone(self, saved: dict[str, Any]) -> None:
        """Refuse, before any training, a stream whose shape no longer fits the saved model
        (e.g. a new task folder or .npz file with more classes than the heads)."""
        current = self.store.meta
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if not changed:
            return
        diffs = ", ".join(f"{k}: model {saved.get(k)!r}, now {current.get(k)!r}" for k in changed)
        raise DataError(
            f"the model in {self.model_path} does not fit this task stream ({diffs}); every "
            "task must keep the input shape and at most the class count of the first tasks "
            "(split a task with more classes, or learn the stream into a new --out)"
        )

    def _checkpoint(self, seconds: float) -> None:
        tot = self.totals
        save_checkpoint(
            self.out_dir,
            {
                "config": self.config.model_dump(mode="json"),
                "method_revision": REVISION,
                "scenario": self.stream.name,
                "preset": self.preset,
                "executor": self.executor.name,
                "learned_from": self._learned_from,
                "matrix": self.matrix.rows,
                "val_matrix": self.val_matrix.rows,
                "tasks": self.task_reports,
                "workers": self.workers,
                "seconds": self._seconds_before + seconds,
                "totals": {
                    "seconds": tot.seconds,
                    "train_seconds": tot.train_seconds,
                    "eval_seconds": tot.eval_seconds,
                    "candidate_epochs": tot.candidate_epochs,
                },
            },
        )

    def _begin_run(self) -> None:
        """Hand the stream to the executor once (also when tasks are learnt one by one)."""
        if not self._begun:
            self.executor.begin_run(self.stream, self.config)
            self._begun = True
            self.progress.workers(self.executor.worker_info())

    def _on_event(self, t: int, timer: _Timer, event: Event) -> None:
        """Every worker event, the moment it reaches the driver: progress, the task's log
        and the observers (MLflow). The only place where worker events are consumed."""
        where = event.worker
        key = worker_key(where)
        if isinstance(event, WorkerLost):
            self.progress.worker_lost(t, event, key)
            if event.stage in ("train", "quantize"):
                self._log.train_epochs.clear()  # the re-run reports them again
            for obs in self.observers:
                obs.worker_event(event)
            return
        self.workers.setdefault(key, dict(where))
        if isinstance(event, EpochEnded):
            rep = event.report
            timer.train_seconds += rep.train_seconds
            timer.eval_seconds += rep.eval_seconds
            timer.candidate_epochs += len(event.candidates)
            self.progress.epoch(t, list(event.candidates), rep)
            self.latencies.append(max(0.0, time.time() - event.ended_at))
            if rep.stage == "train":
                self._log.train_epochs.append(
                    {
                        "epoch": rep.epoch,
                        "loss": rep.loss[0],
                        "val_acc": rep.val_acc[0],
                        "lr": rep.lr,
                        "ended_at": event.ended_at,
                    }
                )
            elif rep.stage == "search":  # keyed by epoch: a re-run chunk overwrites its epochs
                for i, c in enumerate(event.candidates):
                    self._log.search_epochs.setdefault(c, {})[rep.epoch] = [
                        rep.loss[i],
                        rep.val_acc[i],
                        rep.lr,
                        event.ended_at,
                    ]
        elif isinstance(event, StepDone):
            self.progress.step(t, event.stage, event.what, event.value)
        elif isinstance(event, StageDone):
            if event.stage == "search":
                self._log.stages.setdefault("search", []).append(key)
                for c in event.candidates:
                    self._log.candidates[c] = key
                self._log.search_chunks.append(
                    {
                        "candidates": list(event.candidates),
                        "started_at": event.started_at,
                        "ended_at": event.ended_at,
                        "worker": key,
                    }
                )
            else:
                self._log.stages[event.stage] = key
            if event.stage == "evaluate":
                self._evaluator = key
        for obs in self.observers:
            obs.worker_event(event)

    def learn_task(self, t: int) -> None:
        """Run task ``t`` through all stages and add its accuracy-matrix row."""
        cfg = self.config
        stages = TaskStages(t)
        timer = _Timer()
        self._log = _TaskLog()
        self.progress.task_start(t)

        def on_event(event: Event) -> None:
            self._on_event(t, timer, event)

        self._begin_run()
        rooms = self._plan_capacity(t)
        for obs in self.observers:
            obs.task_started(t)
        t0 = time.perf_counter()
        ctx = TaskContext(
            cfg,
            t,
            self.stream.input_shape,
            self.stream.num_classes,
            self.store.available(),
            *self._sharing(),
        )
        self.executor.begin_task(ctx, self.stream)
        timer.seconds["data"] = time.perf_counter() - t0

        stages.advance(Stage.SEARCH)
        t0 = time.perf_counter()
        results = sorted(self.executor.search(on_event), key=lambda r: r.index)
        self._check_search(results)
        winner, sc = choose_winner(results, cfg)
        for r, s in zip(results, sc, strict=True):
            self.progress.candidate(t, r, s, r.index == winner)
        timer.seconds["search"] = time.perf_counter() - t0
        self.progress.stage(
            t, "SEARCH", timer.seconds["search"], f"winner {winner} of {len(results)}"
        )

        stages.advance(Stage.TRAIN)
        t0 = time.perf_counter()
        outcome = self.executor.train(winner, on_event)
        if outcome.candidate != winner or not math.isfinite(outcome.float_acc):
            raise RuntimeError(f"TRAIN returned {outcome!r} for winner {winner}")
        timer.seconds["train"] = time.perf_counter() - t0
        self.progress.stage(
            t, "TRAIN", timer.seconds["train"], f"best val acc {outcome.float_acc:.2f}"
        )
        capped = any(r.capped for r in rooms)
        chance = outcome.chance_acc
        self._quality_gate(t, "validation accuracy after TRAIN", outcome.float_acc, chance, capped)

        stages.advance(Stage.QUANTIZE)
        t0 = time.perf_counter()
        q = self.executor.quantize(on_event)
        self._check_quantized(q, winner)
        timer.seconds["quantize"] = time.perf_counter() - t0
        self.progress.stage(t, "QUANTIZE", timer.seconds["quantize"], _quantize_summary(q))
        self._quality_gate(
            t, "the quantised network's validation accuracy", q.quant_acc, chance, capped
        )

        stages.advance(Stage.COMMIT)
        t0 = time.perf_counter()
        self._commit(t, q)
        self.executor.end_task()
        timer.seconds["commit"] = time.perf_counter() - t0

        stages.advance(Stage.EVALUATE)
        t0 = time.perf_counter()
        inference = self._evaluate(t, add_row=True, on_event=on_event)
        self._check_promise(t)
        timer.seconds["evaluate"] = time.perf_counter() - t0
        stages.advance(Stage.DONE)
        cap = capacity(self.store)
        self.progress.task_done(t, self.matrix.rows[t], cap.capacity_pct)
        self.progress.task_inference(t, inference)
        self.inference_figures = inference
        self._record(t, results, sc, winner, q, timer, cap, inference)

    def _plan_capacity(self, t: int) -> list[capacity_policy.LayerRoom]:
        """Before SEARCH: each layer's room against Algorithm 1's draw, and
        ``capacity.when_full`` when some layer cannot give the task its minimum density
        (grow: a new network; share: read earlier tasks' frozen weights; stop: exit 2)."""
        cfg, store = self.config, self.store
        self._forced_share = False
        rooms = capacity_policy.room(store.layers, store.available(), cfg)
        log: dict[str, Any] = {"available": {r.name: r.pct / 100 for r in rooms}}
        self._log.capacity = log
        if any(r.capped for r in rooms):
            self.progress.line(f"task {t + 1}: {capacity_policy.describe(rooms, cfg)}")
        if not any(r.starving for r in rooms):
            return rooms
        network = store.num_networks - 1
        policy = cfg.capacity.when_full
        log["when_full"] = policy
        if policy == "stop":
            raise NetworkFull(capacity_policy.full_message(t, network, rooms, self.model_path))
        starving = ", ".join(r.name for r in rooms if r.starving)
        if policy == "grow":
            store.grow()
            self.progress.line(
                f"task {t + 1}: network {network} is full ({starving} below the minimum "
                f"density); opened network {store.num_networks - 1} for this and later tasks "
                "(capacity.when_full=grow)"
            )
            rooms = capacity_policy.room(store.layers, store.available(), cfg)
            log["available"] = {r.name: r.pct / 100 for r in rooms}
            return rooms
        self._forced_share = True
        self.progress.line(
            f"task {t + 1}: network {network} is full ({starving} below the minimum density); "
            "the task also reads earlier tasks' frozen weights (capacity.when_full=share)"
        )
        return rooms

    def _quality_gate(self, t: int, what: str, acc: float, chance: float, capped: bool) -> None:
        """A task whose validation accuracy (after TRAIN, and again after QUANTIZE) is within
        ``capacity.chance_margin`` of chance is not committed silently: the run stops
        (``quality_gate: stop``) or warns and marks it (``warn``)."""
        self._log.capacity["chance_acc"] = chance
        if not capacity_policy.gate_failed(acc, chance, self.config):
            self._log.capacity.setdefault("quality_gate", "passed")
            return
        self._log.capacity["quality_gate"] = "failed"
        message = capacity_policy.gate_message(t, what, acc, chance, self.config, capped)
        if self.config.capacity.quality_gate == "stop":
            raise TaskNotLearned(
                f"{message}. The task was not committed; {self.model_path} holds tasks "
                f"1..{t}. To commit such tasks anyway, marked in results.json and MLflow, set "
                "capacity.quality_gate=warn"
            )
        self.progress.line(
            f"WARNING: {message}. Committing it anyway, marked in results.json and MLflow "
            "(capacity.quality_gate=warn)"
        )

    def _commit(self, t: int, q: QuantizedTask) -> None:
        """COMMIT (:func:`qpacknet.method.commit`, checked bit for bit), then the model file:
        written only after both digest checks passed."""
        if q.shared is not None and not (self.config.sharing.enabled or self._forced_share):
            raise RuntimeError(f"task {t + 1}: QUANTIZE returned shared weights with sharing off")
        commit(self.store, q, f"task {t + 1}", str(self.model_path))
        preparation.record(self.store, self.stream, t)
        self._recognition_stats(t)
        save_store(self.store, self.model_path)

    def _check_promise(self, t: int) -> None:
        """Committed tasks are frozen (DESIGN.md §2 COMMIT), so R[t][j] must equal R[j][j]
        bit for bit (BWT exactly 0); a change stops the run. Entries measured by another
        evaluation worker (one died since) may differ by device rounding: said, not fatal."""
        row, now = self.matrix.rows[t], self._log.stages.get("evaluate")
        for j in range(t):
            then = self.matrix.rows[j][j]
            if row[j] == then:
                continue
            before = self.task_reports[j].get("ran_on", {}).get("evaluate")
            if before is not None and before != now:
                self.progress.line(
                    f"task {t + 1}: test accuracy of task {j + 1} is {row[j]:.4f} now, "
                    f"{then:.4f} at its commit; measured by another worker ({now} vs "
                    f"{before}), so BWT is not exactly 0 for that reason alone"
                )
                continue
            raise ForgettingDetected(
                f"after task {t + 1}, task {j + 1}'s test accuracy is {row[j]!r}, but it was "
                f"{then!r} when task {j + 1} was committed: an earlier task changed, which the "
                "packed store must make impossible. The run stops; please report this with "
                f"{self.model_path} and checkpoint.json"
            )

    def _evaluate(
        self, t: int, add_row: bool, on_event: EventCallback | None = None
    ) -> InferenceFigures:
        """EVALUATE on the executor's evaluation worker: R[t] re-evaluated from the packed
        model (``add_row``) and the task-inference pairs not yet known."""
        request = EvalRequest(t, tuple(self.inference.missing(t + 1)))
        ev = self.executor.evaluate(self.store, request, on_event)
        if ev.task != t or len(ev.row) != t + 1 or set(ev.pairs) != set(request.pairs):
            raise RuntimeError(f"EVALUATE returned a result for another request (task {t + 1})")
        if len(ev.val_row) != t + 1:
            raise RuntimeError(f"EVALUATE returned {len(ev.val_row)} validation accuracies")
        if add_row:
            self.matrix.add_row(lambda j: ev.row[j])
            self.val_matrix.add_row(lambda j: ev.val_row[j])
        self._last_val_row = list(ev.val_row)
        self.inference.add(ev.pairs)
        return self.inference.figures(t + 1)

    def _sharing(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
        """The newest network's committed weights (Υ, eqs. 6-7, counts a candidate together
        with them; sharing draws from them) and, with sharing on or forced by
        ``capacity.when_full: share``, their first-component values; ``(None, None)`` for a
        network's first task."""
        claimed = self.store.claimed()
        if not any(bool(m.any()) for m in claimed.values()):
            return None, None
        share = self.config.sharing.enabled or self._forced_share
        return claimed, self.store.first_values() if share else None

    def _check_search(self, results: list[CandidateResult]) -> None:
        expected = list(range(self.config.search.population))
        if [r.index for r in results] != expected:
            raise RuntimeError(
                f"SEARCH returned candidates {[r.index for r in results]}, expected {expected}"
            )
        bad = [r.index for r in results if not math.isfinite(r.acc)]
        if bad:
            raise RuntimeError(f"SEARCH: candidates {bad} have a non-finite accuracy")

    def _check_quantized(self, q: QuantizedTask, winner: int) -> None:
        qc = self.config.quantize
        widths = q.widths.values()
        if (
            q.candidate != winner
            or not all(qc.psi_min <= w <= qc.b_max for w in widths)
            or q.bit_width != max(widths)
        ):
            raise RuntimeError(
                f"QUANTIZE returned candidate {q.candidate} at {describe_widths(q.widths)} "
                f"bits for winner {winner}"
            )

    def _record(
        self,
        t: int,
        results: list[CandidateResult],
        sc: list[float],
        winner: int,
        q: QuantizedTask,
        timer: _Timer,
        total: CapacityReport,
        inference: InferenceFigures,
    ) -> None:
        cap = total.per_task[t]
        for key in ("train_seconds", "eval_seconds", "candidate_epochs"):
            setattr(self.totals, key, getattr(self.totals, key) + getattr(timer, key))
        for k, v in timer.seconds.items():
            self.totals.seconds[k] = self.totals.seconds.get(k, 0.0) + v
        self.task_reports.append(
            {
                "task": t,
                "network": self.store.network_of(t),
                **self._log.capacity,
                "bit_width": q.bit_width,
                "bit_widths": q.widths,
                "density": self.store.density(t),
                "shared_pct": cap.shared_pct,
                "candidates": [
                    {
                        "index": r.index,
                        "acc": r.acc,
                        "sparsity": r.sparsity,
                        "score": s,
                        "shared": r.shared,
                        "worker": self._log.candidates.get(r.index),
                        "density": dict(r.density),
                        "epochs": _epoch_rows(self._log.search_epochs.get(r.index, {})),
                    }
                    for r, s in zip(results, sc, strict=True)
                ],
                "winner": winner,
                "float_acc": q.float_acc,
                "quant_acc": q.quant_acc,
                "float_loss": q.float_loss,
                "quant_loss": q.quant_loss,
                "agreement": q.agreement,
                "criterion": q.criterion,
                "within_delta": q.within_delta,
                "bits_tried": _bits_tried(q),
                "float_test_acc": q.float_test_acc,
                "quant_test_acc": self.matrix.rows[t][t],
                "capacity_pct": cap.pct,
                "task_inference_acc": inference.task_inference_acc,
                "class_incremental_acc": inference.class_incremental_acc,
                "seconds": dict(timer.seconds),
                "candidate_epochs": timer.candidate_epochs,
                "training_seconds": timer.train_seconds,
                "commit_digest": q.digest,
                "ran_on": dict(self._log.stages),
                "train_epochs": list(self._log.train_epochs),
                "search_chunks": list(self._log.search_chunks),
                "total_capacity_pct": total.capacity_pct,
                "started_at": self._log.started_at,
                "committed_at": time.time(),
            }
        )

    def _val_acc(self) -> float:
        """Mean validation accuracy of the final row, from the packed model: what tuning and
        any choice of settings may look at (test accuracy is reported, never used)."""
        row = self._last_val_row or (self.val_matrix.rows[-1] if self.val_matrix.rows else [])
        return sum(row) / len(row) if row else math.nan

    def _evaluators(self) -> dict[str, list[int]]:
        """Which worker evaluated which task's row (one entry unless an evaluation actor died
        or the run was resumed elsewhere: then rows come from several devices)."""
        out: dict[str, list[int]] = {}
        for rep in self.task_reports:
            key = rep.get("ran_on", {}).get("evaluate")
            if key:
                out.setdefault(key, []).append(rep["task"])
        return out

    def _inference_results(self) -> dict[str, Any]:
        """Task-inference and class-incremental accuracy after the last task (:meth:`run`
        evaluates the missing pairs when the run was resumed after its last task)."""
        figures = self.inference_figures
        if figures is None:
            raise RuntimeError("the run ended without task-inference figures")
        return {
            "task_inference_acc": figures.task_inference_acc,
            "class_incremental_acc": figures.class_incremental_acc,
            "task_inference_per_task": figures.per_task,
            "task_inference_recogniser": figures.recogniser,
            "task_inference": figures.by_recogniser,
        }

    def _recognition_stats(self, t: int) -> None:
        """At COMMIT: the task-recognition statistics (:mod:`qpacknet.recognise`) of task ``t``
        and of any earlier task that lacks them (a run begun before they were kept), from
        each task's training split as the driver builds it and its committed sub-network
        decoded from the words. Summaries only, no raw data (replay-free)."""
        kinds = tuple(self.config.inference.statistics)
        if not kinds:
            return
        model = PackedModel(self.store, self.device, self.config.train.eval_batch_size)
        for task in range(t + 1):
            if set(kinds) <= recognise.kinds_of(self.store.recognition_stats(task)):
                continue
            train, _ = self.stream.fit_splits(task)
            covariance = self.config.inference.feature_covariance
            stats = recognise.task_statistics(model, task, train, kinds, covariance)
            self.store.set_recognition_stats(task, stats)
            size = recognise.stats_bytes(stats)
            full = covariance == "full" and "feature.means" in stats
            if full and size > LARGE_STATS_BYTES and not self._said_stats_size:
                self._said_stats_size = True
                d = stats["feature.means"].shape[1]
                self.progress.line(
                    f"task {task + 1}: its recognition statistics add {size / 1e6:.1f} MB to "
                    f"the model file (the full covariance of {d} features; every task adds as "
                    f"much); inference.feature_covariance=diagonal keeps "
                    f"{(size - 4 * d * (d + 1) // 2 + 4 * d) / 1e6:.2f} MB a task and "
                    "inference.statistics=[input] none of the feature part, both recognising "
                    "tasks less well (README: Task inference without task ids)"
                )

    def _results(self, seconds_total: float) -> dict[str, Any]:
        cap = capacity(self.store)
        tot = self.totals
        parallel = tot.seconds.get("search", 0.0) + tot.seconds.get("train", 0.0)
        lat = sorted(self.latencies)
        return {
            "scenario": self.stream.name,
            "preset": self.preset,
            "config": self.config.model_dump(),
            "executor": self.executor.name,
            "accuracy_matrix": self.matrix.rows,
            "acc": self.matrix.acc,
            "val_accuracy_matrix": self.val_matrix.rows,
            "val_acc": self._val_acc(),
            "bwt": self.matrix.bwt,
            "capacity_pct": cap.capacity_pct,
            "heads_pct": cap.heads_pct,
            "shared_pct": cap.shared_pct,
            "networks": [
                {"network": n.network, "tasks": n.tasks, "capacity_pct": n.capacity_pct}
                for n in cap.networks
            ],
            "quality_gate_failed": [
                r["task"] for r in self.task_reports if r.get("quality_gate") == "failed"
            ],
            **self._inference_results(),
            "packed_bytes": self.model_path.stat().st_size,
            "dense_float32_bytes": cap.dense_bits // 8,
            "tasks": self.task_reports,
            "seconds_total": seconds_total,
            "seconds_by_stage": tot.seconds,
            "throughput": {
                "candidate_epochs": tot.candidate_epochs,
                "search_train_wall_seconds": parallel,
                "candidate_epochs_per_second": tot.candidate_epochs / parallel if parallel else 0.0,
                "worker_training_seconds": tot.train_seconds,
                "candidate_epochs_per_worker_second": (
                    tot.candidate_epochs / tot.train_seconds if tot.train_seconds else 0.0
                ),
                "worker_validation_seconds": tot.eval_seconds,
                "non_training_fraction": 1.0 - parallel / seconds_total,
            },
            "event_latency_s": {
                "events": len(lat),
                "median": statistics.median(lat) if lat else None,
                "p90": lat[int(0.9 * (len(lat) - 1))] if lat else None,
                "max": lat[-1] if lat else None,
            },
            "chunks": self.executor.chunk_plan(self.config.search.population),
            "evaluation": self.workers.get(self._evaluator or "", {}),
            "evaluators": self._evaluators(),
            "workers": self.workers,
            "hardware": hardware(self.device),
        }
