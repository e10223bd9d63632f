"""Image task streams (DESIGN.md §3) on tiny files in each data set's official on-disk format.

Every image's pixel values encode its class, so a split's uint8 pixels tell which original
class each row came from: that checks class-to-task assignment and relabelling through the
real read path (pickles, idx, .mat, PNG and JPEG folders) without any download. Splits are
uint8 with the task's mean and std; the worker copy of every stream rebuilds them bit for bit.
"""

from __future__ import annotations

import gzip
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from qpacknet.errors import ConfigError, DataError
from qpacknet.scenarios.base import Split
from qpacknet.scenarios.cifar import SplitCIFAR100
from qpacknet.scenarios.five_datasets import FiveDatasets
from qpacknet.scenarios.imagefolder import Imagenet100
from qpacknet.scenarios.images import ImageStream
from qpacknet.scenarios.tinyimagenet import TINY_URL, TinyImagenet

# ---------------------------------------------------------------- writers of official formats


def _pickle(path: Path, entry: dict[str, object], bytes_keys: bool) -> None:
    """A CIFAR "python version" pickle; the release's keys read back as ``b'data'`` etc. when
    unpickled with ``encoding='bytes'``, as ``'data'`` with ``encoding='latin1'``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {(k.encode() if bytes_keys else k): v for k, v in entry.items()}
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_rows(red: np.ndarray, green: np.ndarray, blue: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 3072]``: each row the red, green and blue 32×32 planes of one image."""
    planes = [np.repeat(c.astype(np.uint8)[:, None], 1024, axis=1) for c in (red, green, blue)]
    return np.concatenate(planes, axis=1)


