"""The driver's side of MLflow tracking: one parent run per scenario run, one child run per task,
artifacts and plots, and a registered pyfunc model version after every committed task.

Candidate runs (grand-children) are logged here too, from the events the workers stream to the
driver (:class:`~qpacknet.tracking.candidates.CandidateRuns`): no worker writes MLflow. Everything
goes through :class:`~qpacknet.tracking.client.SafeTracking`: a failing server costs a warning,
and the run's files in the output directory are complete either way. The logging of a
committed task runs on a background thread while the next task trains.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from qpacknet.checkpoint import load_checkpoint
from qpacknet.config import RunConfig, TrackingConfig, flatten
from qpacknet.errors import ModelFileError
from qpacknet.events import Event
from qpacknet.fileio import atomic_write_json
from qpacknet.layout import CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE
from qpacknet.observers import RunObserver, RunStarted, TaskCommitted
from qpacknet.tracking import record, writer
from qpacknet.tracking.candidates import CandidateRuns
from qpacknet.tracking.client import Background, SafeTracking
from qpacknet.tracking.registry import Lineage, RegistryConflict, parent_of

log = logging.getLogger("qpacknet.tracking")
STATE_FILE = "mlflow.json"
WORKFLOW = "workflowType=machine_learning"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def resolve_uri(cfg: TrackingConfig, out_dir: Path) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite store in ``out_dir``."""
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return default_uri(out_dir)


def default_uri(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / DB_FILE).resolve()}"


