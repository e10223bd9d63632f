"""The bit-for-bit commit check (DESIGN.md §2 COMMIT): ``task_digest`` and ``PackedStore.parts``.

The driver compares the worker's digest of what it quantised with the digest of what the store
holds after COMMIT, read back from the 32-bit words; so the read-back digest must equal the
input's exactly (also after later commits and a save/load), and one flipped bit must change it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qpacknet.errors import StoreError
from qpacknet.store import (
    LayerSpec,
    PackedStore,
    TaskParts,
    digest,
    load_store,
    save_store,
    task_digest,
)
from tests.test_store import LAYERS, make_task

Args = tuple[dict, dict, dict, int, dict]


def _with_norm_state(args: Args, gen: torch.Generator) -> Args:
    """Add normalisation state of other dtypes (float, int64 scalar, bool) to a task's state."""
    masks, codes, books, width, state = args
    state = {
        **state,
        "bn.running_var": torch.rand(3, generator=gen),
        "bn.num_batches_tracked": torch.tensor(17, dtype=torch.int64),
        "bn.flag": torch.tensor([True, False]),
    }
    return masks, codes, books, width, state


def _digest_of(args: Args, shared: dict | None = None) -> str:
    masks, codes, books, width, state = args
    return task_digest(width, masks, codes, books, state, shared)


def _store_with_tasks() -> tuple[PackedStore, list[Args]]:
    """Three tasks of widths 3, 8, 5; the second leaves one layer empty (zero codes)."""
    gen = torch.Generator().manual_seed(11)
    store = PackedStore(LAYERS, b_max=8)
    tasks: list[Args] = []
    for t, width in enumerate((3, 8, 5)):
        masks = None
        if t == 1:
            avail = store.available()
            masks = {
                LAYERS[0].name: avail[LAYERS[0].name] & (torch.rand(4, 3, generator=gen) < 0.5),
                LAYERS[1].name: torch.zeros(LAYERS[1].shape, dtype=torch.bool),
            }
        args = _with_norm_state(make_task(store, gen, width, density=0.5, masks=masks), gen)
        store.commit(*args)
        tasks.append(args)
    return store, tasks


def test_read_back_digest_equals_input_digest_after_commits_and_save_load(
    tmp_path: Path,
) -> None:
    gen = torch.Generator().manual_seed(12)
    store = PackedStore(LAYERS, b_max=8)
    tasks: list[Args] = []
    for width in (3, 8, 5):
        args = _with_norm_state(make_task(store, gen, width, density=0.5), gen)
        assert store.commit(*args) == len(tasks)
        tasks.append(args)
        for t, earlier in enumerate(tasks):
            assert store.parts(t).digest() == _digest_of(earlier)
    want = [_digest_of(a) for a in tasks]
    assert len(set(want)) == len(want)
    for d in want:
        assert len(d) == 64
        assert d == d.lower()
        int(d, 16)
    path = tmp_path / "model.safetensors"
    save_store(store, path)
    loaded = load_store(path)
    assert [loaded.parts(t).digest() for t in range(loaded.num_tasks)] == want


def test_parts_reads_the_codes_from_the_words() -> None:
    store, tasks = _store_with_tasks()
    parts = store.parts(2)
    assert isinstance(parts, TaskParts)
    assert parts.bit_width == 5
    assert parts.shared is None
    assert all(c.dtype == torch.int64 for c in parts.codes.values())
    assert parts.digest() == _digest_of(tasks[2])
    assert store.parts(1).codes[LAYERS[1].name].numel() == 0
    assert store.parts(1).digest() == _digest_of(tasks[1])

    # Damage one bit of task 2's component in a word it owns: only task 2's digest changes.
    name = LAYERS[0].name
    index = int(tasks[2][0][name].reshape(-1).nonzero()[0])
    offset = int(store.used_bits[name].reshape(-1)[index]) - 5
    store.words[name].view(-1)[index] ^= 1 << offset
    assert store.parts(2).digest() != _digest_of(tasks[2])
    assert store.parts(0).digest() == _digest_of(tasks[0])
    assert store.parts(1).digest() == _digest_of(tasks[1])


def _flip_code(args: Args) -> None:
    code = args[1][LAYERS[0].name]
    code[0] ^= 1


def _flip_mask(args: Args) -> None:
    mask = args[0][LAYERS[1].name]
    mask.view(-1)[3] = ~mask.view(-1)[3]


def _flip_codebook_mantissa(args: Args) -> None:
    book = args[2][LAYERS[1].name]
    book.view(torch.int32)[1] ^= 1


def _head_ulp(args: Args) -> None:
    head = args[4]["head.weight"]
    head.view(-1)[2] = torch.nextafter(head.view(-1)[2], torch.tensor(float("inf")))


def _count_tracked(args: Args) -> None:
    args[4]["bn.num_batches_tracked"] += 1


def _state_dtype(args: Args) -> None:
    args[4]["bn.running_var"] = args[4]["bn.running_var"].to(torch.float64)


def _rename_state(args: Args) -> None:
    args[4]["head.w"] = args[4].pop("head.weight")


