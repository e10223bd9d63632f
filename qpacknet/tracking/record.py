"""What a run's MLflow record holds, computed from the run's own data only.

The live tracker and ``qpacknet sync`` both build every name, tag, description and metric here,
from a task's report (``checkpoint.json``/``results.json``) and the accuracy matrix, with the
timestamps the run recorded (an epoch's end on its worker, a task's commit). So a record that
``sync`` completes later is the one the live tracker would have written, and writing an item
twice adds nothing: MLflow's SQL store skips a metric whose key, value, step and timestamp it
already holds.

Values shown in the MLflow UI are rounded to :data:`DIGITS` decimals (the run's files keep full
precision); tasks are numbered from 1 in run names and tags alike, as in the run's log.
"""

from __future__ import annotations

import math
from typing import Any

from qpacknet.quantize import report_widths

DIGITS = 4
EXPERIMENT_NOTE = (
    "qpacknet continual-learning runs (Ada-QPacknet: adaptive pruning and non-linear "
    "quantisation, several tasks packed into each 32-bit weight). Each top-level run learns "
    "a task stream; its child runs are the tasks (winner, bit-width, accuracies), and each "
    "task's children are the candidate sub-networks of its search. Every committed task is "
    "also registered as a model version."
)


def value(v: Any) -> float:
    """A metric value as MLflow should show it."""
    x = float(v)
    return round(x, DIGITS) if math.isfinite(x) else x


def ms(seconds: float) -> int:
    return int(seconds * 1000)


def metrics(values: dict[str, Any], ts_ms: int, step: int = 0) -> list[Any]:
    from mlflow.entities import Metric

    return [Metric(k, value(v), ts_ms, step) for k, v in values.items()]


def task_label(t: int) -> str:
    """Task ``t`` (0-based inside the run's files) as names and tags show it."""
    return str(t + 1)


def run_name(preset: str | None, scenario: str, out_name: str) -> str:
    """``<preset>-<out dir name>``, without repeating the preset when the directory's name
    already starts with it (``runs/pmnist-quick-<time>``)."""
    base = preset or scenario
    return out_name if out_name.startswith(base) else f"{base}-{out_name}"


def commit_ms(report: dict[str, Any]) -> int:
    """When the task was committed (reports from before this field: its training time)."""
    at = report.get("committed_at")
    if at is None:
        epochs = report.get("train_epochs") or [{}]
        at = epochs[-1].get("ended_at", 0.0)
    return ms(float(at))


def acc_bwt(matrix: list[list[float]], t: int) -> tuple[float, float]:
    """ACC and BWT after task ``t`` from the accuracy matrix's rows."""
    row = matrix[t]
    acc = sum(row[: t + 1]) / (t + 1)
    bwt = sum(row[j] - matrix[j][j] for j in range(t)) / t if t else 0.0
    return acc, bwt


