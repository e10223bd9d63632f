"""Per-layer bit widths (issue 13, the paper's "hybrid quantisation") in the store, the file
format, the digest, eq. 10 and the bit-width search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qpacknet.errors import StoreError
from qpacknet.layerspec import LayerSpec
from qpacknet.quantize import Criterion, ValFigures, search_bit_width
from qpacknet.store import PackedStore, load_store, save_store
from qpacknet.store.capacity import capacity, task_bits
from qpacknet.store.digest import task_digest
from qpacknet.store.fileformat import LAYER_WIDTHS_VERSION
from tests.test_store import assert_stores_equal, expected_dense

LAYERS = [LayerSpec("fc.0", (64, 64)), LayerSpec("fc.1", (32, 64))]


def _task(store: PackedStore, gen: torch.Generator, widths: dict[str, int], density: float):
    avail = store.available()
    masks = {s.name: (torch.rand(s.shape, generator=gen) < density) & avail[s.name] for s in LAYERS}
    codes = {
        n: torch.randint(0, 1 << widths[n], (int(m.sum()),), generator=gen)
        for n, m in masks.items()
    }
    books = {n: torch.randn(1 << widths[n], generator=gen) for n in masks}
    state = {"head.weight": torch.randn(2, 3, generator=gen)}
    return masks, codes, books, widths, state


def _store(widths: list[dict[str, int]], density: float = 0.5) -> PackedStore:
    gen = torch.Generator().manual_seed(5)
    store = PackedStore(LAYERS, b_max=8)
    for w in widths:
        store.commit(*_task(store, gen, w, density))
    return store


def test_each_layer_packs_at_its_own_width_and_decodes_exactly() -> None:
    gen = torch.Generator().manual_seed(1)
    store = PackedStore(LAYERS, b_max=8)
    first = _task(store, gen, {"fc.0": 3, "fc.1": 6}, 0.6)
    store.commit(*first)
    second = _task(store, gen, {"fc.0": 5, "fc.1": 2}, 0.6)
    store.commit(*second)
    for t, (masks, codes, books, widths, _) in enumerate((first, second)):
        assert store.bit_widths(t) == widths and store.bit_width(t) == max(widths.values())
        decoded = store.decode(t)
        for name, dense in expected_dense(masks, codes, books).items():
            assert torch.equal(decoded[name], dense)
    both = first[0]["fc.0"] & second[0]["fc.0"]
    assert int(store.used_bits["fc.0"][both].max()) == 3 + 5
    assert int(store.used_bits["fc.1"][first[0]["fc.1"] & second[0]["fc.1"]].max()) == 6 + 2


def test_widths_must_name_every_layer_within_b_max() -> None:
    store = PackedStore(LAYERS, b_max=4)
    gen = torch.Generator().manual_seed(2)
    masks, codes, books, _, state = _task(store, gen, {"fc.0": 2, "fc.1": 2}, 0.3)
    with pytest.raises(StoreError, match=r"missing \['fc.1'\]"):
        store.commit(masks, codes, books, {"fc.0": 2}, state)
    with pytest.raises(StoreError, match=r"outside 1..b_max=4 \(layer 'fc.1'\)"):
        store.commit(masks, codes, books, {"fc.0": 2, "fc.1": 5}, state)
    with pytest.raises(StoreError, match="codebook shape"):
        store.commit(masks, codes, books, {"fc.0": 2, "fc.1": 3}, state)
    assert store.num_tasks == 0


def test_digest_of_equal_widths_is_the_one_width_digest() -> None:
    store = _store([{"fc.0": 4, "fc.1": 4}, {"fc.0": 3, "fc.1": 5}])
    same = store.parts(0)
    assert same.bit_width == 4  # the store cannot tell {4, 4} from 4, and neither does the digest
    assert task_digest(
        {"fc.0": 4, "fc.1": 4}, same.masks, same.codes, same.codebooks, same.task_state
    ) == task_digest(4, same.masks, same.codes, same.codebooks, same.task_state)
    mixed = store.parts(1)
    assert mixed.bit_width == {"fc.0": 3, "fc.1": 5}
    swapped = task_digest(
        {"fc.0": 5, "fc.1": 3}, mixed.masks, mixed.codes, mixed.codebooks, mixed.task_state
    )
    assert mixed.digest() != swapped


def test_file_round_trip_and_version(tmp_path: Path) -> None:
    uniform = _store([{"fc.0": 4, "fc.1": 4}])
    path = tmp_path / "uniform.safetensors"
    save_store(uniform, path)
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["qpacknet"])
    assert header["version"] == 1 and "bit_widths" not in header["tasks"][0]

    store = _store([{"fc.0": 4, "fc.1": 4}, {"fc.0": 2, "fc.1": 7}])
    path = tmp_path / "mixed.safetensors"
    save_store(store, path)
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["qpacknet"])
        codes = handle.get_tensor("task.1.codes.fc.0")
    assert header["version"] == LAYER_WIDTHS_VERSION
    assert header["tasks"][1]["bit_widths"] == {"fc.0": 2, "fc.1": 7}
    assert header["tasks"][1]["bit_width"] == 7 and "bit_widths" not in header["tasks"][0]
    owned = int(store.mask(1)["fc.0"].sum())
    assert codes.numel() == -(-owned * 2 // 8)
    loaded = load_store(path)
    assert_stores_equal(loaded, store)
    assert loaded.bit_widths(1) == {"fc.0": 2, "fc.1": 7}
    assert loaded.parts(1).digest() == store.parts(1).digest()


def test_damaged_width_entry_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from qpacknet.errors import ModelFileError

    path = tmp_path / "m.safetensors"
    save_store(_store([{"fc.0": 2, "fc.1": 7}]), path)
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["qpacknet"])
    header["tasks"][0]["bit_widths"]["fc.0"] = 9
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={"qpacknet": json.dumps(header)})
    with pytest.raises(ModelFileError, match=f"{bad}.*task 0 .*malformed.*fix:"):
        load_store(bad)


def test_eq_10_sums_each_layer_at_its_width() -> None:
    store = _store([{"fc.0": 2, "fc.1": 6}])
    owned = [int(store.mask(0)[s.name].sum()) for s in LAYERS]
    expected = owned[0] * 2 + 4 * (32 + 2) + owned[0] + owned[1] * 6 + 64 * (32 + 6) + owned[1]
    assert task_bits(owned, [2, 6]) == expected
    assert task_bits(owned, 4) == task_bits(owned, [4, 4])
    report = capacity(store)
    assert report.per_task[0].bits == expected
    assert report.per_task[0].bit_widths == {"fc.0": 2, "fc.1": 6}
    assert report.per_task[0].bit_width == 6


def _figures_needing(minimum: dict[str, int], dropped: list[dict[str, int]]):
    """An evaluate() whose figures pass only when every layer has at least ``minimum`` bits
    (read from the number of distinct values), recording each assignment."""

    def evaluate(dense: dict[str, torch.Tensor]) -> ValFigures:
        widths = {
            n: max(1, (len(torch.unique(d[d != 0])) - 1).bit_length()) for n, d in dense.items()
        }
        dropped.append(widths)
        ok = all(widths[n] >= b for n, b in minimum.items())
        return ValFigures(90.0 if ok else 50.0, 0.1, 100.0)

    return evaluate


def test_per_layer_search_lowers_each_layer_while_the_criterion_accepts() -> None:
    gen = torch.Generator().manual_seed(3)
    weights = {"big": torch.randn(40, 40, generator=gen), "small": torch.randn(8, 8, generator=gen)}
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    seen: list[dict[str, int]] = []
    evaluate = _figures_needing({"big": 2, "small": 5}, seen)
    ref = ValFigures(90.0, 0.1, 100.0)
    crit = Criterion("accuracy", 1.0)
    plain = search_bit_width(weights, masks, evaluate, ref, 1, 8, crit)
    assert plain.bits == 5 and plain.widths == {"big": 5, "small": 5}
    seen.clear()
    res = search_bit_width(weights, masks, evaluate, ref, 1, 8, crit, per_layer=True)
    assert res.widths == {"big": 2, "small": 5} and res.bits == 5 and res.within_delta
    # uniform 1..5, then the layer with more owned weights first: big 4, 3, 2, 1 (refused),
    # then small 4 (refused)
    assert res.tried_widths == [
        *({"big": b, "small": b} for b in range(1, 6)),
        *({"big": b, "small": 5} for b in (4, 3, 2, 1)),
        {"big": 2, "small": 4},
    ]
    seen.clear()
    needs_small = _figures_needing({"big": 1, "small": 5}, seen)
    res = search_bit_width(weights, masks, needs_small, ref, 1, 8, crit, per_layer=True)
    assert res.widths == {"big": 1, "small": 5}
    seen.clear()
    needs_four = _figures_needing({"big": 4, "small": 5}, seen)
    res = search_bit_width(weights, masks, needs_four, ref, 1, 8, crit, per_layer=True)
    assert res.widths == {"big": 4, "small": 5}
    # big 4 passes, big 3 is refused; small 4 would be {4, 4}, which Algorithm 3 refused:
    # not judged (nor fine-tuned) again
    assert res.tried_widths[5:] == [{"big": 4, "small": 5}, {"big": 3, "small": 5}]
    assert len(seen) == len(res.tried_widths)
    assert seen == res.tried_widths
    assert [b for b, _ in res.tried] == [max(w.values()) for w in res.tried_widths]
    nothing = search_bit_width(
        weights, masks, lambda d: ValFigures(10.0, 9.0, 0.0), ref, 1, 3, crit, per_layer=True
    )
    assert nothing.widths == {"big": 3, "small": 3} and not nothing.within_delta
    assert len(nothing.tried) == 3  # no per-layer descent without an accepted width
