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
from qpacknet.tracking.client import Background, SafeTracking

_WORKER_TAGS = ("node_id", "host", "pid", "device", "device_name")


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _epoch_metrics(prefix: str, epoch: int, values: tuple[float, float, float, float]) -> list[Any]:
    from mlflow.entities import Metric

    loss, acc, lr, ended_at = values
    ts = _ms(ended_at)
    return [
        Metric(f"{prefix}_loss", loss, ts, epoch),
        Metric(f"{prefix}_val_acc", acc, ts, epoch),
        Metric(f"{prefix}_lr", lr, ts, epoch),
    ]


class CandidateRuns:
    """The candidate runs of one task, fed with that task's worker events."""

    def __init__(
        self,
        safe: SafeTracking,
        background: Background,
        experiment_id: str,
        task_run_id: str,
        task: int,
    ) -> None:
        self.safe = safe
        self._bg = background
        self.experiment_id = experiment_id
        self.task_run_id = task_run_id
        self.task = task
        self.run_ids: dict[int, str] = {}
        self._search: dict[int, dict[int, tuple[float, float, float, float]]] = {}
        self._winner: int | None = None
        self._train_logged: set[int] = set()

    def on_event(self, event: EpochEnded | StageDone) -> None:
        if event.task != self.task:
            return
        if isinstance(event, EpochEnded):
            self._epoch(event)
        elif isinstance(event, StageDone) and event.stage == "search":
            results, worker = list(event.result), dict(event.worker)
            epochs = {r.index: dict(self._search.get(r.index, {})) for r in results}
            self._bg.submit(lambda: self._log_search(event, results, worker, epochs))

    def _epoch(self, event: EpochEnded) -> None:
        rep = event.report
        if rep.stage == "search":
            # keyed by epoch: a chunk re-run after a lost actor overwrites its epochs
            for i, c in enumerate(event.candidates):
                values = (float(rep.loss[i]), float(rep.val_acc[i]), float(rep.lr), event.ended_at)
                self._search.setdefault(c, {})[rep.epoch] = values
            return
        winner = event.candidates[0]
        values = (float(rep.loss[0]), float(rep.val_acc[0]), float(rep.lr), event.ended_at)
        first = self._winner is None
        self._winner = winner
        self._bg.submit(lambda: self._log_train(winner, rep.epoch, values, first))

    def _log_search(
        self,
        event: StageDone,
        results: list[Any],
        worker: dict[str, Any],
        epochs: dict[int, dict[int, tuple[float, float, float, float]]],
    ) -> None:
        from mlflow.entities import Metric

        client = self.safe.client
        for r in results:
            tags = {
                "mlflow.parentRunId": self.task_run_id,
                "qpacknet.task": str(self.task),
                "qpacknet.candidate": str(r.index),
            }
            tags.update({f"qpacknet.worker.{k}": str(worker.get(k)) for k in _WORKER_TAGS})
            run = self.safe.call(
                "creating a candidate run",
                client.create_run,
                self.experiment_id,
                start_time=_ms(event.started_at),
                run_name=f"task-{self.task + 1}-candidate-{r.index}",
                tags=tags,
            )
            if run is None:
                return
            run_id = run.info.run_id
            self.run_ids[r.index] = run_id
            ts = _ms(event.ended_at)
            metrics = [Metric("val_acc", r.acc, ts, 0), Metric("sparsity", r.sparsity, ts, 0)]
            metrics += [Metric(f"density.{k}", v, ts, 0) for k, v in r.density.items()]
            for epoch, values in sorted(epochs.get(r.index, {}).items()):
                metrics += _epoch_metrics("search", epoch, values)
            self.safe.call("logging candidate metrics", client.log_batch, run_id, metrics)
            self.safe.call(
                "closing a candidate run",
                client.set_terminated,
                run_id,
                "FINISHED",
                end_time=_ms(event.ended_at),
            )

    def _log_train(
        self, winner: int, epoch: int, values: tuple[float, float, float, float], first: bool
    ) -> None:
        run_id = self.run_ids.get(winner)
        if run_id is None or epoch in self._train_logged:  # a TRAIN re-run repeats epochs
            return
        self._train_logged.add(epoch)
        client = self.safe.client
        if first:
            self.safe.call("tagging the winner", client.set_tag, run_id, "qpacknet.winner", "true")
        metrics = _epoch_metrics("train", epoch, values)
        self.safe.call("logging TRAIN metrics", client.log_batch, run_id, metrics)
