"""Predicting without the data set: ``qpacknet predict`` and the pyfunc model, with a task id
(exactly ``PackedModel.predict``) and without one (task inference by the recogniser the model
file has statistics for, exactly the rule behind results.json's figures; lowest entropy on
request or for files without statistics), the input preparation recorded in the model file (raw
input as the user has it -> the scenario's network input, bit for bit), and the usage errors."""

from __future__ import annotations

import json
import pickle
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from qpacknet.cli import main
from qpacknet.model import PackedModel
from qpacknet.predict import read_inputs
from qpacknet.preparation import Preparation, task_inputs
from qpacknet.scenarios import PermutedDigits, PermutedMNIST
from qpacknet.scenarios.cifar import SplitCIFAR100
from qpacknet.scenarios.digits import stratified_split
from qpacknet.scenarios.images import grey_to_rgb
from qpacknet.store import load_store, save_store

VAL = 0.15  # the digits preset's val_fraction: the stream below is the run's
TINY = [
    *("--preset", "digits", "--executor", "local", "--no-tracking", "--quiet"),
    *("--set", "scenario.num_tasks=2", "--set", "search.population=2"),
    *("--set", "search.epochs=1", "--set", "train.epochs=3"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-task digits run, and each task's test inputs raw (0..16 pixels, permuted by the
    task) and as the scenario prepared them."""
    out = tmp_path_factory.mktemp("predict") / "run"
    assert main(["run", *TINY, "--out", str(out)]) == 0
    stream = PermutedDigits(num_tasks=2, val_fraction=VAL)
    digits = load_digits()
    _, _, test_rows = stratified_split(torch.as_tensor(digits.target), VAL, 0)
    raw, files = [], []
    for t in range(2):
        x = digits.data[test_rows.numpy()][:, stream.permutation(t).numpy()]
        raw.append(x)
        files.append(out.parent / f"raw{t}.npz")
        np.savez(files[-1], x=x.reshape(-1, 8, 8))  # as images: predict flattens them
    return {
        "out": out,
        "stream": stream,
        "raw": raw,
        "files": files,
        "results": json.loads((out / "results.json").read_text()),
    }


def _predict(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["predict", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())


def test_predict_with_task_equals_packed_model_predict(run: dict, tmp_path: Path, capsys) -> None:
    model = PackedModel.load(run["out"] / "model.safetensors")
    for t in range(2):
        out = tmp_path / f"t{t}.json"
        rc, printed, _ = _predict(
            capsys, "--model", str(run["out"]), "--input", str(run["files"][t]),
            "--task", str(t), "--out", str(out),
        )  # fmt: skip
        assert rc == 0 and f"359 inputs, task {t} given" in printed
        rows = _rows(out)
        x = run["stream"].test_split(t).x
        assert [r["class"] for r in rows] == model.predict(t, x).tolist()
        assert {r["task"] for r in rows} == {t}
        assert [r["input"] for r in rows] == list(range(len(x)))
        top = torch.softmax(model.logits(t, x), -1).max(-1).values
        assert np.allclose([r["confidence"] for r in rows], top.numpy(), atol=1e-6)


def test_predict_without_task_is_the_lowest_entropy_task_of_the_reported_figures(
    run: dict, tmp_path: Path, capsys
) -> None:
    model = PackedModel.load(run["out"] / "model.safetensors")
    means = {"task_inference_acc": 0.0, "class_incremental_acc": 0.0}
    for j in range(2):
        out = tmp_path / f"j{j}.csv"
        rc, printed, _ = _predict(
            capsys, "--model", str(run["out"] / "model.safetensors"),
            "--input", str(run["files"][j]), "--out", str(out), "--recogniser", "entropy",
        )  # fmt: skip
        assert rc == 0 and "tasks inferred by the entropy recogniser over 2 tasks" in printed
        lines = out.read_text().splitlines()
        assert lines[0] == "input,class,task,confidence"
        cells = [line.split(",") for line in lines[1:]]
        task = torch.tensor([int(c[2]) for c in cells])
        klass = torch.tensor([int(c[1]) for c in cells])
        # independently: every sub-network on test task j, the lowest entropy, ties to task 0
        split = run["stream"].test_split(j)
        logits = torch.stack([model.logits(i, split.x) for i in range(2)])
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        expected = torch.where(entropy[1] < entropy[0], 1, 0)
        assert torch.equal(task, expected)
        assert torch.equal(klass, logits[expected, torch.arange(len(task))].argmax(-1))
        right = task == j
        correct = right & (klass == split.y)
        means["task_inference_acc"] += 100.0 * int(right.sum()) / len(task) / 2
        means["class_incremental_acc"] += 100.0 * int(correct.sum()) / len(task) / 2
    assert means == run["results"]["task_inference"]["entropy"]


def test_predict_without_task_defaults_to_the_reported_combined_recogniser(
    run: dict, tmp_path: Path, capsys
) -> None:
    from qpacknet.recognise import infer_tasks

    assert run["results"]["task_inference_recogniser"] == "combined"
    model = PackedModel.load(run["out"] / "model.safetensors")
    for j in range(2):
        out = tmp_path / f"c{j}.json"
        rc, printed, err = _predict(
            capsys, "--model", str(run["out"]), "--input", str(run["files"][j]), "--out", str(out)
        )
        assert rc == 0 and "tasks inferred by the combined recogniser over 2 tasks" in printed
        assert "note" not in err
        rows = _rows(out)
        split = run["stream"].test_split(j)
        found = infer_tasks(model, split.x, "combined")
        assert [r["task"] for r in rows] == found.task.tolist()
        assert [r["class"] for r in rows] == found.prediction.tolist()
        right = found.task == j
        reported = run["results"]["task_inference_per_task"][j]
        assert 100.0 * int(right.sum()) / len(right) == reported["task_inference_acc"]
        correct = right & (found.prediction == split.y)
        assert 100.0 * int(correct.sum()) / len(right) == reported["class_incremental_acc"]


def test_the_model_file_records_the_digits_preparation(run: dict) -> None:
    store = load_store(run["out"] / "model.safetensors")
    for t in range(2):
        doc = store.input_preparation(t)
        assert doc == run["stream"].input_preparation(t).to_json()
        prep = Preparation.from_json(doc)
        _, raw = read_inputs(run["files"][t], prep)  # [N, 8, 8] as saved
        assert torch.equal(prep(raw), run["stream"].test_split(t).x)
        assert torch.equal(prep(torch.from_numpy(run["raw"][t])), run["stream"].test_split(t).x)


def test_pmnist_preparation_is_its_features_arithmetic() -> None:
    """p-MNIST without the download: the recorded preparation of 28x28 uint8 images gives
    what the stream's own feature code gives (float32 scaling and MNIST's mean and std)."""
    stream = object.__new__(PermutedMNIST)  # only the arithmetic, no MNIST files
    stream._num_tasks = 1
    prep = Preparation.from_json(stream.input_preparation(0).to_json())
    pixels = torch.randint(0, 256, (50, 784), dtype=torch.uint8)
    expected = stream._features(pixels, torch.arange(784))
    assert torch.equal(prep(pixels.reshape(50, 28, 28)), expected)


def _cifar100(root: Path) -> Path:
    """CIFAR-100's python pickles with random pixels, 2 training and 1 test image per class."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, per_class in (("train", 2), ("test", 1)):
        labels = np.tile(np.arange(100), per_class)
        entry = {
            b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
            b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels // 5).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def test_image_preparation_round_trip(tmp_path: Path) -> None:
    """uint8 images, standardised per task with the task's own statistics: PNG files, or an
    [N, H, W, C] array, give the network input of the scenario's split bit for bit; without a
    task id each task prepares the same pixels its own way."""
    stream = SplitCIFAR100(_cifar100(tmp_path), num_tasks=2, val_fraction=0.34, seed=1)
    preps = [
        Preparation.from_json(json.loads(json.dumps(stream.input_preparation(t).to_json())))
        for t in range(2)
    ]
    assert preps[0].mean != preps[1].mean
    for t in range(2):
        split = stream.test_split(t)
        folder = tmp_path / f"png{t}"
        folder.mkdir()
        for i, img in enumerate(split.x):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
        names, pixels = read_inputs(folder, preps[t])
        assert names[:2] == ["000.png", "001.png"] and torch.equal(pixels, split.x)
        assert torch.equal(preps[t](pixels), split.inputs())
        assert torch.equal(preps[t](split.x.permute(0, 2, 3, 1)), split.inputs())
    x = stream.test_split(1).x
    inputs = task_inputs(preps, x, (3, 32, 32))
    assert torch.equal(inputs(1), stream.test_split(1).inputs())
    assert torch.equal(inputs(0), preps[0].network_input(x))


def test_grey_images_are_resized_and_repeated_as_five_datasets_does() -> None:
    prep = Preparation("image", (3, 32, 32), "uint8", (0.0, 255.0), resize="bilinear")
    grey = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    assert torch.equal(prep.conform(grey), grey_to_rgb(grey.unsqueeze(1)))
    fixed = Preparation("image", (3, 32, 32), "uint8", (0.0, 255.0), scenario="cifar100")
    with pytest.raises(Exception, match=r"cifar100's images are 32x32 .* does not resize"):
        fixed.conform(grey)


def test_pyfunc_model_predicts_with_and_without_params(run: dict, tmp_path: Path) -> None:
    import mlflow

    from qpacknet.tracking.pyfunc import save_packed_model

    save_packed_model(tmp_path / "pyfunc", run["out"], (64,))
    served = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    model = PackedModel.load(run["out"] / "model.safetensors")
    x = run["stream"].test_split(1).x
    given = served.predict(x.numpy(), params={"task": 1})
    assert isinstance(given, np.ndarray) and np.array_equal(given, model.predict(1, x).numpy())
    inferred = served.predict(x.numpy())
    assert list(inferred.columns) == ["class", "task", "confidence"]
    from qpacknet.recognise import infer_tasks

    combined = infer_tasks(model, x, "combined")
    assert np.array_equal(inferred["task"].to_numpy(), combined.task.numpy())
    by_entropy = served.predict(x.numpy(), params={"recogniser": "entropy"})
    logits = torch.stack([model.logits(i, x) for i in range(2)])
    logp = torch.log_softmax(logits, -1)
    task = (-(logp.exp() * logp).sum(-1)).argmin(0)
    assert np.array_equal(by_entropy["task"].to_numpy(), task.numpy())
    raw = served.predict(run["raw"][1].astype(np.float32), params={"raw": True})
    assert raw.equals(inferred)
    with pytest.raises(Exception, match=r"params.task=2: this model holds tasks 0..1"):
        served.predict(x.numpy(), params={"task": 2})


def test_an_older_model_file_takes_prepared_inputs(run: dict, tmp_path: Path, capsys) -> None:
    """A file from before preparations were recorded loads with bit-identical logits; predict
    takes prepared float inputs from it and says so once."""
    store = load_store(run["out"] / "model.safetensors")
    store._inputs.clear()
    old = tmp_path / "old.safetensors"
    save_store(store, old)
    assert "input" not in _header(old)
    x = run["stream"].test_split(0).x
    new = PackedModel.load(run["out"] / "model.safetensors")
    for t in range(2):
        assert torch.equal(PackedModel.load(old).logits(t, x), new.logits(t, x))
    np.savez(tmp_path / "prepared.npz", x=x.numpy())
    rc, table, err = _predict(
        capsys, "--model", str(old), "--input", str(tmp_path / "prepared.npz"), "--task", "0"
    )
    assert rc == 0 and err.count("records no input preparation") == 1
    assert "inputs are taken as prepared float network inputs of shape [64]" in err
    classes = [int(line.split(",")[1]) for line in table.splitlines()[1:]]
    assert classes == new.predict(0, x).tolist()


def test_a_model_file_without_recognition_statistics_falls_back_to_entropy(
    run: dict, tmp_path: Path, capsys
) -> None:
    """A file written before the statistics existed (tensors and header entry absent) loads
    with bit-identical logits, and predict infers tasks by entropy, saying why once."""
    store = load_store(run["out"] / "model.safetensors")
    store._recognise.clear()
    old = tmp_path / "old.safetensors"
    save_store(store, old)
    assert "recognise" not in _header(old)
    assert "recognise" not in old.read_bytes()[:8192].decode("latin1")
    x = run["stream"].test_split(1).x
    new = PackedModel.load(run["out"] / "model.safetensors")
    assert torch.equal(PackedModel.load(old).logits(1, x), new.logits(1, x))
    rc, table, err = _predict(capsys, "--model", str(old), "--input", str(run["files"][1]))
    assert rc == 0 and err.count("holds no task-recognition statistics") == 1
    assert "by the entropy recogniser" in err
    logits = torch.stack([new.logits(i, x) for i in range(2)])
    logp = torch.log_softmax(logits, -1)
    expected = (-(logp.exp() * logp).sum(-1)).argmin(0)
    assert [int(line.split(",")[2]) for line in table.splitlines()[1:]] == expected.tolist()
    rc, _, err = _predict(
        capsys, "--model", str(old), "--input", str(run["files"][1]), "--recogniser", "input"
    )
    assert rc == 2 and "needs statistics that" in err and "entropy" in err


def _header(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["qpacknet"])


def _bad_input_entry(run: dict, tmp_path: Path) -> Path:
    """The run's model file with a damaged ``input`` header entry (not under the checksums)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(run["out"] / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = json.loads(f.metadata()["qpacknet"])
    header["input"] = {"tasks": "damaged"}
    path = tmp_path / "bad_input.safetensors"
    save_file(tensors, str(path), metadata={"qpacknet": json.dumps(header)})
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_predict_errors_exit_2_with_the_fix(
    run: dict, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TIMEOUT", "MAX_RETRIES", "BACKOFF_FACTOR", "BACKOFF_JITTER"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)  # predict sets them
    model, data = str(run["out"]), str(run["files"][0])
    cases = [
        (["--model", str(tmp_path / "none"), "--input", data], "no such file"),
        (["--model", model, "--input", str(tmp_path / "none.npz")], "no such file or folder"),
        (
            ["--model", model, "--input", data, "--task", "2"],
            "--task 2: the model holds tasks 0..1",
        ),
        (["--model", model, "--input", data, "--out", "p.txt"], "name a .csv or a .json file"),
    ]
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00" * 64)
    cases.append((["--model", str(damaged), "--input", data], "damaged or incomplete"))
    cases.append((["--model", str(_bad_input_entry(run, tmp_path)), "--input", data], "'input'"))
    cases.append(
        (
            ["--model", model, "--input", data, "--recogniser", "nope"],
            "unknown task recogniser 'nope' (known: entropy, input, feature, combined)",
        )
    )
    np.savez(tmp_path / "wide.npz", x=np.zeros((3, 10), dtype=np.float32))
    cases.append((["--model", model, "--input", str(tmp_path / "wide.npz")], "give [N, 64]"))
    dead = f"http://127.0.0.1:{_closed_port()}"
    cases.append(
        (
            ["--model", "models:/qpacknet-digits/1", "--tracking-uri", dead, "--input", data],
            f"cannot load models:/qpacknet-digits/1 from {dead}",
        )
    )
    for args, message in cases:
        rc, _, err = _predict(capsys, *args)
        assert rc == 2 and message in err, (args, err)
        assert err.startswith("qpacknet: error: ")
