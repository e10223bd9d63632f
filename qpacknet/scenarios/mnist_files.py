"""MNIST from torchvision's on-disk layout, parsed here rather than by torchvision.

``torchvision.datasets.MNIST`` unpacks the ``.gz`` files into ``raw/`` next to them, which a
shared read-only data folder forbids. This module reads the idx files directly (plain or
gzipped) and writes nothing unless files are missing, downloading is allowed and the folder is
writable.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qpacknet.errors import DataError
from qpacknet.scenarios.datadir import ENV_VAR, is_writable

IMAGE_SIZE = 28
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# Used only for messages and when torchvision cannot be imported; the download itself takes
# its mirrors and checksums from torchvision.datasets.MNIST.
FALLBACK_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DOWNLOAD_TIMEOUT_S = 30.0

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MnistArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def raw_dir(root: Path) -> Path:
    """``<root>/MNIST/raw``: torchvision's layout, so an existing torchvision cache works."""
    return Path(root) / "MNIST" / "raw"


def _mirrors() -> list[str]:
    try:
        from torchvision.datasets import MNIST
    except ImportError:
        return list(FALLBACK_MIRRORS)
    return list(MNIST.mirrors)


def _damaged(path: Path, reason: str) -> DataError:
    name = path.name if path.name.endswith(".gz") else f"{path.name}.gz"
    return DataError(
        f"MNIST file {path} is damaged: {reason}. Delete it and download it again "
        f"({_mirrors()[0]}{name}), or point --data-dir / {ENV_VAR} at a folder whose "
        f"MNIST/raw/ holds intact copies."
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise _damaged(path, f"not a complete gzip stream ({exc})") from exc
    except OSError as exc:
        raise DataError(f"cannot read MNIST file {path}: {exc}") from exc


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (the format of the MNIST release), plain or gzipped.

    Header: two zero bytes, a type code, the number of dimensions, then each dimension as a
    big-endian uint32; the data follow with nothing after them. Any deviation is reported as
    a damaged file rather than surfacing later as a reshape error. The result is a writable,
    native-endian copy, so torch can adopt it without warnings.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise _damaged(path, f"only {len(data)} bytes, shorter than the idx header")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise _damaged(path, f"bad magic number 0x{int.from_bytes(data[:4], 'big'):08x}")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _damaged(path, "truncated inside the idx header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise _damaged(
            path, f"{what}: {len(data)} bytes where the header {list(dims)} implies {expected}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _check_images(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise _damaged(
            path,
            f"expected uint8 images of shape [N, {IMAGE_SIZE}, {IMAGE_SIZE}], "
            f"got {arr.dtype} {list(arr.shape)} (magic 2051)",
        )
    return arr


def _check_labels(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise _damaged(
            path, f"expected uint8 labels of shape [N], got {arr.dtype} {list(arr.shape)}"
        )
    if arr.size and int(arr.max()) > 9:
        raise _damaged(path, f"label {int(arr.max())} outside 0..9")
    return arr.astype(np.int64)


def find_file(folder: Path, stem: str) -> Path | None:
    """The plain file if present (cheaper to read), else the ``.gz`` one, else None."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def missing_files(root: Path) -> list[str]:
    """Stems of the four MNIST files found neither plain nor gzipped under ``root``."""
    folder = raw_dir(root)
    return [stem for stem in FILES if find_file(folder, stem) is None]


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's downloader opens URLs without a timeout; a firewall that drops packets
    # would otherwise hang the run instead of failing with the instructions below.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _download(root: Path, stems: list[str]) -> None:
    """Fetch the missing ``.gz`` files with torchvision's helper (mirrors and md5 checked).

    On failure, partial files and folders this call created are removed so that a failed
    attempt leaves the data folder as it found it.
    """
    from torchvision.datasets import MNIST
    from torchvision.datasets import utils as tv_utils

    folder = raw_dir(root)
    created = [p for p in (Path(root), Path(root) / "MNIST", folder) if not p.exists()]
    md5s = dict(MNIST.resources)
    errors: list[str] = []
    with _socket_timeout(DOWNLOAD_TIMEOUT_S):
        for stem in stems:
            filename = f"{stem}.gz"
            target = folder / filename
            for mirror in MNIST.mirrors:
                try:
                    tv_utils.download_url(
                        f"{mirror}{filename}",
                        root=str(folder),
                        filename=filename,
                        md5=md5s.get(filename),
                    )
                    break
                except Exception as exc:
                    errors.append(f"{mirror}{filename}: {exc}")
                    target.unlink(missing_ok=True)
            else:
                _remove_created(created)
                raise RuntimeError("; ".join(errors))


def _missing_error(root: Path, missing: list[str], why: str) -> DataError:
    folder = raw_dir(root)
    mirrors = _mirrors()
    listing = "\n".join(f"  {stem}.gz{'   (missing)' if stem in missing else ''}" for stem in FILES)
    return DataError(
        f"MNIST not found: {len(missing)} of its 4 files are missing from {folder}/ ({why}).\n"
        f"Put these four files (gzipped or unpacked) into {folder}/:\n{listing}\n"
        f"Download them from {' or '.join(mirrors)} (same file names).\n"
        f"To use another data folder, pass --data-dir DIR or set {ENV_VAR}=DIR; "
        f"the files then go into DIR/MNIST/raw/."
    )


def load_mnist(root: Path, download: bool = True) -> MnistArrays:
    """Read MNIST from ``<root>/MNIST/raw``: ``(x_train, y_train, x_test, y_test)``.

    Images are uint8 ``[N, 28, 28]``, labels int64 ``[N]``. Missing files are downloaded only
    when ``download`` is set and ``root`` is writable; otherwise (or when the download fails,
    e.g. offline) a :class:`DataError` says which files to put where.
    """
    root = Path(root)
    missing = missing_files(root)
    if missing:
        if not download:
            raise _missing_error(root, missing, "downloading is disabled")
        if not is_writable(root):
            raise _missing_error(
                root, missing, f"{root} is not writable, so nothing was downloaded"
            )
        try:
            _download(root, missing)
        except Exception as exc:
            raise _missing_error(root, missing, f"automatic download failed: {exc}") from exc
        missing = missing_files(root)
        if missing:
            raise _missing_error(root, missing, "the download left files missing")
    folder = raw_dir(root)
    paths = {stem: find_file(folder, stem) for stem in FILES}
    arrays: dict[str, np.ndarray] = {}
    for stem, path in paths.items():
        assert path is not None
        arr = read_idx(path)
        arrays[stem] = _check_images(path, arr) if "images" in stem else _check_labels(path, arr)
    for images, labels in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        if arrays[images].shape[0] != arrays[labels].shape[0]:
            raise DataError(
                f"MNIST files disagree: {paths[images]} holds {arrays[images].shape[0]} images "
                f"but {paths[labels]} holds {arrays[labels].shape[0]} labels. One of them is "
                f"damaged or from another data set; download both again into {folder}/."
            )
    return arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS], arrays[TEST_IMAGES], arrays[TEST_LABELS]
