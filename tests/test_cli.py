"""The real entry point on tiny settings (like Mammoth's debug mode)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from qpacknet.config import preset_names
from qpacknet.model import PackedModel
from qpacknet.scenarios import PermutedDigits


def _qpacknet() -> list[str]:
    script = Path(sys.executable).parent / "qpacknet"
    if script.exists():
        return [str(script)]
    found = shutil.which("qpacknet")
    return [found] if found else [sys.executable, "-m", "qpacknet"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_qpacknet(), *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_digits_preset_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _run("run", "--preset", "digits", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "executor ray" in proc.stdout, "Ray is the default executor"
    assert "accuracy matrix" in proc.stdout and "BWT 0.00" in proc.stdout
    # the default population of 6 is split over the 2 actors this 2-CPU machine fits
    assert "task 4 SEARCH candidates 0-2 epoch 4/4" in proc.stdout
    assert "task 4 SEARCH candidates 3-5 epoch 4/4" in proc.stdout
    assert "class-incremental ACC" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["scenario"] == "digits" and len(res["tasks"]) == 4
    assert res["chunks"] == [[0, 1, 2], [3, 4, 5]]
    assert res["bwt"] == 0.0
    assert res["acc"] > 85.0
    assert 0 < res["capacity_pct"] < 100
    assert res["packed_bytes"] == (out / "model.safetensors").stat().st_size
    # the saved model reproduces the last row of the matrix
    stream = PermutedDigits(num_tasks=4, val_fraction=0.15, seed=0)
    model = PackedModel.load(out / "model.safetensors")
    last = [model.accuracy(j, stream.test_split(j)) for j in range(4)]
    assert last == res["accuracy_matrix"][-1]
    # re-running a finished run resumes after its last task: nothing is re-learned (the
    # executor may differ: where candidates train does not change what they learn)
    model_bytes = (out / "model.safetensors").read_bytes()
    again = _run(
        "run", "--preset", "digits", "--out", str(out), "--executor", "local", "--no-tracking"
    )
    assert again.returncode == 0, again.stderr
    assert "resuming after task 4" in again.stdout and " SEARCH done" not in again.stdout
    assert " start\n" not in again.stdout
    assert (out / "model.safetensors").read_bytes() == model_bytes
    res2 = json.loads((out / "results.json").read_text())
    assert res2["accuracy_matrix"] == res["accuracy_matrix"] and res2["tasks"] == res["tasks"]
    # task inference is recomputed from the packed model after the resume: same figures
    keys = ("task_inference_acc", "class_incremental_acc", "task_inference_per_task")
    assert [res2[k] for k in keys] == [res[k] for k in keys]
    assert 25.0 < res["class_incremental_acc"] <= res["task_inference_acc"] <= 100.0
    # other settings into the same dir are refused, and nothing is overwritten
    other = _run("run", "--preset", "digits", "--set", "search.population=3", "--out", str(out))
    assert other.returncode == 2 and "different configuration" in other.stderr
    assert "search" in other.stderr
    assert (out / "model.safetensors").read_bytes() == model_bytes


def test_foreign_model_file_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"precious")
    proc = _run("run", "--preset", "digits", "--out", str(tmp_path))
    assert proc.returncode == 2 and "already holds a model" in proc.stderr
    assert (tmp_path / "model.safetensors").read_bytes() == b"precious"


def test_missing_mnist_offline_says_what_to_put_where(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    proc = _run(
        "run",
        "--preset",
        "pmnist-quick",
        "--data-dir",
        str(blocker / "data"),
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        assert name in proc.stderr
    assert "MNIST/raw" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_presets_and_config_commands() -> None:
    proc = _run("presets")
    assert proc.returncode == 0 and proc.stdout.split() == preset_names()
    assert {"cifar100", "five_datasets-quick", "tinyimagenet", "imagenet100-quick"} <= set(
        proc.stdout.split()
    )
    proc = _run("config", "--preset", "pmnist", "--set", "search.population=4")
    assert proc.returncode == 0 and "population: 4" in proc.stdout


def test_predict_matches_logits_argmax(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert (
        _run(
            "run",
            "--preset",
            "digits",
            "--set",
            "scenario.num_tasks=2",
            "--out",
            str(out),
            "--quiet",
            "--executor",
            "local",
        ).returncode
        == 0
    )
    model = PackedModel.load(out / "model.safetensors")
    x = PermutedDigits(num_tasks=2, val_fraction=0.15).test_split(1).x
    assert torch.equal(model.predict(1, x), model.logits(1, x).argmax(-1))


def test_add_task_job_extends_a_run_like_a_longer_run(tmp_path: Path) -> None:
    short, full = tmp_path / "short", tmp_path / "full"
    base = ["run", "--preset", "digits", "--quiet", "--executor", "local", "--no-tracking"]
    assert _run(*base, "--set", "scenario.num_tasks=2", "--out", str(short)).returncode == 0
    x = PermutedDigits(num_tasks=2, val_fraction=0.15).test_split(0).x
    before = PackedModel.load(short / "model.safetensors").logits(0, x)
    add = subprocess.run(
        [sys.executable, "jobs/add_task.py", "--out", str(short), "--executor", "local"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert add.returncode == 0, add.stderr
    assert "resuming after task 2" in add.stdout and "task 3/3 committed" in add.stdout
    assert _run(*base, "--set", "scenario.num_tasks=3", "--out", str(full)).returncode == 0
    extended = PackedModel.load(short / "model.safetensors")
    assert extended.num_tasks == 3
    assert torch.equal(extended.logits(0, x), before)
    a = json.loads((short / "results.json").read_text())
    b = json.loads((full / "results.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert [t["winner"] for t in a["tasks"]] == [t["winner"] for t in b["tasks"]]
    assert (short / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    missing = subprocess.run(
        [sys.executable, "jobs/add_task.py", "--out", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert missing.returncode == 2 and "holds no qpacknet run" in missing.stderr