def _idx_gz(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    path.with_name(path.name + ".gz").write_bytes(
        gzip.compress(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
    )


def _image(path: Path, value: int, size: tuple[int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 128, 60)
    Image.new(mode, size, colour).save(path, quality=95)


def _pixels(stream: ImageStream, index: int, split: Split) -> torch.Tensor:
    """The split's images in pixel units 0..255, checked to carry the task's statistics."""
    mean, std = stream.standardisation(index)
    assert split.mean is not None and split.std is not None
    assert torch.allclose(split.mean / 255.0, mean) and torch.allclose(split.std / 255.0, std)
    return split.x.to(torch.float32)


def _decoded_class(
    stream: ImageStream, index: int, split: Split, step: int, offset: int
) -> list[int]:
    red = _pixels(stream, index, split)[:, 0].mean(dim=(1, 2))
    return torch.round((red - offset) / step).long().tolist()


def _missing(msg: str, name: str) -> bool:
    """Whether the message lists ``name`` marked ``(missing)`` (markers are column-aligned)."""
    return re.search(rf"(?m)^ *{re.escape(name)} +\(missing\)", msg) is not None


def _check_split(split: Split, shape: tuple[int, ...], classes: int) -> None:
    assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64 and split.compact
    assert tuple(split.x.shape[1:]) == shape
    mean, std = split.mean, split.std
    assert mean is not None and std is not None
    # the network input is what standardising the whole split used to give, bit for bit
    old = (split.x.to(torch.float32) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    assert split.inputs().dtype == torch.float32 and torch.equal(split.inputs(), old)
    assert len(split) > 0 and int(split.y.min()) >= 0 and int(split.y.max()) < classes


# ---------------------------------------------------------------- split CIFAR-100

CIFAR100_PER_CLASS = 3


def _make_cifar100(root: Path) -> Path:
    """3 training and 1 test image per fine class: red = 2·class, green = 10·k + 5,
    blue = 255 − class. Rows interleave the classes, as in the release."""
    folder = root / "cifar-100-python"
    train_fine = np.tile(np.arange(100), CIFAR100_PER_CLASS)
    k = np.repeat(np.arange(CIFAR100_PER_CLASS), 100)
    train = {
        "data": _cifar_rows(2 * train_fine, 10 * k + 5, 255 - train_fine),
        "fine_labels": train_fine.tolist(),
        "coarse_labels": (train_fine // 5).tolist(),
        "batch_label": "training batch 1 of 1",
    }
    _pickle(folder / "train", train, bytes_keys=True)
    test_fine = np.arange(100)[::-1]
    test = {
        "data": _cifar_rows(2 * test_fine, np.full(100, 200), 255 - test_fine),
        "fine_labels": test_fine.tolist(),
        "coarse_labels": (test_fine // 5).tolist(),
    }
    _pickle(folder / "test", test, bytes_keys=False)
    meta = {
        "fine_label_names": [f"class{c}" for c in range(100)],
        "coarse_label_names": [f"super{c}" for c in range(20)],
    }
    _pickle(folder / "meta", meta, bytes_keys=True)
    return root


def test_split_cifar100_assigns_ascending_classes(tmp_path: Path) -> None:
    stream = SplitCIFAR100(_make_cifar100(tmp_path), val_fraction=0.34, seed=3)
    assert (stream.num_tasks, stream.num_classes, stream.input_shape) == (10, 10, (3, 32, 32))
    assert stream.class_names[:2] == ["class0", "class1"]
    for t in (0, 4, 9):
        task = stream.task(t)
        assert task.name == f"cifar100-{t}" and task.num_classes == 10
        assert stream.task_classes(t) == list(range(10 * t, 10 * t + 10))
        for split in (task.train, task.val, task.test):
            _check_split(split, (3, 32, 32), 10)
            assert _decoded_class(stream, t, split, step=2, offset=0) == (split.y + 10 * t).tolist()
            blue = _pixels(stream, t, split)[:, 2].mean(dim=(1, 2))
            assert torch.allclose(blue, 255.0 - (split.y + 10 * t), atol=1e-3)
        assert (len(task.train), len(task.val), len(task.test)) == (20, 10, 10)
        assert sorted(task.test.y.tolist()) == list(range(10))
        per_channel = task.train.inputs().transpose(0, 1).reshape(3, -1)
        assert torch.allclose(per_channel.mean(dim=1), torch.zeros(3), atol=1e-4)
        assert torch.allclose(per_channel.std(dim=1, unbiased=False), torch.ones(3), atol=1e-4)


def test_split_cifar100_validation_split_is_seeded(tmp_path: Path) -> None:
    root = _make_cifar100(tmp_path)
    a, b = SplitCIFAR100(root, seed=7), SplitCIFAR100(root, seed=7)
    other = SplitCIFAR100(root, seed=8)
    rows_a, rows_b = a.split_rows(2), b.split_rows(2)
    assert all(torch.equal(x, y) for x, y in zip(rows_a, rows_b, strict=True))
    assert not torch.equal(rows_a[1], other.split_rows(2)[1])
    assert not torch.equal(rows_a[1], a.split_rows(3)[1])  # a key per task
    (train_a, val_a), (train_b, val_b) = a.fit_splits(2), b.fit_splits(2)
    _same(val_a, val_b)
    _same(train_a, train_b)
    _same(a.val_split(2), val_a)
    assert a.test_split(2) is a.test_split(2)
    limited = SplitCIFAR100(root, seed=7, train_limit=5)
    assert len(limited.fit_splits(0)[0]) == 5
    assert len(limited.val_split(0)) == len(val_a)


def test_split_cifar100_missing_and_bad_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    with pytest.raises(DataError) as err:
        SplitCIFAR100(tmp_path)
    msg = str(err.value)
    assert f"{folder}/" in msg and "3 of its 3 files are missing" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg
    for name in ("train", "test", "meta"):
        assert f"  {name}" in msg
    _make_cifar100(tmp_path)
    (folder / "meta").unlink()
    with pytest.raises(DataError, match=r"1 of its 3 files") as err:
        SplitCIFAR100(tmp_path)
    assert _missing(str(err.value), "meta") and not _missing(str(err.value), "train")
    _make_cifar100(tmp_path)
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"CIFAR-100 file .*test is damaged"):
        SplitCIFAR100(tmp_path)
    with pytest.raises(ConfigError, match=r"scenario.num_tasks=11"):
        SplitCIFAR100(tmp_path, num_tasks=11)


# ---------------------------------------------------------------- 5-datasets

# Class c of each data set has red value step·c + offset; every data set has 2 training
# images per class and 1 test image per class.
FIVE_STEP = 20
OFFSETS = {"mnist": 5, "svhn": 3, "fashion_mnist": 10, "cifar10": 7, "notmnist": 9}


def _grey_idx(folder: Path, offset: int) -> None:
    for prefix, per_class in (("train", 2), ("t10k", 1)):
        labels = np.tile(np.arange(10), per_class).astype(np.uint8)
        images = np.repeat((FIVE_STEP * labels + offset)[:, None, None], 28, 1).repeat(28, 2)
        _idx_gz(folder / f"{prefix}-images-idx3-ubyte", images.astype(np.uint8))
        _idx_gz(folder / f"{prefix}-labels-idx1-ubyte", labels)


def _make_five(root: Path) -> Path:
    _grey_idx(root / "MNIST" / "raw", OFFSETS["mnist"])
    _grey_idx(root / "FashionMNIST" / "raw", OFFSETS["fashion_mnist"])
    (root / "svhn").mkdir(parents=True)
    for name, per_class in (("train", 2), ("test", 1)):
        digits = np.tile(np.arange(10), per_class)
        x = np.zeros((32, 32, 3, len(digits)), dtype=np.uint8)
        x[:, :, 0, :] = FIVE_STEP * digits + OFFSETS["svhn"]
        x[:, :, 1, :] = 90
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
        scipy.io.savemat(root / "svhn" / f"{name}_32x32.mat", {"X": x, "y": y})
    folder = root / "cifar-10-batches-py"
    for i in range(1, 6):
        labels = np.array([(2 * i) % 10, (2 * i + 1) % 10, (2 * i + 4) % 10, (2 * i + 5) % 10])
        red = FIVE_STEP * labels + OFFSETS["cifar10"]
        entry = {"data": _cifar_rows(red, labels, labels), "labels": labels.tolist()}
        _pickle(folder / f"data_batch_{i}", entry, bytes_keys=True)
    labels = np.arange(10)
    red = FIVE_STEP * labels + OFFSETS["cifar10"]
    entry = {"data": _cifar_rows(red, labels, labels), "labels": labels.tolist()}
    _pickle(folder / "test_batch", entry, bytes_keys=True)
    for split, per_class in (("train", 2), ("test", 1)):
        for c, letter in enumerate("ABCDEFGHIJ"):
            for k in range(per_class):
                value = FIVE_STEP * c + OFFSETS["notmnist"]
                _image(root / "notMNIST" / split / letter / f"{k}.png", value, (28, 28), "L")
    return root


def test_five_datasets_tasks(tmp_path: Path) -> None:
    stream = FiveDatasets(_make_five(tmp_path), val_fraction=0.25, seed=1, decode_threads=2)
    assert (stream.num_tasks, stream.num_classes, stream.input_shape) == (5, 10, (3, 32, 32))
    for t, key in enumerate(("mnist", "svhn", "fashion_mnist", "cifar10", "notmnist")):
        task = stream.task(t)
        assert task.name == f"five_datasets-{t}-{key}"
        assert (len(task.train), len(task.val), len(task.test)) == (15, 5, 10)
        assert sorted(task.test.y.tolist()) == list(range(10))
        for split in (task.train, task.val, task.test):
            _check_split(split, (3, 32, 32), 10)
            decoded = _decoded_class(stream, t, split, FIVE_STEP, OFFSETS[key])
            assert decoded == split.y.tolist(), key
            if key in ("mnist", "fashion_mnist", "notmnist"):
                assert torch.equal(split.x[:, 0], split.x[:, 1])
                assert torch.equal(split.x[:, 0], split.x[:, 2])
    again = FiveDatasets(tmp_path, val_fraction=0.25, seed=1)
    _same(again.val_split(1), stream.val_split(1))


def test_five_datasets_reference_notmnist_layout(tmp_path: Path) -> None:
    """The reference archive's ``Train``/``Test`` folders work; its empty files are skipped."""
    root = _make_five(tmp_path)
    for split in ("train", "test"):
        (root / "notMNIST" / split).rename(root / "notMNIST" / split.capitalize())
    (root / "notMNIST" / "Train" / "C" / "broken.png").write_bytes(b"")
    stream = FiveDatasets(root, val_fraction=0.25)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image"):
        task = stream.task(4)
    assert len(task.train) + len(task.val) == 20 and len(task.test) == 10


def test_five_datasets_missing_data(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        FiveDatasets(tmp_path)
    msg = str(err.value)
    assert "5 of the 5 data sets it needs are missing" in msg
    expected = [
        f"{tmp_path / 'MNIST' / 'raw'}/",
        "train-images-idx3-ubyte.gz",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        f"{tmp_path / 'svhn'}/",
        "train_32x32.mat",
        "http://ufldl.stanford.edu/housenumbers/",
        f"{tmp_path / 'FashionMNIST' / 'raw'}/",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        f"{tmp_path / 'cifar-10-batches-py'}/",
        "data_batch_5",
        "cifar-10-python.tar.gz",
        f"{tmp_path / 'notMNIST'}/",
        "train/A/ … train/J/",
        "notMNIST.zip",
    ]
    for part in expected:
        assert part in msg, part
    for name in ("t10k-labels-idx1-ubyte.gz", "test_32x32.mat", "data_batch_1", "test_batch"):
        assert _missing(msg, name), name
    root = _make_five(tmp_path / "full")
    (root / "svhn" / "test_32x32.mat").unlink()
    shutil.rmtree(root / "notMNIST" / "test" / "D")
    with pytest.raises(DataError) as err:
        FiveDatasets(root)
    msg = str(err.value)
    assert "2 of the 5 data sets" in msg and "(SVHN, notMNIST)" in msg
    assert _missing(msg, "test_32x32.mat") and not _missing(msg, "train_32x32.mat")
    assert _missing(msg, "test/D/") and not _missing(msg, "test/E/")
    assert "MNIST/raw" not in msg
    assert FiveDatasets(root, num_tasks=1).task(0).num_classes == 10  # only MNIST needed
    with pytest.raises(ConfigError, match=r"scenario.num_tasks=6"):
        FiveDatasets(root, num_tasks=6)


# ---------------------------------------------------------------- TinyImagenet

TINY_WNIDS = [f"n0{9 - i}00000{i}" for i in range(10)]  # deliberately not sorted
TINY_STEP, TINY_OFFSET = 20, 10


def _make_tiny(root: Path) -> Path:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    lines = []
    for p, wnid in enumerate(TINY_WNIDS):
        value = TINY_STEP * p + TINY_OFFSET
        images = folder / "train" / wnid / "images"
        for k in range(4):
            mode, size = ("L", (64, 64)) if k == 0 else ("RGB", (64, 64) if k < 3 else (60, 72))
            _image(images / f"{wnid}_{k}.JPEG", value, size, mode)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(2):
            name = f"val_{2 * p + k}.JPEG"
            _image(folder / "val" / "images" / name, value, (64, 64))
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines[::-1]) + "\n")
    return root


def test_tinyimagenet_tasks_follow_wnids_order(tmp_path: Path) -> None:
    root = _make_tiny(tmp_path)
    stream = TinyImagenet(root, num_tasks=2, val_fraction=0.25, seed=0, decode_threads=2)
    assert (stream.num_classes, stream.input_shape) == (5, (3, 64, 64))
    for t in (0, 1):
        task = stream.task(t)
        assert stream.task_classes(t) == TINY_WNIDS[5 * t : 5 * t + 5]
        assert (len(task.train), len(task.val), len(task.test)) == (15, 5, 10)
        for split in (task.train, task.val, task.test):
            _check_split(split, (3, 64, 64), 5)
            decoded = _decoded_class(stream, t, split, TINY_STEP, TINY_OFFSET)
            assert decoded == (split.y + 5 * t).tolist()
    same = TinyImagenet(root / "tiny-imagenet-200", num_tasks=2, val_fraction=0.25, seed=0)
    _same(same.test_split(1), stream.test_split(1))
    with pytest.raises(DataError, match=r"needs 3 × 5 = 15 classes"):
        TinyImagenet(root, num_tasks=3)


def test_tinyimagenet_missing_data(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        TinyImagenet(tmp_path)
    msg = str(err.value)
    folder = tmp_path / "tiny-imagenet-200"
    for part in (
        f"{folder}/",
        "train/<wnid>/images/*.JPEG",
        TINY_URL,
    ):
        assert part in msg, part
    for name in ("wnids.txt", "val/images/*.JPEG", "val/val_annotations.txt"):
        assert _missing(msg, name), name
    root = _make_tiny(tmp_path / "full")
    shutil.rmtree(root / "tiny-imagenet-200" / "train" / TINY_WNIDS[3])
    with pytest.raises(DataError, match=rf"lacks the folders of 1 classes .*{TINY_WNIDS[3]}"):
        TinyImagenet(root, num_tasks=2)


# ---------------------------------------------------------------- Imagenet100

IN_STEP, IN_OFFSET = 12, 6
IN_CLASSES = [f"n{(37 * i) % 20:02d}x" for i in range(20)]  # creation order ≠ sorted order


def _make_imagenet(root: Path) -> Path:
    ranks = {name: r for r, name in enumerate(sorted(IN_CLASSES))}
    for name in IN_CLASSES:
        value = IN_STEP * ranks[name] + IN_OFFSET
        for k in range(3):
            _image(root / "train" / name / f"{name}_{k}.JPEG", value, (40, 30))
        _image(root / "val" / name / f"val_{name}.JPEG", value, (30, 40))
    return root


def test_imagenet100_sorted_classes_and_resize(tmp_path: Path) -> None:
    root = _make_imagenet(tmp_path)
    stream = Imagenet100(root, num_tasks=2, val_fraction=0.34, image_size=16, decode_threads=2)
    assert (stream.num_classes, stream.input_shape) == (10, (3, 16, 16))
    for t in (0, 1):
        task = stream.task(t)
        assert stream.task_classes(t) == sorted(IN_CLASSES)[10 * t : 10 * t + 10]
        assert (len(task.train), len(task.val), len(task.test)) == (20, 10, 10)
        for split in (task.train, task.val, task.test):
            _check_split(split, (3, 16, 16), 10)
            decoded = _decoded_class(stream, t, split, IN_STEP, IN_OFFSET)
            assert decoded == (split.y + 10 * t).tolist()
    with pytest.raises(DataError, match=r"needs 3 × 10 = 30 classes"):
        Imagenet100(root, num_tasks=3)


def test_imagenet100_missing_data(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        Imagenet100(tmp_path)
    msg = str(err.value)
    for part in (
        f"{tmp_path}/",
        "https://image-net.org/",
        "imagenet100.txt",
    ):
        assert part in msg, part
    assert _missing(msg, "train/<class>/*.JPEG") and _missing(msg, "val/<class>/*.JPEG")
    root = _make_imagenet(tmp_path / "full")
    shutil.rmtree(root / "val" / IN_CLASSES[0])
    with pytest.raises(DataError, match=rf"lacks the class folders {IN_CLASSES[0]}"):
        Imagenet100(root, num_tasks=2)


# ---------------------------------------------------------------- worker copies


def _same(a: Split, b: Split) -> None:
    """Bit-identical splits: uint8 images, labels and per-channel statistics."""
    assert a.x.dtype == b.x.dtype == torch.uint8
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.mean is not None and b.mean is not None and torch.equal(a.mean, b.mean)
    assert a.std is not None and b.std is not None and torch.equal(a.std, b.std)


def _cifar100(root: Path, limit: int | None) -> ImageStream:
    return SplitCIFAR100(
        _make_cifar100(root), num_tasks=3, val_fraction=0.34, seed=5, train_limit=limit
    )


def _five(root: Path, limit: int | None) -> ImageStream:
    return FiveDatasets(_make_five(root), val_fraction=0.25, seed=5, train_limit=limit)


def _tiny(root: Path, limit: int | None) -> ImageStream:
    return TinyImagenet(_make_tiny(root), num_tasks=2, val_fraction=0.25, train_limit=limit)


def _imagenet(root: Path, limit: int | None) -> ImageStream:
    return Imagenet100(_make_imagenet(root), num_tasks=2, image_size=16, train_limit=limit)


STREAMS: dict[str, Callable[[Path, int | None], ImageStream]] = {
    "cifar100": _cifar100,
    "five_datasets": _five,
    "tinyimagenet": _tiny,
    "imagenet100": _imagenet,
}


@pytest.mark.parametrize("limit", [None, 7])
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_worker_copy_rebuilds_every_split_bit_for_bit(
    tmp_path: Path, name: str, limit: int | None
) -> None:
    """The copy an actor unpickles holds every task's decoded uint8 images: without the data
    folder it rebuilds the driver's train, validation and test splits bit for bit."""
    root = tmp_path / "data"
    stream = STREAMS[name](root, limit)
    stream.test_split(0)  # a driver cache that must not travel
    shipped = pickle.dumps(stream.for_workers())
    shutil.rmtree(root)  # the copy reads no file
    copy = pickle.loads(shipped)
    assert copy.device == torch.device("cpu") and copy._test_cache == {}
    assert all(getattr(copy, attr) is None for attr in copy._bulk)
    fresh = STREAMS[name](root, limit)
    for t in range(stream.num_tasks):
        train, val = copy.fit_splits(t)
        expected = fresh.fit_splits(t)
        _same(train, expected[0])
        _same(val, expected[1])
        _same(copy.test_split(t), fresh.test_split(t))
        _same(copy.val_split(t), expected[1])
        if limit is not None:
            assert len(train) == limit