def registered_name(cfg: TrackingConfig, scenario: str) -> str:
    return cfg.registered_model or f"qpacknet-{scenario}"


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class MlflowTracker(RunObserver):
    """Logs a pipeline run to MLflow; see the module docstring."""

    def __init__(
        self,
        cfg: TrackingConfig,
        out_dir: Path,
        lineage: Lineage | None = None,
        command: str = "qpacknet run",
    ) -> None:
        self.cfg = cfg
        self.lineage = lineage
        self.command = command
        self.run_name = ""
        self.scenario = ""
        self.preset: str | None = None
        self.conflict: RegistryConflict | None = None
        self.out_dir = Path(out_dir)
        self.uri = resolve_uri(cfg, self.out_dir)
        self.local_store = self.uri.startswith("sqlite:")
        self.safe: SafeTracking | Any = None
        self._bg = Background("qpacknet-mlflow-driver")
        self._init = ThreadPoolExecutor(1, thread_name_prefix="qpacknet-mlflow-init").submit(
            self._prepare
        )
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.task_runs: dict[int, str] = {}
        self.versions: dict[int, str] = {}
        self.model_name = ""
        self._input_shape: tuple[int, ...] = ()
        self._closed: set[int] = set()
        self._candidates: CandidateRuns | None = None

    # ---------------------------------------------------------------- run level
    def _prepare(self) -> str | None:
        """Import MLflow, open the store (a new one runs MLflow's schema migrations) and find or
        create the experiment; runs on its own thread from construction on, so that it
        overlaps starting Ray, importing torch and loading data."""
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.pyfunc"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if self.local_store and self.uri == default_uri(self.out_dir):
            from qpacknet.tracking.localstore import prepare

            prepare(self.out_dir / DB_FILE)
        self.safe = SafeTracking(
            self.uri, self.cfg.http_timeout_s, self.cfg.http_retries, "the driver"
        )
        return self._experiment()

    def _ready(self) -> bool:
        """Wait for :meth:`_prepare`; False when tracking cannot be used."""
        try:
            self.experiment_id = self._init.result()
        except Exception as exc:  # e.g. MLflow not importable
            log.warning("MLflow tracking is off: %s: %s", type(exc).__name__, exc)
            return False
        return self.experiment_id is not None and not self.safe.broken

    def _experiment(self) -> str | None:
        client = self.safe.client
        exp = self.safe.call(
            "looking up the experiment", client.get_experiment_by_name, self.cfg.experiment
        )
        if exp is not None:
            if "mlflow.note.content" not in exp.tags:
                self.safe.call(
                    "describing the experiment",
                    client.set_experiment_tag,
                    exp.experiment_id,
                    "mlflow.note.content",
                    record.EXPERIMENT_NOTE,
                )
            return exp.experiment_id
        if self.safe.broken:
            return None
        location = (self.out_dir / ARTIFACTS_DIR).resolve().as_uri() if self.local_store else None
        return self.safe.call(
            "creating the experiment",
            client.create_experiment,
            self.cfg.experiment,
            artifact_location=location,
            tags={"mlflow.note.content": record.EXPERIMENT_NOTE},
        )

    def _saved_state(self) -> dict[str, Any] | None:
        path = self.out_dir / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and state.get("uri") == self.uri else None

    def _save_state(self) -> None:
        atomic_write_json(
            self.out_dir / STATE_FILE,
            {
                "uri": self.uri,
                "experiment_id": self.experiment_id,
                "run_id": self.run_id,
                # copies first: the training thread adds task runs while this thread writes
                "task_runs": {str(k): v for k, v in dict(self.task_runs).items()},
                "model_versions": {str(k): v for k, v in dict(self.versions).items()},
                "registered_model": self.model_name,
                "run_name": self.run_name,
            },
        )

    def run_started(self, event: RunStarted) -> None:
        cfg: RunConfig = event.config
        self.model_name = registered_name(self.cfg, event.scenario)
        self.scenario, self.preset = event.scenario, event.preset
        if not self._ready():
            return
        client = self.safe.client
        if self.lineage is None:
            self.lineage = learned_lineage(self.out_dir)
        saved = self._saved_state() if event.first > 0 else None
        if saved and saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.run_name = saved.get("run_name", "")
            from qpacknet.tracking.sync import int_keys

            runs = int_keys(saved.get("task_runs"), "task_runs")
            versions = int_keys(saved.get("model_versions"), "model_versions")
            for t, run_id in sorted(runs.items()):
                if t >= event.first:  # an attempt the crash interrupted; learned again below
                    self.safe.call("closing an interrupted task run", client.set_terminated,
                                   run_id, "KILLED")  # fmt: skip
            self.task_runs = {t: r for t, r in runs.items() if t < event.first}
            self.versions = {t: v for t, v in versions.items() if t < event.first}
            self.safe.call("reopening the run", client.update_run, self.run_id, status="RUNNING")
            self.safe.call(
                "tagging the resume",
                client.set_tag,
                self.run_id,
                "qpacknet.resumed_at",
                event.first,
            )
            self._catch_up(event.first)
            return
        tags = record.run_tags(
            event.preset,
            event.scenario,
            cfg.seed,
            event.executor,
            event.device,
            str(self.out_dir.resolve()),
            self.command,
            {"qpacknet.host": socket.gethostname(), "qpacknet.pid": str(os.getpid())},
        )
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        from qpacknet.tracking.sync import unique_name

        self.run_name = unique_name(
            self.safe,
            self.experiment_id or "",
            record.run_name(event.preset, event.scenario, self.out_dir.name),
        )
        run = self.safe.call(
            "creating the run",
            client.create_run,
            self.experiment_id,
            run_name=self.run_name,
            tags=tags,
        )
        if run is None:
            return
        self.run_id = run.info.run_id
        writer.log_config(self.safe, self.run_id, flatten(cfg))
        self._save_state()
        if event.first > 0:  # resumed, but its tracking never got going before
            self._catch_up(event.first)

    def _catch_up(self, first: int) -> None:
        """On every resume: add what the record misses of tasks ``0..first-1`` (what
        ``qpacknet sync`` does; nothing when tracking never failed), on the background
        thread, before the next task's logging, which runs on the same thread."""
        from qpacknet.tracking.sync import RecordSync

        known = {"task_runs": dict(self.task_runs), "model_versions": dict(self.versions)}

        def job() -> None:
            report = RecordSync(self.safe, self.out_dir, self.cfg).sync(
                experiment_id=self.experiment_id,
                run_id=self.run_id,
                upto=first,
                lineage=self.lineage,
                known=known,
            )
            for t, run_id in report.task_runs.items():
                self.task_runs.setdefault(t, run_id)
            for t, version in report.versions.items():
                self.versions.setdefault(t, version)
            for text in report.conflicts:
                self.conflict = RegistryConflict(text)
                log.error("not registered: %s", text)
            if report.added:
                log.warning("MLflow record brought up to date: %s", report.summary())
            self._save_state()

        self._bg.submit(job)

    # --------------------------------------------------------------- task level
    def task_started(self, task: int) -> None:
        self._candidates = None
        if self.run_id is None or self.experiment_id is None or self.safe.broken:
            return
        run = self.safe.call(
            "creating a task run",
            self.safe.client.create_run,
            self.experiment_id,
            run_name=f"task-{record.task_label(task)}",
            tags=record.task_run_tags(self.run_id, task, self.command),
        )
        if run is None:
            return
        self.task_runs[task] = run.info.run_id
        if self.cfg.log_candidates:
            self._candidates = CandidateRuns(
                self.safe, self._bg, self.experiment_id, run.info.run_id, task, self.command
            )

    def worker_event(self, event: Event) -> None:
        """Candidate runs from the workers' events (see :mod:`~qpacknet.tracking.candidates`)."""
        if self._candidates is not None:
            self._candidates.on_event(event)

    def task_committed(self, event: TaskCommitted) -> None:
        run_id = self.task_runs.get(event.task)
        if run_id is None or self.run_id is None or self.safe.broken:
            return
        try:
            self._snapshot_and_log(event, run_id)
        except Exception as exc:  # e.g. a full disk: tracking stops, training goes on
            self.safe.fail("copying the committed model for logging", exc)

    def _snapshot_and_log(self, event: TaskCommitted, run_id: str) -> None:
        snapshot = Path(tempfile.mkdtemp(prefix="qpacknet-mlflow-"))
        for name in (MODEL_FILE, CHECKPOINT_FILE, CONFIG_FILE):
            src = self.out_dir / name
            if src.exists():
                (snapshot / name).write_bytes(src.read_bytes())
        if not self._input_shape:
            from qpacknet.model import PackedModel

            self._input_shape = PackedModel.load(snapshot / MODEL_FILE).input_shape
        matrix = json.loads((snapshot / CHECKPOINT_FILE).read_text())["matrix"]
        self._bg.submit(lambda: self._log_task(event, run_id, snapshot, matrix))

    def _log_task(
        self, event: TaskCommitted, run_id: str, snapshot: Path, matrix: list[list[float]]
    ) -> None:
        t = event.task
        writer.log_task(
            self.safe, run_id, self.run_id or "", event.report, event.row, event.capacity_pct,
            matrix,
        )  # fmt: skip
        if self.cfg.register_models:
            self._register(event, run_id, snapshot)
        self.safe.call("closing a task run", self.safe.client.set_terminated, run_id, "FINISHED")
        self._closed.add(t)
        self._save_state()
        shutil.rmtree(snapshot, ignore_errors=True)

    def _register(self, event: TaskCommitted, run_id: str, snapshot: Path) -> None:
        """Log the packed model after the task (an MLflow 3 logged model of the run, an output
        of the task's run too) and register it as a new version whose parent is the previous
        task's version (a learn's first: the version it extends), guarded against forks
        (:mod:`~qpacknet.tracking.registry`)."""
        task = event.task
        if not writer.ensure_registered_model(self.safe, self.model_name, self.scenario):
            return
        logged = writer.log_model(
            self.safe,
            self.experiment_id or "",
            run_id,
            task,
            snapshot,
            self._input_shape,
            self.run_id or "",
        )
        if logged is None:
            return
        parent, guard = parent_of(task, self.lineage, self.versions, str(self.out_dir))
        if parent is None:
            log.error(
                "task %d was not registered: the version of task %d is not known (its "
                "registration failed); qpacknet sync --out %s registers both",
                task + 1,
                task,
                self.out_dir,
            )
            return
        tags = record.version_tags(
            task, parent, self.run_id or "", self.run_name, self.scenario, self.preset, event.acc
        )
        note = record.version_note(
            task, parent, self.run_name, self.scenario, self.preset, event.acc
        )
        try:
            version = writer.register_version(
                self.safe, self.model_name, logged, run_id, tags, note, guard
            )
        except RegistryConflict as exc:
            self.conflict = exc
            log.error("not registered: %s", exc)
            return
        if version is not None:
            self.versions[task] = version

    # ---------------------------------------------------------------- run end
    def run_finished(self, results: dict[str, Any]) -> None:
        self._bg.flush()
        if self.run_id is None or not self._ready():
            self._bg.close()
            return
        writer.end_run(self.safe, self.run_id, results, self.out_dir, self.preset)
        self._bg.close()

    def run_failed(self, error: BaseException) -> None:
        self._bg.flush()
        if not self._ready():
            self._bg.close()
            return
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        for t, run_id in self.task_runs.items():
            if t not in self._closed:
                self.safe.call(
                    "closing a task run", self.safe.client.set_terminated, run_id, status
                )
        if self.run_id is not None:
            self.safe.call("closing the run", self.safe.client.set_terminated, self.run_id, status)
        self._bg.close()

    def summary(self) -> str:
        """The run's last lines: where it was logged and how to open it."""
        if self.run_id is None or self.safe is None or self.safe.broken:
            return (
                f"MLflow tracking at {self.uri} was not (fully) available; the results are "
                f"complete in {self.out_dir}"
            )
        versions = ", ".join(self.versions[t] for t in sorted(self.versions)) or "none"
        lines = [
            f"MLflow run {self.run_id} (experiment {self.cfg.experiment!r}) at {self.uri}",
            f"registered model {self.model_name!r}, versions {versions}",
        ]
        # the query keeps MLflow 3's UI in its model-training view (a plain link opens GenAI)
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}?{WORKFLOW}"
        if self.local_store:
            lines.append(
                f"open it with: mlflow ui --backend-store-uri {self.uri}  then "
                f"http://127.0.0.1:5000/{page}"
            )
        else:
            lines.append(f"open it at {self.uri.rstrip('/')}/{page}")
        return "\n".join(lines)


def learned_lineage(out_dir: Path) -> Lineage | None:
    """Where a ``qpacknet learn`` work dir attaches (its checkpoint's ``learned_from``), so
    that a resumed learn still registers its task as the child of the version it extends.
    None for a run dir without a checkpoint or one that no learn wrote; a damaged checkpoint
    or ``learned_from`` raises :class:`ModelFileError` (exit 2): registering without the
    parent check could fork the model's lineage."""
    state = load_checkpoint(out_dir)
    learned = state.get("learned_from") if state is not None else None
    if not learned:
        return None  # no checkpoint yet, or a run/add_task dir: no version to be the parent
    try:
        if not learned.get("version"):
            return None  # learned from runs:/…, which names no version to be the parent
        return Lineage(
            str(learned["version"]),
            bool(learned.get("from_latest")),
            str(out_dir),
            int(learned["tasks"]),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(
            f"{out_dir / CHECKPOINT_FILE}: learned_from is damaged ({learned!r}); the version "
            "this learn extends is unknown, so it cannot be registered safely. Fix: start the "
            "learn again with a new --out"
        ) from exc
