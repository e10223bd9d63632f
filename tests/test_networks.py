"""Several networks in one packed model (issue 11, point 1, ``capacity.when_full: grow``):
the store opens fresh words when the old ones are full, keeps every earlier task bit-identical,
and the model file round-trips the task -> network map (an older one-network file still
loads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qpacknet.checkpoint import truncate
from qpacknet.errors import ModelFileError, StoreError
from qpacknet.store import PackedStore, capacity, load_store, save_store
from tests.test_store import LAYERS, assert_stores_equal, make_task


def _full_network(store: PackedStore, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Four full 8-bit tasks: every word of the newest network is taken (T_L = 4)."""
    decoded = []
    for _ in range(4):
        t = store.commit(*make_task(store, gen, 8))
        decoded.append(store.decode(t))
    assert not any(bool(m.any()) for m in store.available().values())
    return decoded


def _grown(seed: int = 3) -> tuple[PackedStore, list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    store = PackedStore(LAYERS, b_max=8, meta={"backbone": "test"})
    before = _full_network(store, gen)
    assert store.grow() == 1
    store.commit(*make_task(store, gen, 3, density=0.6))
    store.commit(*make_task(store, gen, 5, density=0.5))
    return store, before


def test_grow_opens_fresh_words_and_old_tasks_stay_bit_identical() -> None:
    store, before = _grown()
    assert store.num_networks == 2
    assert [store.network_of(t) for t in range(6)] == [0, 0, 0, 0, 1, 1]
    assert store.tasks_of(0) == [0, 1, 2, 3] and store.tasks_of(1) == [4, 5]
    store.clear_cache()
    for t, dense in enumerate(before):
        again = store.decode(t)
        assert all(torch.equal(again[n], dense[n]) for n in dense), f"task {t} changed"
    used = store.used_bits
    assert all(int(u.max()) <= 8 for u in used.values()), "network 1 holds 2 narrow tasks"


def test_grow_needs_a_task_in_the_newest_network() -> None:
    store = PackedStore(LAYERS)
    with pytest.raises(StoreError, match="network 0 holds no task yet"):
        store.grow()
    store.commit(*make_task(store, torch.Generator().manual_seed(0), 2, density=0.5))
    store.grow()
    with pytest.raises(StoreError, match="network 1 holds no task yet"):
        store.grow()


def test_sharing_reads_only_the_tasks_own_network() -> None:
    """A task of network 1 may share only weights network 1's tasks claimed."""
    store, _ = _grown()
    gen = torch.Generator().manual_seed(9)
    masks, codes, books, width, state = make_task(store, gen, 2, density=0.2)
    claimed = store.claimed()
    shared = {n: claimed[n] & ~masks[n] for n in masks}
    store.commit(masks, codes, books, width, state, shared)
    t = store.num_tasks - 1
    first = store.first_values(1)
    for name, m in shared.items():
        assert torch.equal(store.decode(t)[name][m], first[name][m])
    masks, codes, books, width, state = make_task(store, gen, 2, density=0.1)
    everywhere = {n: ~store.claimed()[n] & ~masks[n] for n in masks}
    with pytest.raises(StoreError, match="belong to no earlier task"):
        store.commit(masks, codes, books, width, state, everywhere)


def test_two_networks_round_trip_through_the_file(tmp_path: Path) -> None:
    store, _ = _grown()
    path = tmp_path / "m.safetensors"
    save_store(store, path)
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["qpacknet"])
    assert header["version"] == 3
    assert [e["network"] for e in header["tasks"]] == [0, 0, 0, 0, 1, 1]
    loaded = load_store(path)
    assert_stores_equal(store, loaded)
    for t in range(store.num_tasks):
        assert loaded.parts(t).digest() == store.parts(t).digest()


def test_one_network_file_keeps_the_old_format(tmp_path: Path) -> None:
    """A model that never grew is written exactly as before networks existed (version 1, no
    network keys), so older readers still read it, and it loads as one network."""
    gen = torch.Generator().manual_seed(1)
    store = PackedStore(LAYERS)
    store.commit(*make_task(store, gen, 4, density=0.5))
    path = tmp_path / "one.safetensors"
    save_store(store, path)
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["qpacknet"])
    assert header["version"] == 1 and "network" not in header["tasks"][0]
    assert load_store(path).num_networks == 1


def _rewrite_header(tmp_path: Path, edit: object) -> Path:
    store, _ = _grown()
    path = tmp_path / "m.safetensors"
    save_store(store, path)
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["qpacknet"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    edit(header)  # type: ignore[operator]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"qpacknet": json.dumps(header)})
    return bad


@pytest.mark.parametrize(
    ("networks", "version", "problem"),
    [
        ([0, 0, 0, 0, 2, 2], 3, "jumps a network"),
        ([1, 1, 1, 1, 1, 1], 3, "first task not in network 0"),
        ([0, 0, 0, 0, 1, 0], 3, "goes back"),
        ([0, 0, 0, 0, 1, 1], 2, "networks in a version-2 file"),
    ],
)
def test_a_damaged_network_map_is_refused(
    tmp_path: Path, networks: list[int], version: int, problem: str
) -> None:
    def damage(header: dict) -> None:
        for entry, n in zip(header["tasks"], networks, strict=True):
            entry["network"] = n
        header["version"] = version

    bad = _rewrite_header(tmp_path, damage)
    with pytest.raises(ModelFileError, match="malformed") as info:
        load_store(bad)
    assert str(bad) in str(info.value), problem


def test_truncate_keeps_each_task_in_its_network() -> None:
    store, _ = _grown()
    short = truncate(store, 5)
    assert short.num_networks == 2 and short.tasks_of(1) == [4]
    for t in range(5):
        assert short.parts(t).digest() == store.parts(t).digest()
    assert truncate(store, 4).num_networks == 1


def test_capacity_counts_every_network() -> None:
    """Eq. 10 per network (of that network's dense size) and in total (of one backbone)."""
    store, _ = _grown()
    cap = capacity(store)
    assert [n.tasks for n in cap.networks] == [[0, 1, 2, 3], [4, 5]]
    assert [e.network for e in cap.per_task] == [0, 0, 0, 0, 1, 1]
    assert cap.capacity_pct == pytest.approx(sum(n.capacity_pct for n in cap.networks))
    bits0 = sum(e.bits for e in cap.per_task[:4])
    assert cap.networks[0].capacity_pct == 100.0 * bits0 / cap.dense_bits
    assert cap.capacity_pct > 100.0, "4 dense 8-bit tasks plus two more exceed one backbone"


def test_a_header_that_moves_a_task_to_another_network_is_refused(tmp_path: Path) -> None:
    """The map is also a checksummed tensor: a header whose map is well formed but moves
    task 3 into network 1 (its decoded weights would come from other words) is refused."""

    def move(header: dict) -> None:
        header["tasks"][3]["network"] = 1

    with pytest.raises(ModelFileError, match="puts task 3 in network 1, the checksummed"):
        load_store(_rewrite_header(tmp_path, move))


def test_a_version_3_task_without_its_network_is_refused(tmp_path: Path) -> None:
    def drop(header: dict) -> None:
        del header["tasks"][2]["network"]

    with pytest.raises(ModelFileError, match="header entry of task 2 is malformed"):
        load_store(_rewrite_header(tmp_path, drop))
