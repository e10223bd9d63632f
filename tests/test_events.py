"""Workers report events as they happen and know nothing of MLflow (issue 10, point 1); the
population is spread over the workers by default (point 5)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qpacknet.events import EpochEnded, StageDone, drive
from qpacknet.executor import chunks
from qpacknet.train import EpochReport
from qpacknet.worker import TaskContext

REPO = Path(__file__).resolve().parents[1]
WORKER_SIDE = [
    "qpacknet/worker.py",
    "qpacknet/method.py",
    "qpacknet/capacity_policy.py",
    "qpacknet/executor.py",
    "qpacknet/events.py",
    "qpacknet/evaluation.py",
    "qpacknet/train.py",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "qpacknet/cluster").glob("*.py")),
]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("rel", WORKER_SIDE)
def test_worker_side_imports_nothing_of_tracking(rel: str) -> None:
    bad = {m for m in _imports(REPO / rel) if m.startswith(("qpacknet.tracking", "mlflow"))}
    assert not bad, f"{rel} imports {bad}: only the driver writes MLflow"


def test_task_context_carries_no_tracking() -> None:
    fields = {f.name for f in dataclasses.fields(TaskContext)}
    assert not {f for f in fields if "track" in f}, fields


@pytest.mark.parametrize(
    ("population", "per_worker", "workers", "expected"),
    [
        (16, None, 1, [list(range(16))]),
        (16, None, 2, [list(range(8)), list(range(8, 16))]),
        (16, None, 3, [list(range(6)), list(range(6, 11)), list(range(11, 16))]),
        (3, None, 8, [[0], [1], [2]]),
        (6, 4, 2, [[0, 1, 2, 3], [4, 5]]),
    ],
)
def test_population_spreads_evenly_unless_a_chunk_size_is_set(
    population: int, per_worker: int | None, workers: int, expected: list[list[int]]
) -> None:
    assert chunks(population, per_worker, workers) == expected


def test_drive_passes_every_event_on_in_order_and_returns_the_result() -> None:
    rep = EpochReport("train", 1, 2, 0.1, [0.5], [90.0], 0.1, 0.0)
    events = [
        EpochEnded(0, (3,), rep, 1.0, {"host": "h", "pid": 1}),
        EpochEnded(0, (3,), rep, 2.0, {"host": "h", "pid": 1}),
        StageDone("train", 0, (3,), "outcome", 0.5, 2.5, {"host": "h", "pid": 1}),
    ]
    seen: list[object] = []
    assert drive(iter(events), seen.append) == "outcome"
    assert seen == events
    with pytest.raises(RuntimeError, match="without reporting its result"):
        drive(iter(events[:2]), None)


def test_ray_run_prints_each_train_epoch_before_the_next_one_ends(tmp_path: Path) -> None:
    """The real entry point on an embedded Ray: each TRAIN epoch line reaches stdout (arrival
    time read here, not the printed stamp) before the worker ends the next epoch; the
    population is split over both actors; evaluation ran on an actor."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "qpacknet",
        "run",
        "--preset",
        "digits",
        "--executor",
        "ray",
        "--no-tracking",
        "--out",
        str(out),
        "--set",
        "scenario.num_tasks=1",
        "--set",
        "train.epochs=5",
        "--set",
        "train.batch_size=8",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )
    assert proc.stdout is not None
    arrivals: dict[int, float] = {}
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if " TRAIN candidate " in line and " epoch " in line:
            epoch = int(line.split(" epoch ")[1].split("/")[0])
            arrivals[epoch] = time.time()
    assert proc.wait(timeout=300) == 0, "".join(lines[-30:])
    res = json.loads((out / "results.json").read_text())
    ended = {e["epoch"]: e["ended_at"] for e in res["tasks"][0]["train_epochs"]}
    assert sorted(arrivals) == sorted(ended) == [1, 2, 3, 4, 5]
    for epoch in range(1, 5):
        assert arrivals[epoch] < ended[epoch + 1], (epoch, arrivals, ended)
    assert res["event_latency_s"]["events"] == 4 * 2 + 5  # 2 chunks x 4 SEARCH epochs + TRAIN
    assert res["chunks"] == [[0, 1, 2], [3, 4, 5]]
    assert len(res["tasks"][0]["ran_on"]["search"]) == 2
    assert res["evaluation"]["pid"] != proc.pid
    assert f"{res['evaluation']['host']}:{res['evaluation']['pid']}" in res["workers"]
