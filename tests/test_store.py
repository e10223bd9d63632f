"""Tests of the packed store: bit packing, COMMIT, decode, the file format and eq. 10."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qpacknet.errors import ModelFileError, StoreError
from qpacknet.store import (
    CapacityReport,
    LayerSpec,
    PackedStore,
    capacity,
    fileformat,
    load_store,
    save_store,
)
from qpacknet.store.bits import pack_bits, pack_mask, unpack_bits, unpack_mask

LAYERS = [LayerSpec("layers.0", (4, 3)), LayerSpec("layers.1", (2, 4))]
STATE_KEYS = ("head.weight", "head.bias")


def make_task(
    store: PackedStore,
    gen: torch.Generator,
    bit_width: int,
    density: float | None = None,
    masks: dict[str, torch.Tensor] | None = None,
) -> tuple[dict, dict, dict, int, dict]:
    """Random commit arguments over the store's available weights (full masks if no density)."""
    avail = store.available()
    if masks is None:
        masks = {}
        for spec in store.layers:
            if density is None:
                masks[spec.name] = avail[spec.name].clone()
            else:
                draw = torch.rand(spec.shape, generator=gen) < density
                masks[spec.name] = draw & avail[spec.name]
    codes = {
        n: torch.randint(0, 1 << bit_width, (int(m.sum()),), generator=gen)
        for n, m in masks.items()
    }
    books = {n: torch.randn(1 << bit_width, generator=gen) for n in masks}
    state = {
        "head.weight": torch.randn(2, 3, generator=gen),
        "head.bias": torch.randn(2, generator=gen),
    }
    return masks, codes, books, bit_width, state


def expected_dense(masks: dict, codes: dict, books: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, mask in masks.items():
        dense = torch.zeros(mask.shape, dtype=torch.float32)
        dense[mask] = books[name][codes[name]]
        out[name] = dense
    return out


def snapshot(store: PackedStore) -> tuple[dict, dict, int]:
    words = {n: w.clone() for n, w in store.words.items()}
    used = {n: u.clone() for n, u in store.used_bits.items()}
    return words, used, store.num_tasks


def assert_same_snapshot(a: tuple[dict, dict, int], b: tuple[dict, dict, int]) -> None:
    assert a[2] == b[2]
    for name in a[0]:
        assert torch.equal(a[0][name], b[0][name])
        assert torch.equal(a[1][name], b[1][name])


def assert_stores_equal(a: PackedStore, b: PackedStore) -> None:
    assert a.layers == b.layers
    assert a.b_max == b.b_max
    assert a.meta == b.meta
    assert a.num_tasks == b.num_tasks
    assert a.num_networks == b.num_networks
    assert_same_snapshot(snapshot(a), snapshot(b))
    for t in range(a.num_tasks):
        assert a.network_of(t) == b.network_of(t)
        assert a.bit_width(t) == b.bit_width(t)
        da, db = a.decode(t), b.decode(t)
        for name in da:
            assert torch.equal(da[name], db[name])
            assert torch.equal(a.mask(t)[name], b.mask(t)[name])
            assert torch.equal(a.codebooks(t)[name], b.codebooks(t)[name])
        sa, sb = a.task_state(t), b.task_state(t)
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key])


# --- bits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", range(1, 33))
def test_pack_bits_round_trip_every_width(width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    top = (1 << width) - 1
    random = torch.randint(0, 1 << width, (1001,), generator=gen, dtype=torch.int64)
    values = torch.cat([torch.tensor([0, top, 0, top, top]), random])
    packed = pack_bits(values, width)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(values.numel() * width / 8)
    assert torch.equal(unpack_bits(packed, width, values.numel()), values)


def test_pack_bits_layout_is_lsb_first_and_padded() -> None:
    # 1 -> bits 1,0; 2 -> 0,1; 3 -> 1,1; stream 100111 -> 1 + 8 + 16 + 32 = 57
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [57]
    assert pack_bits(torch.tensor([0xABCDEF01]), 32).tolist() == [0x01, 0xEF, 0xCD, 0xAB]
    assert pack_bits(torch.tensor([1] * 9), 1).tolist() == [255, 1]


def test_pack_bits_across_chunks() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 8, (200_003,), generator=gen)
    assert torch.equal(unpack_bits(pack_bits(values, 3), 3, values.numel()), values)


