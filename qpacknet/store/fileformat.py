"""The packed model file: one safetensors file that grows with what the tasks use.

DESIGN.md §2 ("Metrics", saved-file paragraph): per task the file stores the mask as a bitset, the
owned weights' codes packed back to back at ``b_t`` bits, the codebooks, the head and the
normalisation state -- never the 32-bit words. :func:`load` rebuilds the words by re-committing
the tasks in order through :meth:`PackedStore.commit`, which re-checks every invariant. safetensors
holds raw tensors and a string header only, so loading a file never executes code (no pickle).

Tensors (``{t}`` is the task id, ``{layer}`` a layer name verbatim, dots included):

``task.{t}.mask.{layer}``
    uint8, ``ceil(|θ_l|/8)`` bytes: the mask flattened row-major, one bit per weight, LSB-first
    (:func:`qpacknet.store.bits.pack_mask`).
``task.{t}.codes.{layer}``
    uint8, ``ceil(n_tl*b_tl/8)`` bytes: the ``n_tl`` owned weights' codes in row-major mask
    order, ``b_tl`` bits each, LSB-first (:func:`qpacknet.store.bits.pack_bits`); ``b_tl`` is
    the layer's width (``b_t`` unless the task has per-layer widths).
``task.{t}.codebook.{layer}``
    float32, ``2**b_tl`` centroids.
``task.{t}.state.{name}``
    the task's ``task_state`` tensors as given (head weight and bias, normalisation state).
``networks``
    only in a version-3 file: int64, one entry per task, its network (the same map as the
    header's, but under a checksum, so a damaged header cannot move a task to other words).
``task.{t}.shared.{layer}``
    only for a task that shares weights (TinySubNets option): uint8 bitset like the mask, the
    earlier tasks' weights it reads. Shared weights have no codes.
``task.{t}.recognise.{name}``
    only for a task with task-recognition statistics (:mod:`qpacknet.recognise`): float32
    summaries of its training split, ``name`` one of ``input.mean``, ``input.var`` (``[P]``,
    ``P`` network-input values), ``feature.means`` (``[C_t, D]``) and ``feature.whiten``
    (``[D(D+1)/2]``). Growth per task: ``8 P`` bytes for the input statistics (6,272 for a
    784-input MLP), ``4 (C_t D + D(D+1)/2)`` for the feature statistics (24,200 for D = 100,
    C_t = 10), plus their header entries.

Header: the safetensors string metadata holds one key, ``"qpacknet"``, whose value is a JSON
document:

``format``
    ``"qpacknet-packed"``.
``version``
    ``1``; ``2`` when a task shares weights (so a reader that predates sharing refuses the
    file instead of dropping the shared weights); ``3`` when the model has grown to several
    networks (a reader that predates networks would decode later tasks from the wrong words);
    ``4`` when a task has per-layer bit widths (a reader that predates them would unpack its
    codes at the wrong width) or task-recognition statistics (a reader that predates them
    would call their tensors damage instead of saying that the file is newer). In a version-4
    file every task names its network. This reader reads all four.
``b_max``
    largest component width (the availability rule).
``layers``
    list of ``{"name": str, "shape": [int, ...]}`` in store order.
``meta``
    the store's backbone description, verbatim.
``tasks``
    list, in task order, of ``{"bit_width": int, "code_counts": {layer: int}, "state": [name,
    ...]}`` (plus ``"shared": true`` for a task that shares weights, and ``"network": k`` in a
    version-3 or -4 file, where every task names it, and ``"bit_widths": {layer: int}`` in a
    version-4 file for a task whose layers differ, ``bit_width`` then being the widest);
    ``code_counts`` is each layer's mask popcount. Networks are numbered in the order they
    were opened: the first task is in network 0 and each task is in its predecessor's network
    or the next one (:meth:`PackedStore.grow`).
``sha256``
    ``{tensor name: hex digest}`` of every tensor's raw bytes, so that damage inside the tensor
    data (which safetensors itself does not detect) is caught on load.
``input``
    optional: ``{"tasks": [doc or null, ...]}``, per task how its scenario turned a raw input
    into the network's input (:mod:`qpacknet.preparation`), so that a model can be used on
    new data without the data set or the run's config. Absent in files of stores that record
    none (and in files written before it existed, which load as before); readers that predate
    it ignore it. It is not under the checksums: it changes no weight, and a damaged entry
    is reported when it is read.
``recognise``
    optional: ``{"version": 1, "tasks": [{name: shape} or null, ...]}``, per task the shapes
    of its ``task.{t}.recognise.*`` tensors (null: the task has none). Absent in files written
    before the statistics existed; those load without them and tasks are then inferred by
    prediction entropy (:func:`qpacknet.recognise.choose` says so). The tensors are under the
    checksums like every other. A reader that predates this entry refuses such a file
    ("unexpected tensors").

Writes are atomic: the file is written to a temporary name in the same directory, flushed and
fsynced, then moved over ``path`` with :func:`os.replace`; a failure removes the temporary file
and leaves any existing ``path`` untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qpacknet.errors import ModelFileError, StoreError
from qpacknet.layerspec import LayerSpec
from qpacknet.store.bits import pack_bits, pack_mask, packed_nbytes, unpack_bits, unpack_mask
from qpacknet.store.packed import PackedStore

FORMAT_NAME = "qpacknet-packed"
FORMAT_VERSION = 1
SHARING_VERSION = 2
NETWORKS_VERSION = 3
LAYER_WIDTHS_VERSION = 4
VERSIONS = (FORMAT_VERSION, SHARING_VERSION, NETWORKS_VERSION, LAYER_WIDTHS_VERSION)
NETWORKS_TENSOR = "networks"
METADATA_KEY = "qpacknet"


def _tensor_name(task: int, kind: str, name: str) -> str:
    return f"task.{task}.{kind}.{name}"


def _digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw (contiguous, CPU) bytes."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _encode(store: PackedStore) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and header document that describe ``store`` (codes read from its words)."""
    tensors: dict[str, torch.Tensor] = {}
    tasks = []
    version4 = any(len(set(store.bit_widths(t).values())) > 1 for t in range(store.num_tasks))
    version4 |= any(store.recognition_stats(t) for t in range(store.num_tasks))
    for t in range(store.num_tasks):
        widths = store.bit_widths(t)
        masks, codes, books = store.mask(t), store.codes(t), store.codebooks(t)
        state = store.task_state(t)
        for spec in store.layers:
            tensors[_tensor_name(t, "mask", spec.name)] = pack_mask(masks[spec.name])
            tensors[_tensor_name(t, "codes", spec.name)] = pack_bits(
                codes[spec.name], widths[spec.name]
            )
            tensors[_tensor_name(t, "codebook", spec.name)] = books[spec.name].contiguous()
        for key, value in state.items():
            tensors[_tensor_name(t, "state", key)] = value.contiguous()
        entry: dict[str, Any] = {
            "bit_width": store.bit_width(t),
            "code_counts": {s.name: int(codes[s.name].numel()) for s in store.layers},
            "state": list(state),
        }
        shared = store.shared(t)
        if any(bool(m.any()) for m in shared.values()):
            entry["shared"] = True
            for spec in store.layers:
                tensors[_tensor_name(t, "shared", spec.name)] = pack_mask(shared[spec.name])
        if len(set(widths.values())) > 1:
            entry["bit_widths"] = widths
        if store.num_networks > 1 or version4:
            entry["network"] = store.network_of(t)
        tasks.append(entry)
    if store.num_networks > 1 or version4:
        tensors[NETWORKS_TENSOR] = torch.tensor(
            [store.network_of(t) for t in range(store.num_tasks)], dtype=torch.int64
        )
    recognise = _encode_recognise(store, tensors)
    sharing = any(entry.get("shared") for entry in tasks)
    version = SHARING_VERSION if sharing else FORMAT_VERSION
    if store.num_networks > 1:
        version = NETWORKS_VERSION
    if version4:
        version = LAYER_WIDTHS_VERSION
    header = {
        "format": FORMAT_NAME,
        "version": version,
        "b_max": store.b_max,
        "layers": [{"name": s.name, "shape": list(s.shape)} for s in store.layers],
        "meta": store.meta,
        "tasks": tasks,
        "sha256": {name: _digest(tensor) for name, tensor in tensors.items()},
    }
    inputs = [store.input_preparation(t) for t in range(store.num_tasks)]
    if any(doc is not None for doc in inputs):
        header["input"] = {"tasks": inputs}
    if recognise is not None:
        header["recognise"] = recognise
    return tensors, header


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_store(store: PackedStore, path: str | os.PathLike[str]) -> None:
    """Write ``store`` to ``path`` atomically in the format described in this module.

    Raises :class:`ModelFileError` when the file cannot be written (e.g. a missing directory);
    ``path`` then still holds its previous content, if any.
    """
    path = Path(path)
    tensors, header = _encode(store)
    metadata = {METADATA_KEY: json.dumps(header, sort_keys=True)}
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        # Created here with O_EXCL so the final file gets the usual umask-derived mode.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise ModelFileError(
            f"cannot write model file {path}: {exc.strerror or exc}; "
            "fix: make sure the directory exists and is writable"
        ) from exc
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise ModelFileError(
                f"cannot write model file {path}: {exc.strerror or exc}; the previous file, "
                "if any, is unchanged; fix: check free disk space and permissions"
            ) from exc
        raise
    _fsync_dir(path.parent)


