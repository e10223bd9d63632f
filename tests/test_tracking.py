"""MLflow tracking on the embedded sqlite store: run hierarchy, metrics equal to results.json,
artifacts, registered pyfunc versions, resume, ``qpacknet learn``, and a dead server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qpacknet.cli import main
from qpacknet.model import PackedModel
from qpacknet.scenarios import PermutedDigits

NAME = "qpacknet-digits"
TINY = ["--set", "scenario.num_tasks=2", "--executor", "local", "--quiet"]


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _pyfunc(uri: str, model_uri: str) -> Any:
    """Load through the registry; MLflow's global URIs (which also set $MLFLOW_TRACKING_URI)
    are reset afterwards so that later runs in this process use their own stores."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def _test_x(task: int) -> torch.Tensor:
    return PermutedDigits(num_tasks=3, val_fraction=0.15).test_split(task).x


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One 2-task digits run with tracking on defaults (no URI set: sqlite in --out)."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path_factory.mktemp("tracked") / "run"
    rc = main(["run", "--preset", "digits", *TINY, "--out", str(out)])
    assert rc == 0
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    yield {"out": out, "uri": uri, "results": json.loads((out / "results.json").read_text())}
    mp.undo()


def _runs(uri: str) -> tuple[object, list, dict[str, list]]:
    client = _client(uri)
    exp = client.get_experiment_by_name("qpacknet")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children: dict[str, list] = {}
    for r in runs:
        p = r.data.tags.get("mlflow.parentRunId")
        if p:
            children.setdefault(p, []).append(r)
    return client, parents, children