def test_pack_bits_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([-1]), 8)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([1 << 32]), 32)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([1]), 0)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([1]), 33)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 3)


@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (3, 5), (2, 3, 5), (13, 1, 3)])
def test_mask_round_trip_odd_sizes(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=gen) < 0.5
    packed = pack_mask(mask)
    assert packed.numel() == math.ceil(math.prod(shape) / 8)
    assert torch.equal(unpack_mask(packed, shape), mask)


def test_mask_layout_row_major() -> None:
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 0] = True
    mask[2, 2] = True
    assert pack_mask(mask).tolist() == [1, 1]


# --- store: commit and decode ---------------------------------------------------------------


def test_four_full_8bit_tasks_fill_words_and_fifth_is_refused() -> None:
    gen = torch.Generator().manual_seed(1)
    store = PackedStore(LAYERS, b_max=8, meta={"backbone": "mlp", "sizes": [4, 3]})
    tasks = []
    for expected_id in range(4):
        args = make_task(store, gen, 8)
        assert store.commit(*args) == expected_id
        tasks.append(args)
        assert all(int(u.max()) <= 32 for u in store.used_bits.values())
    for name, used in store.used_bits.items():
        assert bool((used == 32).all())
        assert not bool(store.available()[name].any())
        assert int(store.words[name].max()) < 1 << 32
    name = LAYERS[0].name
    word = sum(int(tasks[t][1][name][0]) << (8 * t) for t in range(4))
    assert int(store.words[name].reshape(-1)[0]) == word
    for t, (masks, codes, books, _, _) in enumerate(tasks):
        dense = store.decode(t)
        for layer, want in expected_dense(masks, codes, books).items():
            assert torch.equal(dense[layer], want)

    before = snapshot(store)
    full = {s.name: torch.ones(s.shape, dtype=torch.bool) for s in LAYERS}
    with pytest.raises(StoreError, match="not available"):
        store.commit(*make_task(store, gen, 8, masks=full))
    with pytest.raises(StoreError, match="not available"):
        store.commit(*make_task(store, gen, 1, masks=full))
    assert_same_snapshot(before, snapshot(store))