def task_metrics(
    report: dict[str, Any], row: list[float], acc: float, bwt: float, capacity_pct: float
) -> list[Any]:
    """The task run's metrics (per-candidate and per-bit-width series as steps)."""
    from mlflow.entities import Metric

    rep = report
    values = {
        "bit_width": rep["bit_width"],
        "winner": rep["winner"],
        "float_val_acc": rep["float_acc"],
        "quant_val_acc": rep["quant_acc"],
        "task_capacity_pct": rep["capacity_pct"],
        "capacity_pct": capacity_pct,
        "acc": acc,
        "bwt": bwt,
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
    values.update({f"test_acc_task_{j + 1}": v for j, v in enumerate(row)})
    ts = commit_ms(rep)
    out = metrics(values, ts)
    for c in rep["candidates"]:
        out += [
            Metric("candidate_val_acc", value(c["acc"]), ts, c["index"]),
            Metric("candidate_sparsity", value(c["sparsity"]), ts, c["index"]),
            Metric("candidate_score", value(c["score"]), ts, c["index"]),
        ]
    for b in rep["bits_tried"]:
        if "widths" not in b:  # Algorithm 3's one-width trials; per-layer ones share a step
            out.append(Metric("quant_val_acc_by_bits", value(b["acc"]), ts, b["bits"]))
    return out


def task_params(report: dict[str, Any]) -> dict[str, str]:
    params = {"winner": str(report["winner"]), "bit_width": str(report["bit_width"])}
    widths = report.get("bit_widths") or {}
    if len(set(widths.values())) > 1:
        params.update({f"bit_width.{name}": str(w) for name, w in widths.items()})
    return params


def task_tags(report: dict[str, Any], row: list[float], parent_run_id: str) -> dict[str, str]:
    """Tags of task ``report["task"]``'s run (set at creation and again at commit)."""
    rep, t = report, report["task"]
    tags = {
        "mlflow.parentRunId": parent_run_id,
        "qpacknet.task": task_label(t),
        "qpacknet.commit_digest": rep.get("commit_digest", ""),
        "mlflow.note.content": task_note(rep, row),
    }
    if rep.get("quality_gate"):
        tags["qpacknet.quality_gate"] = rep["quality_gate"]
    if rep.get("when_full"):
        tags["qpacknet.when_full"] = rep["when_full"]
    for stage, where in rep.get("ran_on", {}).items():
        tags[f"qpacknet.ran_on.{stage}"] = ", ".join(where) if isinstance(where, list) else where
    return tags


def task_note(report: dict[str, Any], row: list[float]) -> str:
    rep, t = report, report["task"]
    win = next((c for c in rep["candidates"] if c["index"] == rep["winner"]), None)
    search = (
        f"candidate {rep['winner']} of {len(rep['candidates'])} won the search "
        f"(validation {win['acc']:.2f} %, sparsity {win['sparsity']:.3f})"
        if win
        else f"candidate {rep['winner']} won the search"
    )
    return (
        f"Task {t + 1}: {search}; trained to {rep['float_acc']:.2f} % validation accuracy, "
        f"quantised to {report_widths(rep)} bits ({rep['quant_acc']:.2f} %), test accuracy "
        f"{row[t]:.2f} %, {rep['capacity_pct']:.2f} % of the network's capacity"
        + (f", network {rep['network']}" if rep.get("network") else "")
        + "."
    )


def progress_metrics(
    report: dict[str, Any], acc: float, bwt: float, capacity_pct: float
) -> list[Any]:
    """The parent run's curves, one step per committed task."""
    values = {
        "acc": acc,
        "bwt": bwt,
        "capacity_pct": capacity_pct,
        "task_inference_acc": report["task_inference_acc"],
        "class_incremental_acc": report["class_incremental_acc"],
    }
    return metrics(values, commit_ms(report), report["task"] + 1)


def epoch_metrics(prefix: str, epoch: int, loss: float, acc: float, lr: float, ended_at: float):
    """One SEARCH or TRAIN epoch of a candidate, stamped with the epoch's end on its worker."""
    from mlflow.entities import Metric

    ts = ms(ended_at)
    return [
        Metric(f"{prefix}_loss", value(loss), ts, epoch),
        Metric(f"{prefix}_val_acc", value(acc), ts, epoch),
        Metric(f"{prefix}_lr", value(lr), ts, epoch),
    ]


WORKER_TAGS = ("node_id", "host", "pid", "device", "device_name")


def candidate_name(t: int, index: int) -> str:
    return f"task-{task_label(t)}-candidate-{index}"


def task_run_tags(parent_run_id: str, t: int, command: str) -> dict[str, str]:
    """A task run's tags at creation."""
    return {
        "mlflow.parentRunId": parent_run_id,
        "qpacknet.task": task_label(t),
        **origin_tags(command),
    }


def candidate_tags(
    task_run_id: str, t: int, index: int, worker: dict[str, Any], command: str
) -> dict:
    tags = {
        **origin_tags(command),
        "mlflow.parentRunId": task_run_id,
        "qpacknet.task": task_label(t),
        "qpacknet.candidate": str(index),
    }
    tags.update({f"qpacknet.worker.{k}": str(worker.get(k)) for k in WORKER_TAGS})
    return tags


def candidate_metrics(
    acc: float,
    sparsity: float,
    density: dict[str, float],
    epochs: list[list[float]],
    ended_at: float,
) -> list[Any]:
    """A candidate run's metrics after its SEARCH chunk (``epochs``: rows of
    ``[epoch, loss, val_acc, lr, ended_at]``)."""
    out = metrics({"val_acc": acc, "sparsity": sparsity}, ms(ended_at))
    out += metrics({f"density.{k}": v for k, v in density.items()}, ms(ended_at))
    for epoch, loss, val_acc, lr, at in epochs:
        out += epoch_metrics("search", int(epoch), loss, val_acc, lr, at)
    return out


def run_tags(
    preset: str | None,
    scenario: str,
    seed: int,
    executor: str,
    device: str,
    out_dir: str,
    command: str,
    extra: dict[str, str],
) -> dict[str, str]:
    """The parent run's tags at creation, ``Source`` and ``User`` included."""
    from qpacknet import __version__

    return {
        **origin_tags(command),
        "qpacknet.command": command,
        "qpacknet.preset": preset or "",
        "qpacknet.scenario": scenario,
        "qpacknet.seed": str(seed),
        "qpacknet.executor": executor,
        "qpacknet.device": device,
        "qpacknet.version": __version__,
        "qpacknet.out_dir": out_dir,
        "mlflow.note.content": (
            f"Learning the {scenario} stream ({preset or 'custom settings'}, seed {seed}) with "
            f"Ada-QPacknet on the {executor} executor ({device}); files in {out_dir}. "
            "The figures appear here when the run ends."
        ),
        **extra,
    }


def origin_tags(command: str) -> dict[str, str]:
    """``Created by`` and ``Source`` for every run of the record. The UI shows a source name
    from its last ``/`` on, so paths in the command are shortened to their last part (the
    whole command is the parent run's ``qpacknet.command`` tag)."""
    import getpass
    import os

    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        user = str(os.getuid())
    source = " ".join(tok.rstrip("/").rsplit("/", 1)[-1] for tok in command.split())
    return {
        "mlflow.user": user,
        "mlflow.source.name": source,
        "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_ID") else "LOCAL",
    }