def _fail(path: Path, problem: str, fix: str) -> ModelFileError:
    return ModelFileError(f"model file {path}: {problem}; fix: {fix}")


_DAMAGED_FIX = "the file is damaged or incomplete; restore it from a good copy or save it again"


def _read_header(path: Path, metadata: dict[str, str] | None) -> dict[str, Any]:
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise _fail(
            path,
            f"not a qpacknet model (no {METADATA_KEY!r} header entry)",
            "pass a file written by qpacknet (qpacknet.store.save_store)",
        )
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise _fail(path, f"header is not valid JSON ({exc})", _DAMAGED_FIX) from exc
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object", _DAMAGED_FIX)
    if header.get("format") != FORMAT_NAME:
        raise _fail(
            path,
            f"format is {header.get('format')!r}, expected {FORMAT_NAME!r}",
            "pass a file written by qpacknet (qpacknet.store.save_store)",
        )
    if header.get("version") not in VERSIONS:
        raise _fail(
            path,
            f"format version {header.get('version')!r} is not supported (this qpacknet reads "
            f"versions {', '.join(map(str, VERSIONS))})",
            "load it with the qpacknet release that wrote it, or save it again with this one",
        )
    return header


def _build_store(path: Path, header: dict[str, Any]) -> PackedStore:
    """An empty store from the header's layers, b_max and meta."""
    try:
        layers = [
            LayerSpec(str(entry["name"]), tuple(entry["shape"])) for entry in header["layers"]
        ]
        return PackedStore(layers, b_max=header["b_max"], meta=header["meta"])
    except (KeyError, TypeError, StoreError) as exc:
        raise _fail(path, f"invalid layer description in header ({exc})", _DAMAGED_FIX) from exc