def test_mixed_widths_up_to_exactly_32_bits(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    store = PackedStore(LAYERS, b_max=3)
    widths = [3, 2, 1] * 4 + [3, 2, 3]
    assert sum(widths) == 32
    tasks = []
    for width in widths:
        args = make_task(store, gen, width)
        store.commit(*args)
        tasks.append(args)
        assert all(int(u.max()) <= 32 for u in store.used_bits.values())
    assert all(bool((u == 32).all()) for u in store.used_bits.values())
    for t, (masks, codes, books, width, _) in enumerate(tasks):
        assert store.bit_width(t) == width
        for layer, want in expected_dense(masks, codes, books).items():
            assert torch.equal(store.decode(t)[layer], want)
    path = tmp_path / "model.safetensors"
    save_store(store, path)
    assert_stores_equal(store, load_store(path))


def test_random_sparse_tasks_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    layers = [LayerSpec("features.0.conv", (5, 3, 2, 2)), LayerSpec("fc", (7, 9))]
    store = PackedStore(layers, b_max=4, meta={"name": "tiny"})
    tasks = []
    while any(bool(a.any()) for a in store.available().values()) and len(tasks) < 60:
        width = int(torch.randint(1, 5, (1,), generator=gen))
        args = make_task(store, gen, width, density=0.6)
        store.commit(*args)
        tasks.append(args)
        assert all(int(u.max()) <= 32 for u in store.used_bits.values())
    assert len(tasks) > 8
    used = torch.cat([u.reshape(-1) for u in store.used_bits.values()])
    assert int(used.max()) > 28
    for t, (masks, codes, books, _, state) in enumerate(tasks):
        for layer, want in expected_dense(masks, codes, books).items():
            assert torch.equal(store.decode(t)[layer], want)
        assert store.density(t) == {s.name: int(masks[s.name].sum()) / s.numel for s in layers}
        got = store.task_state(t)
        assert all(torch.equal(got[k], state[k]) for k in STATE_KEYS)
        for layer in masks:
            assert torch.equal(store.codes(t)[layer], codes[layer])
    path = tmp_path / "m.safetensors"
    save_store(store, path)
    loaded = load_store(path)
    assert_stores_equal(store, loaded)
    assert loaded.meta == {"name": "tiny"}


def test_decode_reads_the_words_and_caches() -> None:
    gen = torch.Generator().manual_seed(4)
    store = PackedStore(LAYERS)
    store.commit(*make_task(store, gen, 8))
    store.commit(*make_task(store, gen, 2))
    first = store.decode(1)
    assert store.decode(1)[LAYERS[0].name] is first[LAYERS[0].name]
    store.clear_cache()
    again = store.decode(1)
    assert again[LAYERS[0].name] is not first[LAYERS[0].name]
    assert torch.equal(again[LAYERS[0].name], first[LAYERS[0].name])

    store.clear_cache()
    words = store.words[LAYERS[0].name]
    words.view(-1)[0] ^= 1 << 8  # lowest bit of task 1's component
    assert not torch.equal(store.decode(1)[LAYERS[0].name], first[LAYERS[0].name])


def test_commit_copies_its_inputs() -> None:
    gen = torch.Generator().manual_seed(5)
    store = PackedStore(LAYERS)
    masks, codes, books, width, state = make_task(store, gen, 4, density=0.5)
    store.commit(masks, codes, books, width, state)
    want = expected_dense(masks, codes, books)
    head = state["head.weight"].clone()
    for name in masks:
        masks[name].fill_(True)
        codes[name].zero_()
        books[name].zero_()
    state["head.weight"].zero_()
    for name, tensor in store.decode(0).items():
        assert torch.equal(tensor, want[name])
    assert torch.equal(store.task_state(0)["head.weight"], head)


def _bad_commits(store: PackedStore, gen: torch.Generator) -> list[tuple[str, tuple]]:
    a, b = LAYERS[0].name, LAYERS[1].name

    def variant(edit) -> tuple:
        masks, codes, books, width, state = make_task(store, gen, 3)
        masks = dict(masks)
        codes = dict(codes)
        books = dict(books)
        out = edit(masks, codes, books, state)
        return out if isinstance(out, tuple) else (masks, codes, books, width, state)

    def set_code(codes, name, value):
        codes[name] = codes[name].clone()
        codes[name][0] = value

    return [
        ("range", variant(lambda m, c, k, s: set_code(c, b, 8))),
        ("range", variant(lambda m, c, k, s: set_code(c, b, -1))),
        ("codes for", variant(lambda m, c, k, s: c.update({b: c[b][:-1]}))),
        ("codes for", variant(lambda m, c, k, s: c.update({b: torch.cat([c[b], c[b][:1]])}))),
        ("codebook shape", variant(lambda m, c, k, s: k.update({b: torch.zeros(4)}))),
        ("float32", variant(lambda m, c, k, s: k.update({b: k[b].double()}))),
        ("NaN", variant(lambda m, c, k, s: k.update({b: torch.full((8,), float("nan"))}))),
        ("unknown", variant(lambda m, c, k, s: m.update({"layers.9": m[a]}))),
        ("missing", variant(lambda m, c, k, s: c.pop(b))),
        ("mask shape", variant(lambda m, c, k, s: m.update({b: m[b].reshape(4, 2)}))),
        ("bool", variant(lambda m, c, k, s: m.update({b: m[b].to(torch.uint8)}))),
        ("bit_width", variant(lambda m, c, k, s: (m, c, k, 9, s))),
        ("bit_width", variant(lambda m, c, k, s: (m, c, k, 0, s))),
        ("task_state", variant(lambda m, c, k, s: (m, c, k, 3, {"head": [1.0]}))),
    ]


def test_commit_validation_errors_change_nothing() -> None:
    gen = torch.Generator().manual_seed(6)
    store = PackedStore(LAYERS, b_max=8)
    store.commit(*make_task(store, gen, 8, density=0.5))
    store.decode(0)
    for match, args in _bad_commits(store, gen):
        before = snapshot(store)
        with pytest.raises(StoreError, match=match):
            store.commit(*args)
        assert_same_snapshot(before, snapshot(store))
    # A weight whose word is full: 3 more full 8-bit tasks on the first weight only.
    one = {s.name: torch.zeros(s.shape, dtype=torch.bool) for s in LAYERS}
    one[LAYERS[0].name].view(-1)[0] = True
    while bool(store.available()[LAYERS[0].name].view(-1)[0]):
        store.commit(*make_task(store, gen, 8, masks=one))
    assert int(store.used_bits[LAYERS[0].name].view(-1)[0]) == 32
    before = snapshot(store)
    with pytest.raises(StoreError, match="not available"):
        store.commit(*make_task(store, gen, 2, masks=one))
    assert_same_snapshot(before, snapshot(store))
    with pytest.raises(StoreError):
        store.decode(store.num_tasks)


def test_store_constructor_validation() -> None:
    with pytest.raises(StoreError):
        PackedStore(LAYERS, b_max=0)
    with pytest.raises(StoreError):
        PackedStore([LayerSpec("a", (2,)), LayerSpec("a", (3,))])
    with pytest.raises(StoreError):
        PackedStore(LAYERS, meta={"x": object()})
    with pytest.raises(StoreError):
        LayerSpec("a", (0, 3))
    assert LayerSpec("layers.0", (4, 3)).numel == 12


# --- capacity (eq. 10) ----------------------------------------------------------------------


def test_capacity_hand_computed() -> None:
    store = PackedStore([LayerSpec("a", (4, 3)), LayerSpec("b", (2, 4))], b_max=8)
    mask_a = torch.zeros(4, 3, dtype=torch.bool)
    mask_a.view(-1)[[0, 2, 5, 7, 11]] = True
    mask_b = torch.zeros(2, 4, dtype=torch.bool)
    mask_b.view(-1)[[1, 4, 6]] = True
    state = {"head.weight": torch.zeros(2, 3), "head.bias": torch.zeros(2)}
    store.commit(
        {"a": mask_a, "b": mask_b},
        {"a": torch.zeros(5, dtype=torch.int64), "b": torch.ones(3, dtype=torch.int64)},
        {"a": torch.zeros(4), "b": torch.ones(4)},
        2,
        state,
    )
    report = capacity(store)
    assert isinstance(report, CapacityReport)
    # |θ| = 12 + 8 = 20 weights -> dense 32 * 20 = 640 bits.
    # Task 0, b=2, owns 5 + 3 = 8: 8*2 codes + |L|=2 * 2^2 * (32+2) = 272 codebook + 8 mask = 296.
    assert report.dense_bits == 640
    assert report.per_task[0].bits == 296
    assert report.per_task[0].bit_width == 2
    assert report.per_task[0].pct == 46.25
    assert report.per_task[0].density == {"a": 5 / 12, "b": 3 / 8}
    assert report.capacity_pct == 46.25
    # heads: 6 + 2 = 8 floats * 32 bits = 256 bits of 640 -> 40 %.
    assert report.heads_pct == 40.0

    mask_a2 = torch.zeros(4, 3, dtype=torch.bool)
    mask_a2.view(-1)[[1, 2]] = True
    store.commit(
        {"a": mask_a2, "b": torch.zeros(2, 4, dtype=torch.bool)},
        {"a": torch.tensor([0, 1]), "b": torch.zeros(0, dtype=torch.int64)},
        {"a": torch.zeros(2), "b": torch.zeros(2)},
        1,
        state,
    )
    # Task 1, b=1, owns 2: 2*1 + 2 * 2 * 33 + 2 = 136; total 432 bits -> 67.5 %; heads 80 %.
    report = capacity(store)
    assert [p.bits for p in report.per_task] == [296, 136]
    assert report.per_task[1].pct == 21.25
    assert report.capacity_pct == 67.5
    assert report.heads_pct == 80.0


# --- file format ----------------------------------------------------------------------------


def _store_with(density: float, seed: int = 7, tasks: int = 1) -> PackedStore:
    gen = torch.Generator().manual_seed(seed)
    store = PackedStore([LayerSpec("fc.0", (64, 64)), LayerSpec("fc.1", (32, 64))])
    for _ in range(tasks):
        store.commit(*make_task(store, gen, 3, density=density))
    return store


def test_file_grows_with_use(tmp_path: Path) -> None:
    sizes = {}
    for label, density, tasks in [("sparse", 0.1, 1), ("dense", 0.9, 1), ("two", 0.1, 2)]:
        path = tmp_path / f"{label}.safetensors"
        save_store(_store_with(density, tasks=tasks), path)
        sizes[label] = path.stat().st_size
    assert sizes["sparse"] < sizes["dense"]
    assert sizes["sparse"] < sizes["two"]
    numel = 64 * 64 + 32 * 64
    assert sizes["dense"] < 4 * numel  # far below one 32-bit word per weight


def test_file_loads_with_plain_safetensors(tmp_path: Path) -> None:
    store = _store_with(0.3)
    path = tmp_path / "m.safetensors"
    save_store(store, path)
    tensors = load_file(str(path))
    owned = int(store.mask(0)["fc.0"].sum())
    assert tensors["task.0.codes.fc.0"].numel() == math.ceil(owned * 3 / 8)
    assert tensors["task.0.mask.fc.0"].numel() == 64 * 64 // 8
    assert torch.equal(tensors["task.0.codebook.fc.1"], store.codebooks(0)["fc.1"])
    assert torch.equal(tensors["task.0.state.head.bias"], store.task_state(0)["head.bias"])
    assert not any("word" in name for name in tensors)


def test_atomic_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    old = _store_with(0.2)
    save_store(old, path)
    old_bytes = path.read_bytes()
    real_save_file = fileformat.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise RuntimeError("disk went away")

    monkeypatch.setattr(fileformat, "save_file", half_then_fail)
    with pytest.raises(RuntimeError, match="disk went away"):
        save_store(_store_with(0.8, seed=8, tasks=2), path)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert path.read_bytes() == old_bytes
    assert_stores_equal(load_store(path), old)


def test_save_into_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "m.safetensors"
    with pytest.raises(ModelFileError, match="nope"):
        save_store(_store_with(0.2), path)


def _expect_model_file_error(path: Path, match: str) -> None:
    with pytest.raises(ModelFileError, match=match) as info:
        load_store(path)
    assert str(path) in str(info.value)
    assert "fix:" in str(info.value)


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_store(_store_with(0.3, tasks=2), good)
    data = good.read_bytes()

    _expect_model_file_error(tmp_path / "missing.safetensors", "no such file")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    _expect_model_file_error(truncated, "safetensors")

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
        .tobytes()
    )
    _expect_model_file_error(junk, "safetensors")

    flipped = tmp_path / "flipped.safetensors"
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF
    flipped.write_bytes(bytes(damaged))
    _expect_model_file_error(flipped, "checksum")

    tensors = load_file(str(good))
    header = json.loads(fileformat.safe_open(str(good), "pt").metadata()["qpacknet"])

    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata={"qpacknet": json.dumps({**header, "format": "x"})})
    _expect_model_file_error(other, "format")

    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={"qpacknet": json.dumps({**header, "version": 5})})
    _expect_model_file_error(newer, "version")

    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))
    _expect_model_file_error(plain, "not a qpacknet model")

    missing = tmp_path / "missing_tensor.safetensors"
    partial = {k: v for k, v in tensors.items() if k != "task.1.codes.fc.1"}
    save_file(partial, str(missing), metadata={"qpacknet": json.dumps(header)})
    _expect_model_file_error(missing, "missing tensors")

    wrong = tmp_path / "wrong_count.safetensors"
    bad_header = json.loads(json.dumps(header))
    bad_header["tasks"][0]["code_counts"]["fc.0"] += 1
    save_file(tensors, str(wrong), metadata={"qpacknet": json.dumps(bad_header)})
    _expect_model_file_error(wrong, "fc.0")
