"""One MLflow run per candidate, nested under its task's run, logged by the driver from the
events the workers stream (DESIGN.md §4: the driver is the only MLflow writer, so a multi-node
cluster with a local store loses no record, and workers never import MLflow).

Per-epoch losses and validation accuracies are step-indexed metrics (step = epoch) stamped with
the moment the epoch ended on its worker; a candidate run starts and ends when its chunk did,
and carries the worker (node, host, pid, device) that trained it. The winner's TRAIN epochs are
added to its run as they arrive. Logging happens on the tracker's background thread, so a slow
tracking store delays nothing but the tracker's flush.
"""

from __future__ import annotations

from typing import Any

from qpacknet.events import EpochEnded, StageDone
from qpacknet.tracking import writer
from qpacknet.tracking.client import Background, SafeTracking


class CandidateRuns:
    """The candidate runs of one task, fed with that task's worker events; the records are
    the ones :mod:`~qpacknet.tracking.sync` builds from the task's report."""

    def __init__(
        self,
        safe: SafeTracking,
        background: Background,
        experiment_id: str,
        task_run_id: str,
        task: int,
        command: str,
    ) -> None:
        self.safe = safe
        self.command = command
        self._bg = background
        self.experiment_id = experiment_id
        self.task_run_id = task_run_id
        self.task = task
        self.run_ids: dict[int, str] = {}
        self._search: dict[int, dict[int, list[float]]] = {}
        self._winner: int | None = None
        self._train_logged: set[int] = set()

    def on_event(self, event: EpochEnded | StageDone) -> None:
        if event.task != self.task:
            return
        if isinstance(event, EpochEnded):
            self._epoch(event)
        elif isinstance(event, StageDone) and event.stage == "search":
            chunk = {"started_at": event.started_at, "ended_at": event.ended_at}
            candidates = [
                {
                    "index": r.index,
                    "acc": r.acc,
                    "sparsity": r.sparsity,
                    "density": dict(r.density),
                    "epochs": [[e, *v] for e, v in sorted(self._search.get(r.index, {}).items())],
                }
                for r in event.result
            ]
            worker = dict(event.worker)
            self._bg.submit(lambda: self._log_search(candidates, chunk, worker))

    def _epoch(self, event: EpochEnded) -> None:
        rep = event.report
        if rep.stage == "search":
            # keyed by epoch: a chunk re-run after a lost actor overwrites its epochs
            for i, c in enumerate(event.candidates):
                values = [rep.loss[i], rep.val_acc[i], rep.lr, event.ended_at]
                self._search.setdefault(c, {})[rep.epoch] = values
            return
        winner = event.candidates[0]
        epoch = {
            "epoch": rep.epoch,
            "loss": rep.loss[0],
            "val_acc": rep.val_acc[0],
            "lr": rep.lr,
            "ended_at": event.ended_at,
        }
        self._winner = winner
        self._bg.submit(lambda: self._log_train(winner, epoch))

    def _log_search(
        self, candidates: list[dict[str, Any]], chunk: dict[str, Any], worker: dict[str, Any]
    ) -> None:
        for c in candidates:
            run_id = writer.log_candidate(
                self.safe,
                self.experiment_id,
                self.task_run_id,
                self.task,
                c,
                chunk,
                worker,
                self.command,
            )
            if run_id is None:
                return
            self.run_ids[c["index"]] = run_id
            writer.finish_candidate(self.safe, run_id, chunk)

    def _log_train(self, winner: int, epoch: dict[str, Any]) -> None:
        run_id = self.run_ids.get(winner)
        if run_id is None or epoch["epoch"] in self._train_logged:  # a re-run repeats epochs
            return
        first = not self._train_logged
        self._train_logged.add(epoch["epoch"])
        writer.log_train_epochs(self.safe, run_id, [epoch], tag_winner=first)
