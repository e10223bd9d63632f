"""The user's own stream (one .npz per task): splits, checks with clear errors, and the whole
path from ``qpacknet run`` to ``qpacknet learn`` adding a task from a new file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qpacknet.cli import main
from qpacknet.config import load_config
from qpacknet.errors import ConfigError, DataError
from qpacknet.model import PackedModel
from qpacknet.scenarios import NpzStream, PermutedDigits, build_stream
from tests.helpers import learn_one_more_task


def _write_digits_tasks(root: Path, n: int, with_test: bool = True) -> None:
    """Permuted-digits tasks saved as the user would: train arrays plus a test split."""
    root.mkdir(parents=True, exist_ok=True)
    stream = PermutedDigits(num_tasks=n, seed=11)
    for t in range(n):
        d = stream.task(t)
        x = torch.cat([d.train.x, d.val.x]).numpy()
        y = torch.cat([d.train.y, d.val.y]).numpy()
        arrays = {"x": x, "y": y}
        if with_test:
            arrays |= {"x_test": d.test.x.numpy(), "y_test": d.test.y.numpy()}
        np.savez(root / f"task-{t:03d}.npz", **arrays)


def test_splits_are_held_out_when_absent_and_uint8_is_scaled(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(200, 4, 4), dtype=np.uint8)
    y = np.arange(200) % 5
    np.savez(tmp_path / "a.npz", x=x, y=y)
    stream = NpzStream(tmp_path, num_tasks=1, val_fraction=0.1, seed=3)
    assert stream.input_shape == (4, 4) and stream.num_classes == 5
    task = stream.task(0)
    assert (len(task.train), len(task.val), len(task.test)) == (162, 18, 20)
    assert task.train.x.dtype == torch.float32 and float(task.train.x.max()) <= 1.0
    again = NpzStream(tmp_path, num_tasks=1, val_fraction=0.1, seed=3).task(0)
    assert torch.equal(again.val.x, task.val.x), "held-out rows depend on the seed only"
    assert torch.equal(stream.test_split(0).y, task.test.y)


def test_given_validation_and_test_arrays_are_used(tmp_path: Path) -> None:
    x = np.ones((30, 3), np.float32)
    y = np.arange(30) % 3
    np.savez(tmp_path / "t.npz", x=x, y=y, x_val=x[:6], y_val=y[:6], x_test=x[:9], y_test=y[:9])
    task = NpzStream(tmp_path, num_tasks=1).task(0)
    assert (len(task.train), len(task.val), len(task.test)) == (30, 6, 9)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.ones((10, 3)), "y": np.arange(9) % 2}, "x has 10 inputs but 9 labels"),
        ({"x": np.ones((10, 3)), "y": np.arange(10) - 1}, "label -1; labels start at 0"),
        ({"x": np.ones((10, 3)), "y": np.ones(10, dtype=np.float32)}, "1-D integer array"),
        ({"x": np.ones((40, 3)), "y": (np.arange(40) % 2) * 2}, r"classes \[1\] have no training"),
        ({"z": np.ones(3)}, "must hold arrays 'x' and 'y'"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(
    tmp_path: Path, arrays: dict, message: str
) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        NpzStream(tmp_path, num_tasks=1).task(0)
    assert "bad.npz" in str(info.value)


def test_stream_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no \.npz files"):
        NpzStream(tmp_path, num_tasks=1)
    with pytest.raises(DataError, match="is not a folder"):
        NpzStream(tmp_path / "missing", num_tasks=1)
    np.savez(tmp_path / "a.npz", x=np.ones((20, 3)), y=np.arange(20) % 2)
    np.savez(tmp_path / "b.npz", x=np.ones((20, 4)), y=np.arange(20) % 2)
    with pytest.raises(DataError, match=r"holds 2 \.npz files; add files or lower num_tasks"):
        NpzStream(tmp_path, num_tasks=3)
    stream = NpzStream(tmp_path, num_tasks=2)
    with pytest.raises(DataError, match=r"shape \(4,\).*first task has \(3,\)"):
        stream.task(1)
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"c\.npz is not a readable \.npz file"):
        NpzStream(tmp_path, num_tasks=3)
    with pytest.raises(ConfigError, match=r"needs scenario\.path"):
        load_config(overrides=["scenario.name=npz"])


def test_run_on_npz_then_learn_a_task_from_a_new_file(tmp_path: Path, capsys) -> None:
    data = tmp_path / "tasks"
    _write_digits_tasks(data, 2)
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(
        f"scenario: {{name: npz, path: {data}, num_tasks: 2, val_fraction: 0.15}}\n"
        "net: {hidden: [32]}\nsearch: {population: 3, epochs: 2}\n"
        "train: {epochs: 4, batch_size: 32, lr: 0.05, lr_min: 0.001}\n"
        "quantize: {delta: 1.0}\n"
    )
    out = tmp_path / "run"
    rc = main(["run", "--config", str(cfg), "--out", str(out), "--executor", "local", "--quiet"])
    ran, err = capsys.readouterr()
    assert rc == 0, err
    assert "registered model 'qpacknet-npz', versions 1, 2" in ran, ran[-2000:] + err
    res = json.loads((out / "results.json").read_text())
    assert res["scenario"] == "npz" and len(res["tasks"]) == 2 and res["acc"] > 70
    stream = build_stream(load_config(config_file=cfg).scenario, 0, None, "cpu")
    model = PackedModel.load(out / "model.safetensors")
    assert [model.accuracy(j, stream.test_split(j)) for j in range(2)] == res["accuracy_matrix"][-1]

    # the user's next task arrives as a new file; learn adds it as the next model version
    _write_digits_tasks(tmp_path / "three", 3)
    (tmp_path / "three" / "task-002.npz").rename(data / "task-002.npz")
    after = learn_one_more_task(out, "qpacknet-npz", tmp_path / "learned", stream, capsys)
    assert after.num_tasks == 3

    # a next task with more classes than the heads is refused before any training
    x = np.load(data / "task-002.npz")["x"]
    np.savez(data / "task-003.npz", x=x, y=np.arange(len(x)) % 12)
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    learn = ["learn", "--model", "models:/qpacknet-npz/latest", "--tracking-uri", uri]
    rc = main([*learn, "--out", str(tmp_path / "wider"), "--executor", "local", "--quiet"])
    printed, err = capsys.readouterr()
    assert rc == 2, printed[-2000:] + err
    assert "num_classes: model 10, now 12" in err and "SEARCH" not in printed
    assert "Traceback" not in err
    assert (
        not (tmp_path / "wider" / "model.safetensors").exists()
        or PackedModel.load(tmp_path / "wider" / "model.safetensors").num_tasks == 3
    )
