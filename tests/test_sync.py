"""``qpacknet sync``: a tracking server that dies mid-run leaves no permanent hole.

A real ``mlflow server`` is killed (SIGKILL) right after task 1 of 4 is committed; the run
finishes with tracking off. After the server is back on the same store, ``sync`` adds what is
missing, and the record then equals that of an undisturbed run of the same settings (run
hierarchy, names, tags, metrics and their histories, model versions and their parents). A
second ``sync`` adds nothing. A resumed run whose tracking had failed catches up by itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qpacknet.cli import main
from qpacknet.tracking.server import free_port, mlflow_server

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "--preset", "digits", "--executor", "local", "--quiet",
    "--set", "search.population=3", "--set", "search.epochs=2", "--set", "train.epochs=3",
    "--set", "threads=1",
]  # fmt: skip
TIMING = ("seconds", "training_seconds", "candidate_epochs_per_second")


def _record(uri: str, experiment: str, model: str) -> dict[str, Any]:
    """The record's content without what differs between two identical runs (ids, clock
    times, durations): names, tags, metrics with their histories, versions."""
    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_id = {r.info.run_id: r for r in runs}
    keep = ("qpacknet.task", "qpacknet.candidate", "qpacknet.winner", "qpacknet.commit_digest")

    def path(r: Any) -> str:
        parent = r.data.tags.get("mlflow.parentRunId")
        return f"{path(by_id[parent])}/{r.info.run_name}" if parent else "top"

    out: dict[str, Any] = {}
    for r in runs:
        metrics = {
            k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k))
            for k in r.data.metrics
            if not k.startswith(TIMING)
        }
        out[path(r)] = {
            "status": r.info.status,
            "tags": {k: v for k, v in r.data.tags.items() if k in keep},
            "metrics": metrics,
            "params": {k: v for k, v in r.data.params.items() if not k.startswith("tracking.")},
            "models": len(r.outputs.model_outputs) if r.outputs else 0,
            "artifacts": sorted(a.path for a in client.list_artifacts(r.info.run_id)),
        }
    out["versions"] = sorted(
        (
            int(v.version),
            v.tags["qpacknet.tasks"],
            v.tags["qpacknet.parent_version"],
            v.tags["qpacknet.acc"],
        )
        for v in client.search_model_versions(f"name = '{model}'")
    )
    return out


def test_sync_fills_the_hole_a_killed_server_left(tmp_path: Path, capsys) -> None:
    root, port = tmp_path / "server", free_port()
    root.mkdir()
    with mlflow_server(root, port=port, kill=True) as uri:
        reference = [*SETTINGS, "--tracking-uri", uri, "--out", str(tmp_path / "reference")]
        ref = ["--set", "tracking.experiment=undisturbed"]
        ref += ["--set", "tracking.registered_model=reference"]
        assert main(["run", *reference, *ref]) == 0
        out = tmp_path / "disturbed"
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "qpacknet", "run", *SETTINGS, "--tracking-uri", uri,
             "--out", str(out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            if "task 1/4 committed" in line:
                break
    # the server is gone (SIGKILL) while tasks 2..4 train
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "tracking is off for the rest of this run" in err
    assert "task 4/4 committed" in rest
    capsys.readouterr()

    with mlflow_server(root, port=port) as uri:
        hole = _record(uri, "qpacknet", "qpacknet-digits")
        expected = _record(uri, "undisturbed", "reference")
        assert hole != expected and len(hole["versions"]) < 4
        assert main(["sync", "--out", str(out)]) == 0  # the run's own URI, from mlflow.json
        said = capsys.readouterr().out
        assert f"MLflow record of {out}: added " in said and "model version" in said
        synced = _record(uri, "qpacknet", "qpacknet-digits")
        assert synced == expected
        assert [v[2] for v in synced["versions"]] == ["", "1", "2", "3"]

        assert main(["sync", "--out", str(out)]) == 0
        assert "nothing was missing" in capsys.readouterr().out
        assert _record(uri, "qpacknet", "qpacknet-digits") == expected
        state = json.loads((out / "mlflow.json").read_text())
        assert state["model_versions"] == {"0": "1", "1": "2", "2": "3", "3": "4"}

    # the server is down for good: sync says so and exits 2
    assert main(["sync", "--out", str(out), "--tracking-uri", uri]) == 2
    assert "is not reachable" in capsys.readouterr().err


def test_a_resumed_run_catches_up_on_its_own(tmp_path: Path, monkeypatch, capsys) -> None:
    """Tasks 1-2 ran with tracking failing (a closed port); resumed on a working store, the
    run adds them before it learns task 3, with the versions' parents chained."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    base = ["run", *SETTINGS, "--out", str(out)]
    dead = f"http://127.0.0.1:{free_port()}"
    assert main([*base, "--set", "scenario.num_tasks=2", "--tracking-uri", dead]) == 0
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert main([*base, "--set", "scenario.num_tasks=3", "--tracking-uri", store]) == 0
    client = MlflowClient(store, store)
    exp = client.get_experiment_by_name("qpacknet")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    tasks = sorted(r.info.run_name for r in runs if r.info.run_name.startswith("task-")
                   and "candidate" not in r.info.run_name)  # fmt: skip
    assert tasks == ["task-1", "task-2", "task-3"]
    assert sum("candidate" in r.info.run_name for r in runs) == 9
    versions = client.search_model_versions("name = 'qpacknet-digits'")
    chain = sorted((int(v.version), v.tags["qpacknet.parent_version"]) for v in versions)
    assert chain == [(1, ""), (2, "1"), (3, "2")]
    assert main(["sync", "--out", str(out)]) == 0
    assert "nothing was missing" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["missing", "damaged"])
def test_sync_refuses_what_is_not_a_run(tmp_path: Path, capsys, what: str) -> None:
    out = tmp_path / "d"
    out.mkdir()
    if what == "damaged":
        (out / "checkpoint.json").write_text("{not json")
    assert main(["sync", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert ("holds no qpacknet run" if what == "missing" else "is damaged") in err