def test_hierarchy_metrics_and_artifacts_match_results(run: dict, capsys) -> None:
    res, uri = run["results"], run["uri"]
    client, parents, children = _runs(uri)
    assert len(parents) == 1
    parent = parents[0]
    tags = parent.data.tags
    assert tags["qpacknet.preset"] == "digits" and tags["qpacknet.seed"] == "0"
    assert tags["qpacknet.executor"] == "local" and tags["qpacknet.version"]
    # what the MLflow UI shows: a name that says the preset once, Source, User, a description
    assert parent.info.run_name == "digits-run"
    assert tags["mlflow.source.name"].startswith("qpacknet run --preset digits")
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    note = tags["mlflow.note.content"]
    assert f"ACC {res['acc']:.2f} %" in note and "2 tasks of digits (digits)" in note
    exp = client.get_experiment_by_name("qpacknet")
    assert "candidate sub-networks" in exp.tags["mlflow.note.content"]
    assert parent.data.params["search.population"] == "6"
    assert parent.data.params["train.epochs"] == "12"
    m = parent.data.metrics
    r4 = lambda v: round(v, 4)  # noqa: E731 (values are shown rounded to 4 decimals)
    assert m["acc"] == r4(res["acc"]) and m["bwt"] == r4(res["bwt"])
    assert m["capacity_pct"] == r4(res["capacity_pct"]) and m["packed_bytes"] == res["packed_bytes"]
    assert m["task_inference_acc"] == r4(res["task_inference_acc"])
    assert m["class_incremental_acc"] == r4(res["class_incremental_acc"])
    assert parent.info.status == "FINISHED"
    # the run lists the model after each task (the runs page's Models column)
    assert sorted(o.step for o in client.get_run(parent.info.run_id).outputs.model_outputs) == [
        1,
        2,
    ]

    tasks = sorted(children[parent.info.run_id], key=lambda r: r.info.run_name)
    assert [t.info.run_name for t in tasks] == ["task-1", "task-2"]
    assert [t.data.tags["qpacknet.task"] for t in tasks] == ["1", "2"]
    for t, (task_run, rep) in enumerate(zip(tasks, res["tasks"], strict=True)):
        tm = task_run.data.metrics
        assert tm["bit_width"] == rep["bit_width"] and tm["winner"] == rep["winner"]
        assert tm["quant_val_acc"] == r4(rep["quant_acc"])
        assert tm["float_val_acc"] == r4(rep["float_acc"])
        assert tm["test_acc_task_1"] == r4(res["accuracy_matrix"][t][0])
        assert tm["task_inference_acc"] == r4(rep["task_inference_acc"])
        assert (
            f"Task {t + 1}: candidate {rep['winner']} of 6 won"
            in task_run.data.tags["mlflow.note.content"]
        )
        hist = client.get_metric_history(task_run.info.run_id, "candidate_val_acc")
        assert sorted((h.step, h.value) for h in hist) == [
            (c["index"], r4(c["acc"])) for c in rep["candidates"]
        ]
        # the packed model after this task is an MLflow 3 logged model of the task's run
        assert task_run.data.tags["mlflow.user"] == tags["mlflow.user"]
        assert "/" not in task_run.data.tags["mlflow.source.name"]
        outputs = client.get_run(task_run.info.run_id).outputs.model_outputs
        assert len(outputs) == 1 and outputs[0].step == t + 1
        logged = client.get_logged_model(outputs[0].model_id)
        assert logged.source_run_id == parent.info.run_id and logged.status.to_proto() == 2
        cands = children[task_run.info.run_id]
        assert len(cands) == 6
        by_index = {int(c.data.tags["qpacknet.candidate"]): c for c in cands}
        for c in rep["candidates"]:
            crun = by_index[c["index"]]
            assert crun.data.tags["qpacknet.task"] == str(t + 1)
            assert crun.info.run_name == f"task-{t + 1}-candidate-{c['index']}"
            assert crun.data.metrics["val_acc"] == r4(c["acc"])
            assert crun.data.metrics["sparsity"] == r4(c["sparsity"])
            losses = client.get_metric_history(crun.info.run_id, "search_loss")
            assert [h.step for h in sorted(losses, key=lambda h: h.step)] == [1, 2, 3, 4]
            # the run spans the SEARCH chunk that trained the candidate
            chunk = next(k for k in rep["search_chunks"] if c["index"] in k["candidates"])
            assert crun.info.start_time == int(chunk["started_at"] * 1000)
            assert crun.info.end_time == int(chunk["ended_at"] * 1000)
            ends = [int(e[4] * 1000) for e in c["epochs"]]
            assert crun.info.start_time < ends[0] and ends[-1] <= crun.info.end_time
        winner = by_index[rep["winner"]]
        assert winner.data.tags.get("qpacknet.winner") == "true"
        train = client.get_metric_history(winner.info.run_id, "train_val_acc")
        assert len(train) == 12

    versions = {int(v.version): v for v in client.search_model_versions(f"name='{NAME}'")}
    for number, v in versions.items():
        assert v.tags["qpacknet.tasks"] == str(number)
        assert v.tags["qpacknet.parent_version"] == ("" if number == 1 else str(number - 1))
        assert v.tags["qpacknet.run_id"] == parent.info.run_id
        assert v.tags["qpacknet.run_name"] == "digits-run"
        assert v.tags["qpacknet.scenario"] == "digits" and v.tags["qpacknet.preset"] == "digits"
        assert v.tags["qpacknet.acc"] == f"{sum(res['accuracy_matrix'][number - 1]) / number:.2f}"
        assert f"{number} tasks of digits (digits)" in v.description
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert "alias 'champion' is the newest version" in client.get_registered_model(NAME).description

    arts = {a.path: a for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "config.yaml", "model.safetensors", "plots"} <= set(arts)
    plots = client.list_artifacts(parent.info.run_id, "plots")
    assert {p.path for p in plots} == {
        "plots/accuracy_matrix.png",
        "plots/bits_capacity.png",
        "plots/candidate_scores.png",
    }
    assert all(p.file_size > 1000 for p in plots)
    local = client.download_artifacts(parent.info.run_id, "results.json", str(run["out"] / "dl"))
    assert json.loads(Path(local).read_text())["acc"] == res["acc"]


