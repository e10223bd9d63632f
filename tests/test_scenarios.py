"""Task streams: idx parsing, data-folder rules, permutations and splits."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from qpacknet.config import ScenarioConfig
from qpacknet.errors import DataError
from qpacknet.scenarios import (
    PermutedDigits,
    PermutedMNIST,
    build_stream,
    datadir,
    load_mnist,
    mnist_files,
    resolve_data_dir,
)
from qpacknet.scenarios.mnist_files import FILES, read_idx

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
N_TRAIN, N_TEST = 20, 10


def _idx_bytes(arr: np.ndarray) -> bytes:
    """The official idx layout: 0, 0, type 0x08 (uint8), ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def _write(path: Path, arr: np.ndarray, gz: bool) -> Path:
    data = _idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _tiny_arrays() -> dict[str, np.ndarray]:
    """Known pixel values: image i is (i * 7 + pixel index) mod 256; labels i mod 10."""
    pix = np.arange(28 * 28).reshape(28, 28)
    train_x = np.stack([(i * 7 + pix) % 256 for i in range(N_TRAIN)]).astype(np.uint8)
    test_x = np.stack([(i * 11 + 3 + pix) % 256 for i in range(N_TEST)]).astype(np.uint8)
    return {
        "train-images-idx3-ubyte": train_x,
        "train-labels-idx1-ubyte": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": test_x,
        "t10k-labels-idx1-ubyte": ((np.arange(N_TEST) * 3) % 10).astype(np.uint8),
    }


def _make_mnist(root: Path, gz_files: set[str] | None = None) -> dict[str, np.ndarray]:
    """Tiny MNIST under ``root/MNIST/raw``; stems in ``gz_files`` are gzipped (default: all)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = _tiny_arrays()
    for stem, arr in arrays.items():
        _write(raw / stem, arr, gz=gz_files is None or stem in gz_files)
    return arrays


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


# ----------------------------------------------------------------------------- idx files


@pytest.mark.parametrize(
    "gz_files",
    [None, set(), {"train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}],
    ids=["all-gz", "all-plain", "mixed"],
)
def test_load_mnist_round_trips(tmp_path: Path, gz_files: set[str] | None) -> None:
    arrays = _make_mnist(tmp_path, gz_files)
    before = _snapshot(tmp_path)
    x_train, y_train, x_test, y_test = load_mnist(tmp_path)
    assert x_train.dtype == np.uint8 and x_train.shape == (N_TRAIN, 28, 28)
    assert x_test.dtype == np.uint8 and x_test.shape == (N_TEST, 28, 28)
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    np.testing.assert_array_equal(x_train, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(x_test, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(y_test, arrays["t10k-labels-idx1-ubyte"])
    assert _snapshot(tmp_path) == before, "loading must never write into the data folder"


def test_pmnist_on_tiny_files_standardises_and_permutes(tmp_path: Path) -> None:
    arrays = _make_mnist(tmp_path)
    stream = PermutedMNIST(tmp_path, num_tasks=3, val_fraction=0.1, seed=5)
    assert stream.name == "pmnist" and stream.input_shape == (784,) and stream.num_classes == 10
    task = stream.task(2)
    assert (len(task.train), len(task.val), len(task.test)) == (18, 2, N_TEST)
    assert task.train.x.dtype == torch.float32 and task.train.x.shape == (18, 784)
    assert task.train.y.dtype == torch.int64

    perm = stream.permutation(2)
    base = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].reshape(N_TEST, -1))
    expected = (base[:, perm].float() / 255.0 - 0.1307) / 0.3081
    torch.testing.assert_close(task.test.x, expected)
    assert torch.equal(task.test.y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())

    train_labels = arrays["train-labels-idx1-ubyte"].astype(np.int64)
    got = sorted(task.train.y.tolist() + task.val.y.tolist())
    assert got == sorted(train_labels.tolist())


def test_read_idx_reads_other_types(tmp_path: Path) -> None:
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    path = tmp_path / "ints-idx2"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + np.array([2, 3], ">u4").tobytes() + arr.tobytes())
    out = read_idx(path)
    assert out.shape == (2, 3) and out.dtype.isnative and out.flags.writeable
    np.testing.assert_array_equal(out, arr)


def _corrupt_bad_magic(path: Path) -> None:
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[0:4] = b"\x12\x34\x08\x03"
    path.write_bytes(gzip.compress(bytes(data)))


def _corrupt_truncated_payload(path: Path) -> None:
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))


def _corrupt_truncated_gzip(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _corrupt_not_gzip(path: Path) -> None:
    path.write_bytes(b"<html>not found</html>")


@pytest.mark.parametrize(
    "corrupt",
    [_corrupt_bad_magic, _corrupt_truncated_payload, _corrupt_truncated_gzip, _corrupt_not_gzip],
)
def test_damaged_file_names_the_file(tmp_path: Path, corrupt: Callable[[Path], None]) -> None:
    _make_mnist(tmp_path)
    bad = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    corrupt(bad)
    with pytest.raises(DataError) as info:
        PermutedMNIST(tmp_path, num_tasks=1)
    message = str(info.value)
    assert str(bad) in message
    assert "download it again" in message


def test_damaged_plain_file_names_the_file(tmp_path: Path) -> None:
    _make_mnist(tmp_path, gz_files=set())
    bad = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated") as info:
        load_mnist(tmp_path, download=False)
    assert str(bad) in str(info.value)


def test_wrong_image_shape_is_reported(tmp_path: Path) -> None:
    _make_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    _write(raw / "t10k-images-idx3-ubyte", np.zeros((N_TEST, 32, 32), np.uint8), gz=False)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path, download=False)


def test_image_label_count_mismatch(tmp_path: Path) -> None:
    _make_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "train-labels-idx1-ubyte.gz").unlink()
    _write(raw / "train-labels-idx1-ubyte", np.zeros(N_TRAIN - 1, np.uint8), gz=True)
    with pytest.raises(DataError, match="19 labels"):
        load_mnist(tmp_path, download=False)


# ----------------------------------------------------------------------------- missing files


def _assert_missing_message(message: str, root: Path) -> None:
    for stem in FILES:
        assert f"{stem}.gz" in message
    assert str(root / "MNIST" / "raw") in message
    assert "--data-dir" in message and "QPACKNET_DATA" in message
    assert "https://" in message or "http://" in message


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torchvision's downloader fails as it does without network; records the URLs tried."""
    from torchvision.datasets import utils as tv_utils

    tried: list[str] = []

    def fail(url: str, root: str, filename: str | None = None, md5: str | None = None) -> None:
        tried.append(url)
        os.makedirs(root, exist_ok=True)
        Path(root, filename or os.path.basename(url)).write_bytes(b"partial")
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(tv_utils, "download_url", fail)
    return tried