def _check_tasks(path: Path, header: dict[str, Any], store: PackedStore) -> list[dict[str, Any]]:
    tasks = header.get("tasks")
    if not isinstance(tasks, list):
        raise _fail(path, "header has no task list", _DAMAGED_FIX)
    names = {s.name for s in store.layers}
    for t, entry in enumerate(tasks):
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("bit_width"), int)
            and isinstance(entry.get("code_counts"), dict)
            and set(entry["code_counts"]) == names
            and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0
                for n in entry["code_counts"].values()
            )
            and isinstance(entry.get("state"), list)
            and all(isinstance(k, str) for k in entry["state"])
            and entry.get("shared", False) in (True, False)
            and not (entry.get("shared") and header.get("version") == FORMAT_VERSION)
            and _network_ok(entry, tasks[t - 1] if t else None, header.get("version"))
            and _widths_ok(entry, names, header.get("version"))
        )
        if not ok:
            raise _fail(path, f"header entry of task {t} is malformed", _DAMAGED_FIX)
        for width in layer_widths(entry, store).values():
            if not 1 <= width <= store.b_max:
                raise _fail(path, f"task {t} has bit width {width} outside 1..b_max", _DAMAGED_FIX)
    return tasks


def _widths_ok(entry: Any, names: set[str], version: Any) -> bool:
    """Per-layer widths only in a version-4 file: every layer named, ints, the widest being
    the entry's ``bit_width``."""
    if not isinstance(entry, dict) or "bit_widths" not in entry:
        return True
    widths = entry["bit_widths"]
    return (
        version == LAYER_WIDTHS_VERSION
        and isinstance(widths, dict)
        and set(widths) == names
        and all(isinstance(w, int) and not isinstance(w, bool) for w in widths.values())
        and max(widths.values()) == entry["bit_width"]
    )


def layer_widths(entry: dict[str, Any], store: PackedStore) -> dict[str, int]:
    """A header task entry's width per layer (its ``bit_width`` for every layer unless it
    lists ``bit_widths``)."""
    if "bit_widths" in entry:
        return {s.name: entry["bit_widths"][s.name] for s in store.layers}
    return {s.name: entry["bit_width"] for s in store.layers}


