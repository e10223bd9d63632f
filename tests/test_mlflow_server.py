"""Against a real ``mlflow server``: the digits preset with the Ray executor, then the run
hierarchy, metrics, artifacts and registered model checked with ``MlflowClient``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from qpacknet.model import PackedModel
from qpacknet.scenarios import PermutedDigits
from qpacknet.tracking.server import mlflow_server

FAST = ["--set", "search.epochs=2", "--set", "train.epochs=4"]


def test_digits_on_ray_logged_to_a_real_server(tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    with mlflow_server(tmp_path) as uri:
        out = tmp_path / "run"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "qpacknet", "run", "--preset", "digits", "--quiet"]
        proc = subprocess.run(
            [*cmd, "--set", "scenario.num_tasks=2", *FAST, "--executor", "ray", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"open it at {uri}" in proc.stdout
        assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
        res = json.loads((out / "results.json").read_text())
        assert not (out / "mlflow.db").exists(), "a server URI must not create a local store"

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.get_experiment_by_name("qpacknet")
        runs = client.search_runs([exp.experiment_id], max_results=200)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1
        parent = parents[0]
        assert parent.data.tags["qpacknet.executor"] == "ray"
        assert parent.data.metrics["acc"] == round(res["acc"], 4)
        assert parent.data.metrics["capacity_pct"] == round(res["capacity_pct"], 4)
        tasks = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(tasks) == 2
        for task_run in tasks:
            t = int(task_run.data.tags["qpacknet.task"]) - 1
            assert task_run.data.metrics["bit_width"] == res["tasks"][t]["bit_width"]
            cands = [
                r for r in runs if r.data.tags.get("mlflow.parentRunId") == task_run.info.run_id
            ]
            assert len(cands) == 6
            # logged by the driver, naming the Ray actors that trained them
            trainers = {c.data.tags["qpacknet.worker.pid"] for c in cands}
            assert parent.data.tags["qpacknet.pid"] not in trainers
            for c in cands:
                report = res["tasks"][t]["candidates"][int(c.data.tags["qpacknet.candidate"])]
                worker = res["workers"][report["worker"]]
                assert c.data.tags["qpacknet.worker.pid"] == str(worker["pid"])
                assert c.data.tags["qpacknet.worker.node_id"] == worker["node_id"]
            accs = {
                int(c.data.tags["qpacknet.candidate"]): c.data.metrics["val_acc"] for c in cands
            }
            assert accs == {c["index"]: round(c["acc"], 4) for c in res["tasks"][t]["candidates"]}
        arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"results.json", "config.yaml", "model.safetensors", "plots"} <= arts
        assert any((tmp_path / "artifacts").rglob("accuracy_matrix.png"))

        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            model = mlflow.pyfunc.load_model("models:/qpacknet-digits/2")
        finally:
            mlflow.set_tracking_uri(None)  # it also set $MLFLOW_TRACKING_URI for this process
            mlflow.set_registry_uri(None)
        packed = PackedModel.load(out / "model.safetensors")
        stream = PermutedDigits(num_tasks=2, val_fraction=0.15)
        for task in (0, 1):
            x = stream.test_split(task).x
            got = model.predict(x.numpy(), params={"task": task})
            assert np.array_equal(got, packed.predict(task, x).numpy())