def test_every_task_registers_a_version_that_predicts_like_the_packed_model(run: dict) -> None:
    uri, out = run["uri"], run["out"]
    versions = _client(uri).search_model_versions(f"name='{NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    packed = PackedModel.load(out / "model.safetensors")
    latest = _pyfunc(uri, f"models:/{NAME}/2")
    for task in (0, 1):
        x = _test_x(task)
        got = latest.predict(x.numpy(), params={"task": task})
        assert np.array_equal(got, packed.predict(task, x).numpy())
    first = _pyfunc(uri, f"models:/{NAME}/1")
    x0 = _test_x(0)
    assert np.array_equal(first.predict(x0.numpy(), params={"task": 0}), packed.predict(0, x0))
    with pytest.raises(Exception, match=r"params.task=1: this model holds tasks 0..0"):
        first.predict(x0.numpy(), params={"task": 1})


def test_learn_adds_a_task_as_the_next_version_and_keeps_old_tasks(
    run: dict, tmp_path: Path, capsys
) -> None:
    uri = run["uri"]
    out = tmp_path / "learned"
    learn = ["learn", "--model", f"models:/{NAME}/latest", "--tracking-uri", uri]
    rc = main([*learn, "--out", str(out), "--executor", "local", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert f"learning task 3 on top of models:/{NAME}/latest ({NAME} version 2" in printed
    assert "versions 3" in printed
    before = PackedModel.load(run["out"] / "model.safetensors")
    after = PackedModel.load(out / "model.safetensors")
    assert after.num_tasks == 3
    for task in (0, 1):
        x = _test_x(task)
        assert torch.equal(after.logits(task, x), before.logits(task, x))
    v3 = _pyfunc(uri, f"models:/{NAME}/3")
    x2 = _test_x(2)
    assert np.array_equal(v3.predict(x2.numpy(), params={"task": 2}), after.predict(2, x2))
    res = json.loads((out / "results.json").read_text())
    assert res["accuracy_matrix"][:2] == run["results"]["accuracy_matrix"]

    v3 = ["learn", "--model", f"models:/{NAME}/3", "--tracking-uri", uri]
    bad = main([*v3, "--set", "net.hidden=[8]", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert bad == 2 and "net is" in err and "can only grow with the settings" in err
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    missing = main(["learn", "--model", "models:/no-such-model/1", "--tracking-uri", uri])
    assert missing == 2 and "cannot load models:/no-such-model/1" in capsys.readouterr().err


def test_resume_continues_the_same_mlflow_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "r"
    base = ["run", "--preset", "digits", "--executor", "local", "--quiet", "--out", str(out)]
    assert main([*base, "--set", "scenario.num_tasks=1"]) == 0
    first = json.loads((out / "mlflow.json").read_text())
    assert main([*base, "--set", "scenario.num_tasks=2"]) == 0
    second = json.loads((out / "mlflow.json").read_text())
    assert second["run_id"] == first["run_id"]
    assert sorted(second["task_runs"]) == ["0", "1"]
    assert second["model_versions"] == {"0": "1", "1": "2"}
    _, parents, children = _runs(f"sqlite:///{(out / 'mlflow.db').resolve()}")
    assert len(parents) == 1 and len(children[parents[0].info.run_id]) == 2
    assert parents[0].info.status == "FINISHED"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_costs_one_warning_and_the_run_completes(tmp_path: Path) -> None:
    """A closed port: the run finishes with all files on disk. The per-run HTTP settings bound
    the time lost (MLflow's defaults, 7 retries with growing backoff and 120 s timeouts,
    would stall for minutes; the 120 s limit here only catches that regression)."""
    out = tmp_path / "run"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_closed_port()}",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "qpacknet", "run", "--preset", "digits", *TINY, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("MLflow tracking at http://127.0.0.1:") == 1, proc.stderr
    assert "tracking is off for the rest of this run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "was not (fully) available; the results are complete in" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert len(res["tasks"]) == 2
    assert (out / "model.safetensors").stat().st_size == res["packed_bytes"]