def run_note(results: dict[str, Any], scenario: str, preset: str | None, out_dir: str) -> str:
    bits = " ".join(report_widths(t) for t in results["tasks"])
    nets = len(results.get("networks", [])) or 1
    return (
        f"{len(results['tasks'])} tasks of {scenario} ({preset or 'custom settings'}) learned "
        f"into {nets} packed network{'s' if nets > 1 else ''}: ACC {results['acc']:.2f} % "
        f"(validation {results['val_acc']:.2f} %), BWT {results['bwt']:.2f}, capacity "
        f"{results['capacity_pct']:.2f} %, bits per task {bits}; without task ids "
        f"{results['task_inference_acc']:.2f} % of inputs find their task. "
        f"{results['packed_bytes']:,} bytes packed; files in {out_dir}."
    )


def model_note(name: str, scenario: str) -> str:
    return (
        f"Packed qpacknet models of the {scenario} stream. Version N+1 holds version N's tasks "
        "bit for bit plus one more; each version names its parent version, the run that "
        "learned it, its preset and ACC. The alias 'champion' is the newest version. Serve "
        f"one with: mlflow models serve -m models:/{name}@champion --env-manager local"
    )


def version_tags(
    t: int, parent: str, run_id: str, run_name_: str, scenario: str, preset: str | None, acc: float
) -> dict[str, str]:
    from qpacknet.tracking.registry import PARENT_TAG

    return {
        "qpacknet.tasks": str(t + 1),
        PARENT_TAG: parent,
        "qpacknet.run_id": run_id,
        "qpacknet.run_name": run_name_,
        "qpacknet.scenario": scenario,
        "qpacknet.preset": preset or "",
        "qpacknet.acc": f"{acc:.2f}",
    }


def version_note(
    t: int, parent: str, run_name_: str, scenario: str, preset: str | None, acc: float
) -> str:
    origin = f"version {parent} plus task {t + 1}" if parent else f"tasks 1..{t + 1}"
    return (
        f"{t + 1} tasks of {scenario} ({preset or 'custom settings'}): {origin}, learned by "
        f"run {run_name_}; ACC {acc:.2f} % over the tasks it holds"
    )
