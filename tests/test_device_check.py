"""The GPU device check (bench/device_check.py) runs end to end here, on the CPU, in smoke mode,
so that the one short lease of a GPU machine is not spent finding a broken script."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.py"


def _run(tmp_path: Path, *extra: str, timeout: float = 120) -> tuple[int, float, dict[str, Any]]:
    out = tmp_path / "device-check.json"
    empty = tmp_path / "no-mnist"  # no MNIST here: the check must fall back to synthetic data
    empty.mkdir()
    cmd = [sys.executable, str(SCRIPT), "--json", str(out), "--data-dir", str(empty), *extra]
    cmd += ["--work-dir", str(tmp_path / "work")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    assert out.is_file(), f"no JSON written\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.returncode, wall, json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_run_on_cpu_passes_every_check(tmp_path: Path) -> None:
    rc, wall, rep = _run(tmp_path, "--device", "cpu", "--smoke")
    failed = {k: v for k, v in rep["checks"].items() if not v["passed"]}
    assert rc == 0, (failed, rep["errors"])
    assert wall < 90, f"smoke run took {wall:.0f}s"
    assert rep["passed"] and rep["complete"] and not rep["errors"] and not failed
    assert rep["device"] == "cpu" and rep["mode"] == "smoke"

    checks = rep["checks"]
    for name in (
        "population_ran",
        "pmnist_ran",
        "cifar100_ran",
        "pmnist_bwt_zero",
        "cifar100_bwt_zero",
        "pmnist_commits",
        "cifar100_commits",
        "pmnist_model_reload",
        "cifar100_model_reload",
        "pmnist_device",
        "cifar100_device",
        "no_ray_mlflow",
    ):
        assert checks[name]["passed"], name
    assert rep["imports"]["ray"] is False and rep["imports"]["mlflow"] is False
    assert rep["imports"]["forbidden_modules_loaded"] == []

    assert rep["mnist"]["real"] is False and "synthetic" in rep["mnist"]["note"]
    assert rep["environment"]["torch"] == torch.__version__
    assert rep["environment"]["hardware"]["device"] == "cpu"
    for part in ("population", "pmnist", "cifar100"):
        assert rep["seconds"][part] > 0
    assert rep["seconds"]["total"] >= sum(rep["seconds"][p] for p in rep["parts"])

    pop = rep["parts"]["population"]
    assert set(pop["summary"]) == {"mlp", "alexnet"}
    for ratios in pop["summary"].values():
        assert all(r > 0 for r in ratios.values())
    for res in pop["backbones"].values():
        for fig in res["layouts"].values():
            assert fig["max_val_acc_difference_points"] >= 0

    pm = rep["parts"]["pmnist"]
    assert pm["bwt"] == 0.0 and pm["device_used"] == "cpu"
    assert pm["tasks_learned"] == len(pm["per_task"]) == 2
    assert [len(r) for r in pm["accuracy_matrix"]] == [1, 2]
    for t, task in enumerate(pm["per_task"]):
        assert task["task"] == t and task["bit_width"] >= 1
        assert task["accuracy_row"] == pm["accuracy_matrix"][t]
        assert {"search", "train", "quantize", "commit"} <= set(task["seconds"])
        assert task["candidate_epochs_per_second"] > 0
    assert [s["tasks"] for s in pm["steps"]] == [1, 2]

    cf = rep["parts"]["cifar100"]
    assert cf["bwt"] == 0.0 and cf["device_used"] == "cpu"
    assert len(cf["per_task"]) == 2 and cf["preset"] == "cifar100-quick"
    assert cf["data"]["train_per_class"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_failure_still_writes_the_json_and_exits_non_zero(tmp_path: Path) -> None:
    rc, _, rep = _run(tmp_path, "--device", "cuda", "--smoke", timeout=60)
    assert rc == 1
    assert rep["passed"] is False
    assert rep["checks"]["setup"]["passed"] is False
    assert "no CUDA device" in rep["errors"]["setup"]["message"]
    assert "Traceback" in rep["errors"]["setup"]["traceback"]