def test_missing_files_download_disabled(tmp_path: Path, offline: list[str]) -> None:
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(DataError) as info:
        load_mnist(root, download=False)
    _assert_missing_message(str(info.value), root)
    assert offline == []
    assert list(root.iterdir()) == []


def test_missing_files_unwritable_dir(
    tmp_path: Path, offline: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "readonly"
    root.mkdir()
    os.chmod(root, 0o555)
    monkeypatch.setattr(mnist_files, "is_writable", lambda path: False)
    try:
        with pytest.raises(DataError) as info:
            PermutedMNIST(root, num_tasks=1)
        _assert_missing_message(str(info.value), root)
        assert "not writable" in str(info.value)
        assert offline == [], "no download may be attempted into an unwritable folder"
        assert list(root.iterdir()) == []
    finally:
        os.chmod(root, 0o755)


def test_missing_files_offline_leaves_no_trace(tmp_path: Path, offline: list[str]) -> None:
    root = tmp_path / "fresh"
    with pytest.raises(DataError) as info:
        load_mnist(root)
    _assert_missing_message(str(info.value), root)
    assert "download failed" in str(info.value)
    assert offline, "a writable folder should get a download attempt"
    assert not root.exists(), "a failed download must remove what it created"


def test_partial_set_downloads_only_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import utils as tv_utils

    arrays = _make_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    fetched: list[str] = []

    def fake(url: str, root: str, filename: str | None = None, md5: str | None = None) -> None:
        fetched.append(str(filename))
        stem = str(filename).removesuffix(".gz")
        _write(Path(root) / stem, arrays[stem], gz=True)

    monkeypatch.setattr(tv_utils, "download_url", fake)
    _, _, _, y_test = load_mnist(tmp_path)
    assert fetched == ["t10k-labels-idx1-ubyte.gz"]
    np.testing.assert_array_equal(y_test, arrays["t10k-labels-idx1-ubyte"])


def test_is_writable(tmp_path: Path) -> None:
    assert datadir.is_writable(tmp_path)
    assert datadir.is_writable(tmp_path / "not" / "yet" / "there")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert not datadir.is_writable(a_file)
    assert not datadir.is_writable(a_file / "below")


# ----------------------------------------------------------------------------- data dir


def test_data_dir_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QPACKNET_DATA", raising=False)
    assert resolve_data_dir(None) == Path("data")
    monkeypatch.setenv("QPACKNET_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(str(tmp_path / "cli")) == tmp_path / "cli"


def test_build_stream_uses_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_mnist(tmp_path / "cli")
    _make_mnist(tmp_path / "env")
    monkeypatch.setenv("QPACKNET_DATA", str(tmp_path / "env"))
    cfg = ScenarioConfig(name="pmnist", num_tasks=2, val_fraction=0.5)
    stream = build_stream(cfg, seed=1, data_dir=str(tmp_path / "cli"), device="cpu")
    assert isinstance(stream, PermutedMNIST) and stream.num_tasks == 2
    assert len(stream.task(1).train) == N_TRAIN // 2
    (tmp_path / "cli" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").unlink()
    assert isinstance(build_stream(cfg, 1, None, "cpu"), PermutedMNIST)


# ----------------------------------------------------------------------------- permutations


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    _make_mnist(tmp_path)
    return tmp_path


def test_pmnist_is_deterministic(tiny_root: Path) -> None:
    a = PermutedMNIST(tiny_root, num_tasks=3, seed=7).task(1)
    b = PermutedMNIST(tiny_root, num_tasks=3, seed=7).task(1)
    for split_a, split_b in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(split_a.x, split_b.x) and torch.equal(split_a.y, split_b.y)
    c = PermutedMNIST(tiny_root, num_tasks=3, seed=8).task(1)
    assert not torch.equal(a.test.x, c.test.x)


def test_tasks_are_distinct_permutations_of_the_same_pixels(tiny_root: Path) -> None:
    stream = PermutedMNIST(tiny_root, num_tasks=3, seed=0)
    tasks = [stream.task(i) for i in range(3)]
    identity = torch.arange(784)
    for i in range(3):
        perm = stream.permutation(i)
        assert not torch.equal(perm, identity), "task 0 is permuted too"
        assert torch.equal(perm.sort().values, identity)
        for j in range(i):
            assert not torch.equal(tasks[i].train.x, tasks[j].train.x)
    for split in ("train", "val", "test"):
        ref = getattr(tasks[0], split)
        for t in tasks[1:]:
            other = getattr(t, split)
            assert torch.equal(ref.x.sort(dim=1).values, other.x.sort(dim=1).values)
            assert torch.equal(ref.y, other.y), "the split must be the same rows for every task"


def test_split_sizes_and_train_limit(tiny_root: Path) -> None:
    stream = PermutedMNIST(tiny_root, num_tasks=2, val_fraction=0.25)
    assert stream.split_sizes == (15, 5, N_TEST)
    limited = PermutedMNIST(tiny_root, num_tasks=2, val_fraction=0.25, train_limit=4)
    task = limited.task(0)
    assert (len(task.train), len(task.val), len(task.test)) == (4, 5, N_TEST)
    full = stream.task(0)
    assert torch.equal(task.train.x, full.train.x[:4])
    assert torch.equal(task.val.x, full.val.x)


def test_test_split_is_cached_and_matches_task(tiny_root: Path) -> None:
    stream = PermutedMNIST(tiny_root, num_tasks=2)
    first = stream.test_split(1)
    assert stream.test_split(1) is first
    assert torch.equal(stream.task(1).test.x, first.x)


def test_index_out_of_range(tiny_root: Path) -> None:
    stream = PermutedMNIST(tiny_root, num_tasks=2)
    with pytest.raises(IndexError, match="out of range"):
        stream.task(2)
    with pytest.raises(IndexError, match="out of range"):
        stream.test_split(-1)


@pytest.mark.skipif(
    not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="shared MNIST files not present"
)
def test_real_mnist_sizes_and_read_only() -> None:
    before = _snapshot(SHARED_DATA)
    stream = PermutedMNIST(SHARED_DATA, num_tasks=2)
    task = stream.task(1)
    assert (len(task.train), len(task.val), len(task.test)) == (54000, 6000, 10000)
    assert task.train.x.shape == (54000, 784) and task.train.x.dtype == torch.float32
    assert set(task.test.y.unique().tolist()) == set(range(10))
    assert abs(task.train.x.mean().item()) < 0.05 and abs(task.train.x.std().item() - 1) < 0.05
    assert _snapshot(SHARED_DATA) == before, "nothing may be written into the shared data folder"


# ----------------------------------------------------------------------------- digits


def test_digits_sizes_and_labels() -> None:
    stream = PermutedDigits(num_tasks=2, val_fraction=0.1, seed=0)
    assert stream.name == "digits" and stream.input_shape == (64,) and stream.num_classes == 10
    task = stream.task(0)
    n_train, n_val, n_test = len(task.train), len(task.val), len(task.test)
    assert n_train + n_val + n_test == 1797
    assert abs(n_test - 0.2 * 1797) <= 10
    assert abs(n_val - 0.1 * (1797 - n_test)) <= 10
    for split in (task.train, task.val, task.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1] == 64
        assert set(split.y.unique().tolist()) == set(range(10))
    assert len(PermutedDigits(num_tasks=1, train_limit=100).task(0).train) == 100


def test_digits_is_deterministic_and_permuted() -> None:
    a = PermutedDigits(num_tasks=3, seed=3)
    b = PermutedDigits(num_tasks=3, seed=3)
    ta, tb = a.task(2), b.task(2)
    assert torch.equal(ta.train.x, tb.train.x) and torch.equal(ta.test.y, tb.test.y)
    t0 = a.task(0)
    assert not torch.equal(t0.train.x, ta.train.x)
    assert torch.equal(t0.train.x.sort(dim=1).values, ta.train.x.sort(dim=1).values)
    assert torch.equal(t0.val.y, ta.val.y)
    assert not torch.equal(PermutedDigits(num_tasks=1, seed=4).task(0).val.y, t0.val.y)


def test_build_stream_digits() -> None:
    cfg = ScenarioConfig(name="digits", num_tasks=2, val_fraction=0.2, train_limit=50)
    stream = build_stream(cfg, seed=0, data_dir=None, device="cpu")
    assert isinstance(stream, PermutedDigits) and stream.num_tasks == 2
    assert len(stream.task(1).train) == 50