def _network_ok(entry: Any, before: Any, version: Any) -> bool:
    """Networks are numbered as opened: the first task in 0, each next one in its
    predecessor's network or the one after; only a version-3 or -4 file names networks."""
    network = entry.get("network", 0) if isinstance(entry, dict) else None
    if isinstance(network, bool) or not isinstance(network, int):
        return False
    if ("network" in entry) != (version in (NETWORKS_VERSION, LAYER_WIDTHS_VERSION)):
        return False
    previous = before.get("network", 0) if isinstance(before, dict) else None
    if before is None:
        return network == 0
    return isinstance(previous, int) and network in (previous, previous + 1)


def _expected_tensors(
    store: PackedStore, tasks: list[dict[str, Any]]
) -> dict[str, tuple[torch.dtype | None, tuple[int, ...] | None]]:
    """Every tensor the header promises, with its dtype and shape where the format fixes them."""
    expected: dict[str, tuple[torch.dtype | None, tuple[int, ...] | None]] = {}
    for t, entry in enumerate(tasks):
        widths = layer_widths(entry, store)
        for spec in store.layers:
            width = widths[spec.name]
            count = entry["code_counts"][spec.name]
            expected[_tensor_name(t, "mask", spec.name)] = (
                torch.uint8,
                (packed_nbytes(spec.numel, 1),),
            )
            expected[_tensor_name(t, "codes", spec.name)] = (
                torch.uint8,
                (packed_nbytes(count, width),),
            )
            expected[_tensor_name(t, "codebook", spec.name)] = (torch.float32, (1 << width,))
            if entry.get("shared"):
                expected[_tensor_name(t, "shared", spec.name)] = (
                    torch.uint8,
                    (packed_nbytes(spec.numel, 1),),
                )
        for key in entry["state"]:
            expected[_tensor_name(t, "state", key)] = (None, None)
    if any("network" in entry for entry in tasks):
        expected[NETWORKS_TENSOR] = (torch.int64, (len(tasks),))
    return expected


def load_store(path: str | os.PathLike[str]) -> PackedStore:
    """Read a file written by :func:`save_store` and rebuild the store by re-committing each task.

    Raises :class:`ModelFileError`, naming the path, the problem and the fix, for a missing
    file, bytes that are not a safetensors file (random, truncated, damaged), another format or
    version, missing or extra tensors, and sizes or checksums that disagree with the header.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file", "check the path, or save a model there first")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata()
            header = _read_header(path, metadata)
            store = _build_store(path, header)
            tasks = _check_tasks(path, header, store)
            expected = _expected_tensors(store, tasks)
            expected.update(_expected_recognise(path, header, len(tasks)))
            present = set(handle.keys())
            missing = sorted(set(expected) - present)
            if missing:
                raise _fail(path, f"missing tensors {missing[:5]}", _DAMAGED_FIX)
            extra = sorted(present - set(expected))
            if extra:
                raise _fail(path, f"unexpected tensors {extra[:5]}", _DAMAGED_FIX)
            tensors = {name: handle.get_tensor(name) for name in expected}
    except ModelFileError:
        raise
    except Exception as exc:
        raise _fail(
            path, f"not a readable safetensors file ({type(exc).__name__}: {exc})", _DAMAGED_FIX
        ) from exc

    digests = header.get("sha256")
    if not isinstance(digests, dict):
        raise _fail(path, "header has no tensor checksums", _DAMAGED_FIX)
    for name, (dtype, shape) in expected.items():
        tensor = tensors[name]
        if dtype is not None and (tensor.dtype != dtype or tuple(tensor.shape) != shape):
            raise _fail(
                path,
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, header implies "
                f"{dtype} {shape}",
                _DAMAGED_FIX,
            )
        if digests.get(name) != _digest(tensor):
            raise _fail(path, f"checksum mismatch in tensor {name!r}", _DAMAGED_FIX)
    if NETWORKS_TENSOR in expected:
        saved = tensors[NETWORKS_TENSOR].tolist()
        for t, entry in enumerate(tasks):
            if entry["network"] != saved[t]:
                raise _fail(
                    path,
                    f"the header puts task {t} in network {entry['network']}, the checksummed "
                    f"task -> network map in network {saved[t]}",
                    _DAMAGED_FIX,
                )

    for t, entry in enumerate(tasks):
        widths = layer_widths(entry, store)
        masks, codes, books = {}, {}, {}
        for spec in store.layers:
            count = entry["code_counts"][spec.name]
            mask = unpack_mask(tensors[_tensor_name(t, "mask", spec.name)], spec.shape)
            if int(mask.sum()) != count:
                raise _fail(
                    path,
                    f"task {t} layer {spec.name!r}: mask has {int(mask.sum())} weights but the "
                    f"header counts {count} codes",
                    _DAMAGED_FIX,
                )
            masks[spec.name] = mask
            codes[spec.name] = unpack_bits(
                tensors[_tensor_name(t, "codes", spec.name)], widths[spec.name], count
            )
            books[spec.name] = tensors[_tensor_name(t, "codebook", spec.name)]
        state = {key: tensors[_tensor_name(t, "state", key)] for key in entry["state"]}
        shared = None
        if entry.get("shared"):
            shared = {
                s.name: unpack_mask(tensors[_tensor_name(t, "shared", s.name)], s.shape)
                for s in store.layers
            }
        if entry.get("network", 0) == store.num_networks:
            store.grow()
        try:
            store.commit(masks, codes, books, widths, state, shared)
        except StoreError as exc:
            raise _fail(path, f"task {t} cannot be re-committed: {exc}", _DAMAGED_FIX) from exc
    for t, doc in enumerate(_input_entries(path, header, len(tasks))):
        if doc is not None:
            store.set_input_preparation(t, doc)
    _set_recognise(path, header, store, tensors)
    return store


def _input_entries(path: Path, header: dict[str, Any], num_tasks: int) -> list[Any]:
    """The header's per-task input preparations (empty when the file records none)."""
    entry = header.get("input")
    if entry is None:
        return []
    docs = entry.get("tasks") if isinstance(entry, dict) else None
    if (
        not isinstance(docs, list)
        or len(docs) > num_tasks
        or not all(doc is None or isinstance(doc, dict) for doc in docs)
    ):
        raise _fail(path, "header entry 'input' is malformed", _DAMAGED_FIX)
    return docs


