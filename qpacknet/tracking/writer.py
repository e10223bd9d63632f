"""The MLflow calls that write a run's record, shared by the live tracker and ``qpacknet sync``.

Every call goes through :class:`~qpacknet.tracking.client.SafeTracking`, and everything written
is built by :mod:`~qpacknet.tracking.record` from the run's own data, so the two writers
produce the same record and a repeated write adds nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qpacknet.layout import CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE, RESULTS_FILE
from qpacknet.tracking import record
from qpacknet.tracking.client import SafeTracking


def log_config(safe: SafeTracking, run_id: str, flat: dict[str, Any]) -> None:
    """The run's settings as params (MLflow takes at most 100 per call)."""
    from mlflow.entities import Param

    params = [Param(k, str(v)) for k, v in flat.items()]
    for i in range(0, len(params), 100):
        safe.call("logging the config", safe.client.log_batch, run_id, params=params[i : i + 100])


def log_task(
    safe: SafeTracking,
    run_id: str,
    parent_run_id: str,
    report: dict[str, Any],
    row: list[float],
    capacity_pct: float,
    matrix: list[list[float]],
) -> None:
    """A committed task's metrics, params and tags on its run, and the parent's curves."""
    from mlflow.entities import Param, RunTag

    t = report["task"]
    acc, bwt = record.acc_bwt(matrix, t)
    params = [Param(k, v) for k, v in record.task_params(report).items()]
    tags = [RunTag(k, v) for k, v in record.task_tags(report, row, parent_run_id).items()]
    metrics = record.task_metrics(report, row, acc, bwt, capacity_pct)
    for i in range(0, len(metrics), 900):
        chunk = metrics[i : i + 900]
        first = i == 0
        safe.call(
            "logging task metrics",
            safe.client.log_batch,
            run_id,
            chunk,
            params if first else [],
            tags if first else [],
        )
    safe.call(
        "logging run progress",
        safe.client.log_batch,
        parent_run_id,
        record.progress_metrics(report, acc, bwt, capacity_pct),
    )


def log_candidate(
    safe: SafeTracking,
    experiment_id: str,
    task_run_id: str,
    t: int,
    candidate: dict[str, Any],
    chunk: dict[str, Any],
    worker: dict[str, Any],
    command: str,
    run_id: str | None = None,
) -> str | None:
    """One candidate's run (created unless ``run_id`` is given): spans its SEARCH chunk,
    carries the worker that trained it and every SEARCH epoch."""
    client = safe.client
    if run_id is None:
        run = safe.call(
            "creating a candidate run",
            client.create_run,
            experiment_id,
            start_time=record.ms(chunk["started_at"]),
            run_name=record.candidate_name(t, candidate["index"]),
            tags=record.candidate_tags(task_run_id, t, candidate["index"], worker, command),
        )
        if run is None:
            return None
        run_id = run.info.run_id
    metrics = record.candidate_metrics(
        candidate["acc"],
        candidate["sparsity"],
        candidate.get("density", {}),
        candidate.get("epochs", []),
        chunk["ended_at"],
    )
    safe.call("logging candidate metrics", client.log_batch, run_id, metrics)
    return run_id


def log_train_epochs(
    safe: SafeTracking, run_id: str, epochs: list[dict[str, Any]], tag_winner: bool = True
) -> None:
    """The winner's TRAIN epochs on its candidate run (and the tag that marks the winner)."""
    metrics: list[Any] = []
    for e in epochs:
        metrics += record.epoch_metrics(
            "train", e["epoch"], e["loss"], e["val_acc"], e.get("lr", 0.0), e["ended_at"]
        )
    if metrics:
        safe.call("logging TRAIN metrics", safe.client.log_batch, run_id, metrics)
    if tag_winner:
        safe.call("tagging the winner", safe.client.set_tag, run_id, "qpacknet.winner", "true")


