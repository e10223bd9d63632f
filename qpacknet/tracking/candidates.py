"""One MLflow run per candidate, nested under its task's run, logged by the process that
trained the candidate (a Ray actor on any node, or the driver with the local executor).

Per-epoch losses and validation accuracies are step-indexed metrics (step = epoch); the
winner's run also gets its TRAIN epochs. Logging happens on a background thread, so a slow
tracking store delays nothing but :meth:`CandidateRuns.flush`.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from qpacknet.search import CandidateResult
from qpacknet.tracking.client import Background, SafeTracking
from qpacknet.tracking.spec import CandidateTracking
from qpacknet.train import EpochReport

_CLIENTS: dict[str, SafeTracking] = {}


def _client(spec: CandidateTracking) -> SafeTracking:
    """One client per tracking URI and process (a broken server stays off for the run)."""
    safe = _CLIENTS.get(spec.uri)
    if safe is None:
        where = f"{socket.gethostname()} pid {os.getpid()}"
        safe = SafeTracking(spec.uri, spec.http_timeout_s, spec.http_retries, where)
        _CLIENTS[spec.uri] = safe
    return safe


def _epoch_metrics(prefix: str, reports: list[EpochReport], i: int) -> list[Any]:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    out = []
    for rep in reports:
        out.append(Metric(f"{prefix}_loss", float(rep.loss[i]), ts, rep.epoch))
        out.append(Metric(f"{prefix}_val_acc", float(rep.val_acc[i]), ts, rep.epoch))
        out.append(Metric(f"{prefix}_lr", float(rep.lr), ts, rep.epoch))
    return out


class CandidateRuns:
    """The candidate runs of one task in this process."""

    def __init__(self, spec: CandidateTracking) -> None:
        self.spec = spec
        self.safe: SafeTracking | None = None
        self.run_ids: dict[int, str] = {}
        self._bg = Background("qpacknet-mlflow")

    def searched(self, results: list[CandidateResult], reports: list[EpochReport]) -> None:
        """A chunk's SEARCH: ``reports`` hold one value per candidate, in ``results`` order."""
        self._bg.submit(lambda: self._log_search(list(results), list(reports)))

    def _log_search(self, results: list[CandidateResult], reports: list[EpochReport]) -> None:
        from mlflow.entities import Metric

        self.safe = self.safe or _client(self.spec)  # imports MLflow here, off the training thread
        client, spec = self.safe.client, self.spec
        for i, r in enumerate(results):
            tags = {
                "mlflow.parentRunId": spec.task_run_id,
                "qpacknet.task": str(spec.task),
                "qpacknet.candidate": str(r.index),
                "qpacknet.host": socket.gethostname(),
                "qpacknet.pid": str(os.getpid()),
            }
            name = f"task-{spec.task + 1}-candidate-{r.index}"
            run = self.safe.call(
                "creating a candidate run",
                client.create_run,
                spec.experiment_id,
                run_name=name,
                tags=tags,
            )
            if run is None:
                return
            run_id = run.info.run_id
            self.run_ids[r.index] = run_id
            ts = int(time.time() * 1000)
            final = [Metric("val_acc", r.acc, ts, 0), Metric("sparsity", r.sparsity, ts, 0)]
            final += [Metric(f"density.{k}", v, ts, 0) for k, v in r.density.items()]
            metrics = _epoch_metrics("search", reports, i) + final
            self.safe.call("logging candidate metrics", client.log_batch, run_id, metrics)
            self.safe.call("closing a candidate run", client.set_terminated, run_id, "FINISHED")

    def trained(self, winner: int, reports: list[EpochReport]) -> None:
        """The winner's TRAIN epochs, added to its candidate run."""
        self._bg.submit(lambda: self._log_train(winner, list(reports)))

    def _log_train(self, winner: int, reports: list[EpochReport]) -> None:
        run_id = self.run_ids.get(winner)
        if run_id is None or self.safe is None:
            return
        client = self.safe.client
        self.safe.call("tagging the winner", client.set_tag, run_id, "qpacknet.winner", "true")
        metrics = _epoch_metrics("train", reports, 0)
        self.safe.call("logging TRAIN metrics", client.log_batch, run_id, metrics)

    def flush(self) -> None:
        self._bg.flush()

    def close(self) -> None:
        self._bg.close()


def open_runs(spec: CandidateTracking | None) -> CandidateRuns | None:
    """Candidate runs for a task whose context asks for them (else None: tracking is off)."""
    return None if spec is None else CandidateRuns(spec)