# task recognition (qpacknet.recognise): per-task statistics, tensors under the checksums -------

RECOGNISE_VERSION = 1


def _encode_recognise(store: PackedStore, tensors: dict[str, torch.Tensor]) -> Any:
    """Add every task's recognition statistics to ``tensors``; the header entry describing
    them, or None when no task has any."""
    entries: list[dict[str, list[int]] | None] = []
    for t in range(store.num_tasks):
        stats = store.recognition_stats(t)
        if stats is None:
            entries.append(None)
            continue
        entries.append({name: list(value.shape) for name, value in sorted(stats.items())})
        for name, value in stats.items():
            tensors[_tensor_name(t, "recognise", name)] = value.contiguous()
    if all(entry is None for entry in entries):
        return None
    return {"version": RECOGNISE_VERSION, "tasks": entries}


def _shape_ok(shape: Any) -> bool:
    return isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )


def _recognise_entries(path: Path, header: dict[str, Any], num_tasks: int) -> list[Any]:
    """The header's per-task statistics shapes (empty when the file records none)."""
    entry = header.get("recognise")
    if entry is None:
        return []
    docs = entry.get("tasks") if isinstance(entry, dict) else None
    ok = (
        isinstance(entry, dict)
        and entry.get("version") == RECOGNISE_VERSION
        and isinstance(docs, list)
        and len(docs) <= num_tasks
        and all(
            doc is None
            or (
                isinstance(doc, dict)
                and all(isinstance(k, str) and _shape_ok(v) for k, v in doc.items())
            )
            for doc in docs
        )
    )
    if not ok:
        raise _fail(path, "header entry 'recognise' is malformed", _DAMAGED_FIX)
    return docs


def _expected_recognise(
    path: Path, header: dict[str, Any], num_tasks: int
) -> dict[str, tuple[torch.dtype | None, tuple[int, ...] | None]]:
    """The recognition tensors the header promises: float32, of the recorded shapes."""
    expected: dict[str, tuple[torch.dtype | None, tuple[int, ...] | None]] = {}
    for t, doc in enumerate(_recognise_entries(path, header, num_tasks)):
        for name, shape in (doc or {}).items():
            expected[_tensor_name(t, "recognise", name)] = (torch.float32, tuple(shape))
    return expected


def _set_recognise(
    path: Path, header: dict[str, Any], store: PackedStore, tensors: dict[str, torch.Tensor]
) -> None:
    """Give the rebuilt store its tasks' statistics (already checksummed)."""
    for t, doc in enumerate(_recognise_entries(path, header, store.num_tasks)):
        if doc is None:
            continue
        stats = {name: tensors[_tensor_name(t, "recognise", name)] for name in doc}
        try:
            store.set_recognition_stats(t, stats)
        except StoreError as exc:
            raise _fail(path, str(exc), _DAMAGED_FIX) from exc