def finish_candidate(safe: SafeTracking, run_id: str, chunk: dict[str, Any]) -> None:
    safe.call(
        "closing a candidate run",
        safe.client.set_terminated,
        run_id,
        "FINISHED",
        end_time=record.ms(chunk["ended_at"]),
    )


def chunk_of(report: dict[str, Any], index: int) -> dict[str, Any]:
    """The SEARCH chunk that trained candidate ``index`` (reports from before chunks were
    recorded: the task's TRAIN start stands in)."""
    for chunk in report.get("search_chunks", []):
        if index in chunk["candidates"]:
            return chunk
    epochs = report.get("train_epochs") or [{"ended_at": report.get("committed_at", 0.0)}]
    at = float(epochs[0]["ended_at"])
    return {"candidates": [index], "started_at": at, "ended_at": at, "worker": None}


def snapshot_after(out_dir: Path, task: int, dst: Path) -> Path:
    """The run directory's files as they were right after ``task`` was committed: the model
    cut to ``task + 1`` tasks (bit-identical: committed words never change), and the
    checkpoint cut to match. Used to register a version that a live run could not."""
    from qpacknet.checkpoint import truncate
    from qpacknet.store import load_store, save_store

    dst.mkdir(parents=True, exist_ok=True)
    state = json.loads((out_dir / CHECKPOINT_FILE).read_text())
    n = task + 1
    save_store(truncate(load_store(out_dir / MODEL_FILE), n), dst / MODEL_FILE)
    cut = dict(state)
    for key in ("matrix", "val_matrix", "tasks"):
        if key in cut:
            cut[key] = cut[key][:n]
    (dst / CHECKPOINT_FILE).write_text(json.dumps(cut, indent=2) + "\n")
    shutil.copyfile(out_dir / CONFIG_FILE, dst / CONFIG_FILE)
    return dst