@pytest.mark.parametrize(
    "change",
    [
        _flip_code,
        _flip_mask,
        _flip_codebook_mantissa,
        _head_ulp,
        _count_tracked,
        _state_dtype,
        _rename_state,
    ],
)
def test_one_bit_anywhere_changes_the_digest(change: Callable[[Args], None]) -> None:
    store, tasks = _store_with_tasks()
    masks, codes, books, width, state = tasks[0]
    args: Args = (
        {k: v.clone() for k, v in masks.items()},
        {k: v.clone() for k, v in codes.items()},
        {k: v.clone() for k, v in books.items()},
        width,
        {k: v.clone() for k, v in state.items()},
    )
    assert _digest_of(args) == store.parts(0).digest()
    change(args)
    assert _digest_of(args) != store.parts(0).digest()


def test_the_bit_width_is_part_of_the_digest() -> None:
    store, tasks = _store_with_tasks()
    masks, codes, books, width, state = tasks[0]
    assert task_digest(width, masks, codes, books, state) == store.parts(0).digest()
    assert task_digest(width + 1, masks, codes, books, state) != store.parts(0).digest()


def test_layout_device_and_integer_dtype_do_not_matter() -> None:
    store, tasks = _store_with_tasks()
    masks, codes, books, width, state = tasks[0]
    want = store.parts(0).digest()

    def strided(t: torch.Tensor) -> torch.Tensor:
        """An equal tensor that is not contiguous."""
        if t.dim() == 0:
            return t.clone()
        if t.dim() == 1:
            wide = torch.zeros(t.shape[0] * 2, dtype=t.dtype)
            wide[::2] = t
            out = wide[::2]
        else:
            out = t.t().contiguous().t()
        assert torch.equal(out, t)
        assert t.numel() <= 1 or not out.is_contiguous()
        return out

    assert (
        task_digest(
            width,
            {k: strided(v) for k, v in reversed(masks.items())},
            {k: strided(v) for k, v in codes.items()},
            {k: strided(v) for k, v in books.items()},
            {k: strided(v) for k, v in reversed(state.items())},
        )
        == want
    )
    for dtype in (torch.uint8, torch.int16, torch.int32):
        narrow = {k: v.to(dtype) for k, v in codes.items()}
        assert task_digest(width, masks, narrow, books, state) == want
    if torch.cuda.is_available():
        on_gpu = {k: v.cuda() for k, v in state.items()}
        assert task_digest(width, masks, codes, books, on_gpu) == want


def test_inputs_whose_difference_a_conversion_would_hide_are_refused() -> None:
    _, tasks = _store_with_tasks()
    masks, codes, books, width, state = tasks[0]
    name = LAYERS[0].name
    with pytest.raises(StoreError, match="codes"):
        task_digest(width, masks, {**codes, name: codes[name].float()}, books, state)
    with pytest.raises(StoreError, match="bool"):
        task_digest(width, {**masks, name: masks[name].to(torch.uint8)}, codes, books, state)
    with pytest.raises(StoreError, match="float32"):
        task_digest(width, masks, codes, {**books, name: books[name].double()}, state)
    with pytest.raises(StoreError, match="bit_width"):
        task_digest(True, masks, codes, books, state)
    with pytest.raises(StoreError, match="strings"):
        task_digest(width, masks, codes, books, {**state, 3: torch.zeros(1)})


def test_big_endian_hosts_hash_little_endian_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    value = torch.tensor([1, 2], dtype=torch.int32)
    native = digest._le_bytes(value)
    monkeypatch.setattr(digest, "_BIG_ENDIAN", not digest._BIG_ENDIAN)
    swapped = digest._le_bytes(value)
    assert swapped == b"".join(native[i : i + 4][::-1] for i in (0, 4))


SHARE_LAYERS = [LayerSpec("a", (4, 6)), LayerSpec("b", (3, 4))]


def test_shared_masks_are_digested_and_read_back(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(13)
    store = PackedStore(SHARE_LAYERS, b_max=8)
    first = make_task(store, gen, 4, density=0.5)
    store.commit(*first)
    second = make_task(store, gen, 3, density=0.4)
    claimed = store.claimed()
    shared = {
        s.name: claimed[s.name] & ~second[0][s.name] & (torch.rand(s.shape, generator=gen) < 0.7)
        for s in SHARE_LAYERS
    }
    assert any(bool(m.any()) for m in shared.values())
    store.commit(*second, shared=shared)
    none = {s.name: torch.zeros(s.shape, dtype=torch.bool) for s in SHARE_LAYERS}
    third = make_task(store, gen, 2, density=0.3)
    store.commit(*third, shared=none)

    assert store.parts(0).shared is None
    assert store.parts(2).shared is None
    want = [_digest_of(first), _digest_of(second, shared), _digest_of(third, none)]
    assert want[2] == _digest_of(third)  # all-False shared masks are "no sharing", as stored
    assert want[1] != _digest_of(second)
    assert [store.parts(t).digest() for t in range(3)] == want
    path = tmp_path / "shared.safetensors"
    save_store(store, path)
    loaded = load_store(path)
    assert [loaded.parts(t).digest() for t in range(3)] == want

    flipped = {k: v.clone() for k, v in shared.items()}
    flipped["b"].view(-1)[0] = ~flipped["b"].view(-1)[0]
    assert _digest_of(second, flipped) != want[1]
