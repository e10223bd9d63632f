"""The user's own stream as a folder of images per task: both layouts, labels and splits
through the config, checks with clear errors, and the whole path from ``qpacknet run`` to
``qpacknet learn`` adding a task from a new folder."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2.functional import to_pil_image

from qpacknet.cli import main
from qpacknet.config import load_config
from qpacknet.errors import ConfigError, DataError
from qpacknet.scenarios import FolderStream, build_stream
from tests.helpers import learn_one_more_task


def _image(label: int, i: int, task: int = 0, size: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """uint8 ``[3, H, W]`` noise with a bright row that says the class (and a task-dependent
    column, so tasks differ): learnable in a few epochs."""
    g = torch.Generator().manual_seed(10_000 * task + 100 * label + i)
    x = torch.randint(0, 70, (3, *size), generator=g, dtype=torch.uint8)
    x[:, (2 * label + 1) % size[0], :] += 170
    x[task % 3, :, task % size[1]] += 60
    return x


def _write_class(folder: Path, label: int, n: int, task: int = 0, jpeg: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = to_pil_image(_image(label, i, task))
        img.save(folder / f"img{i:03d}.{'jpg' if jpeg else 'png'}", quality=95)


def _write_flat_task(root: Path, name: str, classes: list[str], n: int, task: int = 0) -> None:
    """``root/name/<class>/*.png``: validation and test images are held out."""
    for label, cls in enumerate(classes):
        _write_class(root / name / cls, label, n, task)


def _stream(root: Path, num_tasks: int, *sets: str) -> FolderStream:
    """Through the real code path: a config, then ``build_stream``."""
    cfg = load_config(
        overrides=[
            "scenario.name=folders",
            f"scenario.path={root}",
            f"scenario.num_tasks={num_tasks}",
            *sets,
        ]
    )
    stream = build_stream(cfg.scenario, 0, None, "cpu")
    assert isinstance(stream, FolderStream)
    return stream


def test_both_layouts_labels_and_deterministic_splits(tmp_path: Path) -> None:
    # task a: train/val/test given (val lacks one class, test is JPEG); task b: flat, 3 classes
    for label, cls in enumerate(["cat", "dog"]):
        _write_class(tmp_path / "a" / "train" / cls, label, 6)
        _write_class(tmp_path / "a" / "test" / cls, label, 3, jpeg=True)
    _write_class(tmp_path / "a" / "val" / "dog", 1, 2)
    _write_flat_task(tmp_path, "b", ["x", "y", "z"], 10, task=1)
    (tmp_path / "b" / "x" / "notes.txt").write_text("not an image: ignored")
    (tmp_path / "not-a-task.txt").write_text("files beside the task folders are ignored")

    stream = _stream(tmp_path, 2, "scenario.val_fraction=0.1")
    assert stream.input_shape == (3, 8, 8)
    assert stream.num_classes == 3, "the widest task sets the head size, as NpzStream does"
    assert stream.classes(0) == ["cat", "dog"] and stream.classes(1) == ["x", "y", "z"]
    a = stream.task(0)
    assert (len(a.train), len(a.val), len(a.test)) == (12, 2, 6)
    assert a.train.y.tolist() == [0] * 6 + [1] * 6 and a.val.y.tolist() == [1, 1]
    assert a.test.y.tolist() == [0, 0, 0, 1, 1, 1] and a.name == "folders-a"
    assert a.train.x.dtype == torch.uint8 and a.train.x.shape[1:] == (3, 8, 8)
    assert a.train.mean is not None and a.train.mean.shape == (3,), "uint8 with its statistics"
    inputs = a.train.inputs()
    assert inputs.dtype == torch.float32 and inputs.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert torch.equal(a.test.mean, a.train.mean) and torch.equal(a.val.std, a.train.std)
    b = stream.task(1)
    assert (len(b.train), len(b.val), len(b.test)) == (24, 3, 3)
    assert sorted(set(b.train.y.tolist())) == [0, 1, 2] and b.num_classes == 3

    again = _stream(tmp_path, 2, "scenario.val_fraction=0.1")
    for j, before in enumerate((a, b)):
        after = again.task(j)
        for split in ("train", "val", "test"):
            assert torch.equal(getattr(after, split).x, getattr(before, split).x)
            assert torch.equal(getattr(after, split).y, getattr(before, split).y)
            assert torch.equal(getattr(after, split).mean, getattr(before, split).mean)
    assert torch.equal(stream.test_split(0).x, a.test.x), "old tasks' test splits are cached"
    mean, std = stream.standardisation(1)
    assert mean.shape == std.shape == (3,) and float(mean.max()) < 1.0

    limited = _stream(tmp_path, 2, "scenario.train_limit=10").task(1)
    assert len(limited.train) == 10


def test_worker_copy_rebuilds_every_split_without_the_files(tmp_path: Path) -> None:
    """The copy an actor unpickles carries every task's decoded uint8 images, so it builds the
    driver's splits bit for bit with no access to the folders."""
    data = tmp_path / "tasks"
    _write_flat_task(data, "t0", ["a", "b", "c"], 6)
    for label, cls in enumerate(["a", "b"]):
        _write_class(data / "t1" / "train" / cls, label, 5, task=1)
        _write_class(data / "t1" / "test" / cls, label, 2, task=1, jpeg=True)
    stream = _stream(data, 2, "scenario.train_limit=10")
    stream.task(0)  # a driver cache that must not travel
    shipped = pickle.dumps(stream.for_workers())
    expected = [stream.task(t) for t in range(2)]
    shutil.rmtree(data)
    copy = pickle.loads(shipped)
    assert copy._cache == {} and copy.device == torch.device("cpu")
    for t, task in enumerate(expected):
        train, val = copy.fit_splits(t)
        for got, want in ((train, task.train), (val, task.val), (copy.test_split(t), task.test)):
            assert got.x.dtype == torch.uint8
            assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)
            assert torch.equal(got.mean, want.mean) and torch.equal(got.std, want.std)
    assert len(copy.fit_splits(0)[0]) == 10


def test_missing_root_or_too_few_task_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'.*missing' is not a folder; make one sub-folder"):
        FolderStream(tmp_path / "missing", num_tasks=1)
    _write_flat_task(tmp_path, "t0", ["a", "b"], 4)
    with pytest.raises(DataError, match=r"num_tasks=2 but .* holds 1 task folder\(s\); add"):
        _stream(tmp_path, 2)
    with pytest.raises(ConfigError, match=r"folders needs scenario\.path"):
        load_config(overrides=["scenario.name=folders"])


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    _write_flat_task(tmp_path, "t0", ["a", "b"], 4)
    (tmp_path / "t0" / "c").mkdir()
    (tmp_path / "t0" / "c" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*t0/c holds no images") as info:
        _stream(tmp_path, 1)
    assert "add images of that class or delete the folder" in str(info.value)


def test_val_class_unknown_to_training_is_out_of_range(tmp_path: Path) -> None:
    _write_class(tmp_path / "t0" / "train" / "a", 0, 4)
    _write_class(tmp_path / "t0" / "train" / "b", 1, 4)
    _write_class(tmp_path / "t0" / "val" / "zebra", 2, 2)
    with pytest.raises(DataError, match=r"t0/val/zebra: class 'zebra' is not among") as info:
        _stream(tmp_path, 1)
    assert "range 0..1" in str(info.value) and "t0/train/zebra" in str(info.value)


def test_val_without_train_is_refused(tmp_path: Path) -> None:
    _write_flat_task(tmp_path, "t0", ["a", "b"], 4)
    _write_class(tmp_path / "t0" / "test" / "a", 0, 2)
    with pytest.raises(DataError, match=r"t0 has test/ but no train/"):
        _stream(tmp_path, 1)


def test_damaged_image_is_named(tmp_path: Path) -> None:
    _write_flat_task(tmp_path, "t0", ["a", "b"], 4)
    good = (tmp_path / "t0" / "b" / "img001.png").read_bytes()
    (tmp_path / "t0" / "b" / "img002.png").write_bytes(good[: len(good) // 2])
    stream = _stream(tmp_path, 1)  # the first image is intact; images are read per task
    with pytest.raises(DataError, match=r"cannot read image .*t0/b/img002\.png") as info:
        stream.task(0)
    assert "replace it with an intact copy or delete it" in str(info.value)


def test_image_of_another_shape_is_named(tmp_path: Path) -> None:
    _write_flat_task(tmp_path, "t0", ["a", "b"], 4)
    _write_flat_task(tmp_path, "t1", ["a", "b"], 4)
    to_pil_image(_image(1, 9, size=(6, 8))).save(tmp_path / "t1" / "b" / "odd.png")
    stream = _stream(tmp_path, 2)
    stream.task(0)
    with pytest.raises(DataError, match=r"t1/b/odd\.png: image has shape \(3, 6, 8\)") as info:
        stream.task(1)
    message = str(info.value)
    assert "t0/a/img000.png has (3, 8, 8)" in message
    assert "resize them to 8x8 pixels" in message


def test_too_few_images_to_hold_out(tmp_path: Path) -> None:
    _write_flat_task(tmp_path, "t0", ["a"], 1)
    with pytest.raises(DataError, match=r"t0 has too few images \(1 left\) to hold out test"):
        _stream(tmp_path, 1).task(0)
    _write_class(tmp_path / "more" / "t0" / "a", 0, 1)  # its one image is held out (seeded)
    _write_class(tmp_path / "more" / "t0" / "b", 1, 4)
    with pytest.raises(DataError, match=r"t0/a has too few images: none is left for training"):
        _stream(tmp_path / "more", 1, "scenario.val_fraction=0.3").task(0)


# 12 synthetic images per class learn little by design: the quality gate warns, not stops
_TINY = [
    "search.population=2",
    "search.epochs=1",
    "train.epochs=2",
    "net.hidden=[16]",
    "capacity.quality_gate=warn",
]


def test_two_task_folders_run_through_the_cli(tmp_path: Path, capsys) -> None:
    for t in range(2):
        _write_flat_task(tmp_path / "data", f"task-{t}", ["a", "b"], 12, task=t)
    out = tmp_path / "run"
    sets = ["scenario.name=folders", f"scenario.path={tmp_path / 'data'}", "scenario.num_tasks=2"]
    args = ["run", "--preset", "digits", "--out", str(out)]
    args += [f"--set={s}" for s in [*sets, *_TINY]]
    rc = main([*args, "--executor", "local", "--no-tracking", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["scenario"] == "folders" and len(res["tasks"]) == 2
    assert res["bwt"] == 0.0


def test_learn_takes_a_new_task_folder_as_the_next_task(tmp_path: Path, capsys) -> None:
    data = tmp_path / "tasks"
    for t in range(2):
        _write_flat_task(data, f"task-{t}", ["a", "b"], 12, task=t)
    out = tmp_path / "run"
    sets = ["scenario.name=folders", f"scenario.path={data}", "scenario.num_tasks=2", *_TINY]
    args = ["run", "--preset", "digits", "--out", str(out), *[f"--set={s}" for s in sets]]
    rc = main([*args, "--executor", "local", "--quiet"])
    ran, err = capsys.readouterr()
    assert rc == 0, err
    assert "registered model 'qpacknet-folders', versions 1, 2" in ran, ran[-2000:] + err
    stream = _stream(data, 2)

    # the user's next task arrives as a new folder; learn adds it as the next model version
    _write_flat_task(data, "task-2", ["a", "b"], 12, task=2)
    learned = tmp_path / "learned"
    after = learn_one_more_task(out, "qpacknet-folders", learned, stream, capsys)
    assert after.num_tasks == 3
    res = json.loads((learned / "results.json").read_text())
    assert len(res["tasks"]) == 3 and res["bwt"] == 0.0