def log_model(
    safe: SafeTracking,
    experiment_id: str,
    run_id: str,
    task: int,
    snapshot: Path,
    input_shape: tuple[int, ...],
    parent_run_id: str,
) -> Any:
    """Log the packed model after ``task`` as an MLflow 3 logged model (listed in the run's
    Models column and the experiment's Models tab), an output of the task's run and of the
    whole run; returns the ``LoggedModel`` (None when tracking failed)."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    from qpacknet.tracking.pyfunc import save_packed_model

    client = safe.client
    logged = safe.call(
        "creating the logged model",
        client.create_logged_model,
        experiment_id,
        name=f"packed-after-task-{record.task_label(task)}",
        # the whole run: the runs table's Models column lists a run's models by this id, and
        # top-level rows are what a user sees first (the task's run lists it as an output)
        source_run_id=parent_run_id,
        tags={"qpacknet.tasks": str(task + 1)},
        model_type="qpacknet-packed",
    )
    if logged is None:
        return None
    model_dir = snapshot / "model"
    meta = Model(
        artifact_path=logged.artifact_location,
        model_uuid=logged.model_id,
        run_id=run_id,
        model_id=logged.model_id,
    )
    try:
        save_packed_model(model_dir, snapshot, input_shape, mlflow_model=meta)
    except Exception as exc:
        safe.fail("saving the pyfunc model", exc)
        return None
    safe.call("uploading the model", client.log_model_artifacts, logged.model_id, str(model_dir))
    for linked in (run_id, parent_run_id):  # the task's run and the whole run list it
        safe.call(
            "linking the model to its run",
            client.log_outputs,
            linked,
            [LoggedModelOutput(logged.model_id, step=task + 1)],
        )
    done = safe.call("finalising the model", client.finalize_logged_model, logged.model_id, "READY")
    return None if done is None else logged


def end_run(
    safe: SafeTracking,
    run_id: str,
    results: dict[str, Any],
    out_dir: Path,
    preset: str | None,
) -> None:
    """The parent run's final metrics, files, plots, tags and description; then FINISHED."""
    client = safe.client
    tp = results["throughput"]
    final = {
        "acc": results["acc"],
        "val_acc": results["val_acc"],
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
    ended = max((t.get("committed_at", 0.0) for t in results["tasks"]), default=0.0)
    safe.call(
        "logging final metrics",
        client.log_batch,
        run_id,
        record.metrics(final, record.ms(ended), len(results["tasks"])),
    )
    for name in (RESULTS_FILE, CONFIG_FILE, MODEL_FILE):
        path = out_dir / name
        if path.exists():
            safe.call("logging an artifact", client.log_artifact, run_id, str(path))
    with tempfile.TemporaryDirectory() as tmp:
        from qpacknet.tracking.plots import draw_all

        for png in draw_all(results, Path(tmp)):
            safe.call("logging a plot", client.log_artifact, run_id, str(png), "plots")
    ev = results.get("evaluation", {})
    devices = sorted({str(w.get("device_name")) for w in results.get("workers", {}).values()})
    note = record.run_note(results, results["scenario"], preset, str(out_dir.resolve()))
    for key, val in (
        ("qpacknet.evaluation_device", f"{ev.get('device')} ({ev.get('device_name')})"),
        ("qpacknet.evaluation_worker", f"{ev.get('host')}:{ev.get('pid')}"),
        ("qpacknet.worker_devices", ", ".join(devices)),
        ("qpacknet.workers", str(len(results.get("workers", {})))),
        ("mlflow.note.content", note),
    ):
        safe.call("tagging the run", client.set_tag, run_id, key, val)
    safe.call("closing the run", client.set_terminated, run_id, "FINISHED")


def register_version(
    safe: SafeTracking,
    name: str,
    model: Any,
    run_id: str,
    tags: dict[str, str],
    description: str,
    guard: Any = None,
) -> str | None:
    """Register ``model`` (a ``LoggedModel``) as the next version of ``name`` and move the
    ``champion`` alias to it. ``guard`` (a :class:`~qpacknet.tracking.registry.Lineage`):
    the compare-and-set checks around registering, which raise
    :class:`~qpacknet.tracking.registry.RegistryConflict` instead of forking the registry."""
    from qpacknet.tracking.registry import ALIAS, check_after_register, check_before_register

    client = safe.client
    if guard is not None and not safe.broken:
        _checked(safe, check_before_register, client, name, guard)
    mv = safe.call(
        "registering the model version",
        client.create_model_version,
        name,
        # its storage location, not models:/<id>: MLflow's SQL registry resolves those through
        # the process-wide tracking URI instead of this client's
        model.artifact_location,
        run_id=run_id,
        tags=tags,
        description=description,
        model_id=model.model_id,
    )
    if mv is None:
        return None
    version = str(mv.version)
    if guard is not None:
        _checked(safe, check_after_register, client, name, guard, version)
    safe.call("tagging the task run", client.set_tag, run_id, "model_version", version)
    safe.call(
        f"moving the {ALIAS!r} alias", client.set_registered_model_alias, name, ALIAS, version
    )
    return version


def _checked(safe: SafeTracking, check: Any, *args: Any) -> None:
    """A registry check: its conflict propagates; a failing server turns tracking off."""
    from qpacknet.tracking.registry import RegistryConflict

    try:
        check(*args)
    except RegistryConflict:
        raise
    except Exception as exc:
        safe.fail("checking the registry", exc)


def ensure_registered_model(safe: SafeTracking, name: str, scenario: str) -> bool:
    """The registered model exists (created with its description when it did not)."""
    from mlflow.exceptions import MlflowException

    client = safe.client
    model = safe.lookup("looking up the registered model", client.get_registered_model, name)
    if safe.broken:
        return False
    note = record.model_note(name, scenario)
    if model is None:
        try:
            client.create_registered_model(
                name, tags={"qpacknet.scenario": scenario}, description=note
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # else: another run created it
                safe.fail("creating the registered model", exc)
        except Exception as exc:
            safe.fail("creating the registered model", exc)
        return not safe.broken
    if not model.description:
        safe.call("describing the model", client.update_registered_model, name, note)
    return not safe.broken
