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
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from qpacknet import __version__
from qpacknet.config import RunConfig, TrackingConfig, flatten
from qpacknet.events import Event
from qpacknet.fileio import atomic_write_json
from qpacknet.layout import CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE, RESULTS_FILE
from qpacknet.observers import RunObserver, RunStarted, TaskCommitted
from qpacknet.tracking.candidates import CandidateRuns
from qpacknet.tracking.client import Background, SafeTracking
from qpacknet.tracking.registry import (
    ALIAS,
    PARENT_TAG,
    Lineage,
    RegistryConflict,
    check_after_register,
    check_before_register,
)

log = logging.getLogger("qpacknet.tracking")
STATE_FILE = "mlflow.json"
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


def _metrics(values: dict[str, float], step: int = 0) -> list[Any]:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, step) for k, v in values.items()]


class MlflowTracker(RunObserver):
    """Logs a pipeline run to MLflow; see the module docstring."""

    def __init__(self, cfg: TrackingConfig, out_dir: Path, lineage: Lineage | None = None) -> None:
        self.cfg = cfg
        self.lineage = lineage
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
            return exp.experiment_id
        if self.safe.broken:
            return None
        location = (self.out_dir / ARTIFACTS_DIR).resolve().as_uri() if self.local_store else None
        return self.safe.call(
            "creating the experiment",
            client.create_experiment,
            self.cfg.experiment,
            artifact_location=location,
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
                "task_runs": {str(k): v for k, v in self.task_runs.items()},
                "model_versions": {str(k): v for k, v in self.versions.items()},
                "registered_model": self.model_name,
            },
        )

    def run_started(self, event: RunStarted) -> None:
        cfg: RunConfig = event.config
        self.model_name = registered_name(self.cfg, event.scenario)
        if not self._ready():
            return
        client = self.safe.client
        saved = self._saved_state() if event.first > 0 else None
        if saved and saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.task_runs = {int(k): v for k, v in saved.get("task_runs", {}).items()}
            self.versions = {int(k): v for k, v in saved.get("model_versions", {}).items()}
            self.safe.call("reopening the run", client.update_run, self.run_id, status="RUNNING")
            self.safe.call(
                "tagging the resume",
                client.set_tag,
                self.run_id,
                "qpacknet.resumed_at",
                event.first,
            )
            return
        tags = {
            "qpacknet.preset": event.preset or "",
            "qpacknet.scenario": event.scenario,
            "qpacknet.seed": str(cfg.seed),
            "qpacknet.executor": event.executor,
            "qpacknet.device": event.device,
            "qpacknet.version": __version__,
            "qpacknet.out_dir": str(self.out_dir.resolve()),
            "qpacknet.host": socket.gethostname(),
            "qpacknet.pid": str(os.getpid()),
        }
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        run = self.safe.call(
            "creating the run",
            client.create_run,
            self.experiment_id,
            run_name=f"{event.preset or event.scenario}-{self.out_dir.name}",
            tags=tags,
        )
        if run is None:
            return
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):
            self.safe.call(
                "logging the config", client.log_batch, self.run_id, params=params[i : i + 100]
            )
        self._save_state()

    # --------------------------------------------------------------- task level
    def task_started(self, task: int) -> None:
        self._candidates = None
        if self.run_id is None or self.experiment_id is None or self.safe.broken:
            return
        run = self.safe.call(
            "creating a task run",
            self.safe.client.create_run,
            self.experiment_id,
            run_name=f"task-{task + 1}",
            tags={"mlflow.parentRunId": self.run_id, "qpacknet.task": str(task)},
        )
        if run is None:
            return
        self.task_runs[task] = run.info.run_id
        if self.cfg.log_candidates:
            self._candidates = CandidateRuns(
                self.safe, self._bg, self.experiment_id, run.info.run_id, task
            )

    def worker_event(self, event: Event) -> None:
        """Candidate runs from the workers' events (see :mod:`~qpacknet.tracking.candidates`)."""
        if self._candidates is not None:
            self._candidates.on_event(event)

    def task_committed(self, event: TaskCommitted) -> None:
        run_id = self.task_runs.get(event.task)
        if run_id is None or self.run_id is None:
            return
        snapshot = Path(tempfile.mkdtemp(prefix="qpacknet-mlflow-"))
        for name in (MODEL_FILE, CHECKPOINT_FILE, CONFIG_FILE):
            src = self.out_dir / name
            if src.exists():
                (snapshot / name).write_bytes(src.read_bytes())
        if not self._input_shape:
            from qpacknet.model import PackedModel

            self._input_shape = PackedModel.load(snapshot / MODEL_FILE).input_shape
        self._bg.submit(lambda: self._log_task(event, run_id, snapshot))

    def _log_task(self, event: TaskCommitted, run_id: str, snapshot: Path) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, rep, t = self.safe.client, event.report, event.task
        values = {
            "bit_width": rep["bit_width"],
            "winner": rep["winner"],
            "float_val_acc": rep["float_acc"],
            "quant_val_acc": rep["quant_acc"],
            "task_capacity_pct": rep["capacity_pct"],
            "capacity_pct": event.capacity_pct,
            "acc": event.acc,
            "bwt": event.bwt,
            "task_inference_acc": rep["task_inference_acc"],
            "class_incremental_acc": rep["class_incremental_acc"],
            "task_shared_pct": rep["shared_pct"],
            "candidate_epochs": rep["candidate_epochs"],
            "training_seconds": rep["training_seconds"],
            "network": rep.get("network", 0),
            "float_test_acc": rep.get("float_test_acc", math.nan),
            "quant_test_acc": rep.get("quant_test_acc", math.nan),
        }
        values.update({f"seconds_{k}": v for k, v in rep["seconds"].items()})
        values.update({f"test_acc_task_{j + 1}": v for j, v in enumerate(event.row)})
        metrics = _metrics(values)
        ts = int(time.time() * 1000)
        for c in rep["candidates"]:
            metrics += [
                Metric("candidate_val_acc", c["acc"], ts, c["index"]),
                Metric("candidate_sparsity", c["sparsity"], ts, c["index"]),
                Metric("candidate_score", c["score"], ts, c["index"]),
            ]
        for b in rep["bits_tried"]:
            metrics.append(Metric("quant_val_acc_by_bits", b["acc"], ts, b["bits"]))
        params = [Param("winner", str(rep["winner"])), Param("bit_width", str(rep["bit_width"]))]
        tags = [RunTag("qpacknet.commit_digest", rep.get("commit_digest", ""))]
        if rep.get("quality_gate"):
            tags.append(RunTag("qpacknet.quality_gate", rep["quality_gate"]))
        if rep.get("when_full"):
            tags.append(RunTag("qpacknet.when_full", rep["when_full"]))
        for stage, where in rep.get("ran_on", {}).items():
            text = ", ".join(where) if isinstance(where, list) else str(where)
            tags.append(RunTag(f"qpacknet.ran_on.{stage}", text))
        self.safe.call("logging task metrics", client.log_batch, run_id, metrics, params, tags)
        progress = {
            "acc": event.acc,
            "bwt": event.bwt,
            "capacity_pct": event.capacity_pct,
            "task_inference_acc": rep["task_inference_acc"],
            "class_incremental_acc": rep["class_incremental_acc"],
        }
        self.safe.call(
            "logging run progress", client.log_batch, self.run_id, _metrics(progress, t + 1)
        )
        if self.cfg.register_models:
            self._register(event, run_id, snapshot)
        self.safe.call("closing a task run", client.set_terminated, run_id, "FINISHED")
        self._closed.add(t)
        self._save_state()
        shutil.rmtree(snapshot, ignore_errors=True)

    def _register(self, event: TaskCommitted, run_id: str, snapshot: Path) -> None:
        """Log the packed model after the task as a pyfunc model and register a new version
        whose parent is the previous task's version (a learn's first: the version it
        extends), guarded against forks (:mod:`~qpacknet.tracking.registry`)."""
        from qpacknet.tracking.pyfunc import save_packed_model

        client, task = self.safe.client, event.task
        model_dir = snapshot / "model"
        try:
            save_packed_model(model_dir, snapshot, self._input_shape)
        except Exception as exc:
            self.safe.call("saving the pyfunc model", _raise, exc)
            return
        self.safe.call("logging the model", client.log_artifacts, run_id, str(model_dir), "model")
        if self._ensure_registered() is None:
            return
        lineage = self.lineage
        parent = self.versions.get(task - 1) or (lineage.parent if lineage else "")
        guarded = lineage is not None and parent == lineage.parent
        if guarded and not self._guard(check_before_register, client, self.model_name, lineage):
            return
        mv = self.safe.call(
            "registering the model version",
            client.create_model_version,
            self.model_name,
            f"runs:/{run_id}/model",
            run_id=run_id,
            tags={"qpacknet.tasks": str(task + 1), PARENT_TAG: parent},
            description=f"packed model after task {task + 1}",
        )
        if mv is None:
            return
        version = str(mv.version)
        if guarded and not self._guard(
            check_after_register, client, self.model_name, lineage, version
        ):
            return
        self.versions[task] = version
        self.safe.call(
            "tagging the model version", client.set_tag, run_id, "model_version", version
        )
        self.safe.call(
            f"moving the {ALIAS!r} alias",
            client.set_registered_model_alias,
            self.model_name,
            ALIAS,
            version,
        )

    def _guard(self, check: Any, *args: Any) -> bool:
        """Run a registry check; False (and :attr:`conflict` set) when registering must not
        happen. A failing server turns tracking off as any other call does."""
        try:
            check(*args)
            return True
        except RegistryConflict as exc:
            self.conflict = exc
            log.error("not registered: %s", exc)
        except Exception as exc:
            self.safe.call("checking the registry", _raise, exc)
        return False

    def _ensure_registered(self) -> bool | None:
        from mlflow.exceptions import MlflowException

        client = self.safe.client
        if self.safe.broken:
            return None
        try:
            client.get_registered_model(self.model_name)
            return True
        except MlflowException:
            pass
        except Exception as exc:
            return self.safe.call("looking up the registered model", _raise, exc)
        created = self.safe.call(
            "creating the registered model", client.create_registered_model, self.model_name
        )
        return None if created is None else True

    # ---------------------------------------------------------------- run end
    def run_finished(self, results: dict[str, Any]) -> None:
        self._bg.flush()
        if self.run_id is None or not self._ready():
            self._bg.close()
            return
        client = self.safe.client
        tp = results["throughput"]
        final = {
            "acc": results["acc"],
            "bwt": results["bwt"],
            "capacity_pct": results["capacity_pct"],
            "heads_pct": results["heads_pct"],
            "shared_pct": results["shared_pct"],
            "task_inference_acc": results["task_inference_acc"],
            "class_incremental_acc": results["class_incremental_acc"],
            "packed_bytes": results["packed_bytes"],
            "networks": len(results.get("networks", [])) or 1,
            "quality_gate_failed": len(results.get("quality_gate_failed", [])),
            "seconds_total": results["seconds_total"],
            "candidate_epochs_per_second": tp["candidate_epochs_per_second"],
        }
        self.safe.call(
            "logging final metrics",
            client.log_batch,
            self.run_id,
            _metrics(final, len(results["tasks"])),
        )
        for name in (RESULTS_FILE, CONFIG_FILE, MODEL_FILE):
            path = self.out_dir / name
            if path.exists():
                self.safe.call("logging an artifact", client.log_artifact, self.run_id, str(path))
        with tempfile.TemporaryDirectory() as tmp:
            from qpacknet.tracking.plots import draw_all

            for png in draw_all(results, Path(tmp)):
                self.safe.call(
                    "logging a plot", client.log_artifact, self.run_id, str(png), "plots"
                )
        ev = results.get("evaluation", {})
        devices = sorted({str(w.get("device_name")) for w in results.get("workers", {}).values()})
        for key, value in (
            ("qpacknet.evaluation_device", f"{ev.get('device')} ({ev.get('device_name')})"),
            ("qpacknet.evaluation_worker", f"{ev.get('host')}:{ev.get('pid')}"),
            ("qpacknet.worker_devices", ", ".join(devices)),
            ("qpacknet.workers", str(len(results.get("workers", {})))),
        ):
            self.safe.call("tagging the run", client.set_tag, self.run_id, key, value)
        self.safe.call("closing the run", client.set_terminated, self.run_id, "FINISHED")
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
        if self.local_store:
            lines.append(f"open it with: mlflow ui --backend-store-uri {self.uri}")
        else:
            lines.append(f"open it at {self.uri}")
        return "\n".join(lines)


def _raise(exc: BaseException) -> None:
    raise exc
