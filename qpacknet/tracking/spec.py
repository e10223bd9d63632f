"""Where a worker logs its candidates: small, picklable, and free of MLflow imports, so that it
travels inside :class:`~qpacknet.worker.TaskContext` to Ray actors on any node."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CandidateTracking:
    """The task's MLflow run that candidate runs nest under (DESIGN: one grand-child run per
    candidate, logged by the process that trained it). The parent run id is passed explicitly
    because MLflow's active-run stack is per process and Ray's MLflow callback cannot nest."""

    uri: str
    experiment_id: str
    task_run_id: str
    task: int
    http_timeout_s: float = 10.0
    http_retries: int = 2
