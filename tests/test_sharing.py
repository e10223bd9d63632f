"""TinySubNets weight sharing: shared weights are read-only, cost no bits, show in the capacity,
survive the model file, and leave every earlier task's logits bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qpacknet.config import validate
from qpacknet.errors import ConfigError, StoreError
from qpacknet.executor import LocalExecutor
from qpacknet.model import PackedModel
from qpacknet.nets import build
from qpacknet.pipeline import MODEL_FILE, Pipeline
from qpacknet.progress import Progress
from qpacknet.store import LayerSpec, PackedStore, capacity, load_store, save_store
from qpacknet.store.capacity import task_bits
from tests.conftest import BlobStream, tiny_config

LAYERS = [LayerSpec("a", (4, 6)), LayerSpec("b", (3, 4))]


def _task(seed: int, available: dict[str, torch.Tensor], bits: int, p: float = 0.4) -> tuple:
    g = torch.Generator().manual_seed(seed)
    masks, codes, books = {}, {}, {}
    for spec in LAYERS:
        m = (torch.rand(spec.shape, generator=g) < p) & available[spec.name]
        masks[spec.name] = m
        codes[spec.name] = torch.randint(0, 1 << bits, (int(m.sum()),), generator=g)
        books[spec.name] = torch.randn(1 << bits, generator=g)
    return masks, codes, books, bits, {"head.weight": torch.randn(2, 3, generator=g)}


def _shared(store: PackedStore, owned: dict[str, torch.Tensor], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    claimed = store.claimed()
    return {
        s.name: claimed[s.name] & ~owned[s.name] & (torch.rand(s.shape, generator=g) < 0.7)
        for s in LAYERS
    }


def _three_task_store() -> tuple[PackedStore, list[tuple], list[dict]]:
    store = PackedStore(LAYERS, b_max=8)
    tasks, shared = [], []
    for t, bits in enumerate((3, 5, 2)):
        task = _task(t, store.available(), bits, p=0.6)
        share = _shared(store, task[0], 100 + t) if t else None
        store.commit(*task, shared=share)
        tasks.append(task)
        shared.append(share)
    return store, tasks, shared


def test_shared_weights_read_the_first_component_and_cost_no_bits() -> None:
    store, tasks, shared = _three_task_store()
    first_owner = {s.name: torch.full(s.shape, -1) for s in LAYERS}
    for t in range(3):
        for name, m in tasks[t][0].items():
            first_owner[name][m & (first_owner[name] < 0)] = t
    for t in (1, 2):
        dense = store.decode(t)
        for spec in LAYERS:
            share = shared[t][spec.name]
            assert share.any() and not (share & tasks[t][0][spec.name]).any()
            for idx in share.nonzero():
                owner = int(first_owner[spec.name][tuple(idx)])
                assert 0 <= owner < t
                assert dense[spec.name][tuple(idx)] == store.decode(owner)[spec.name][tuple(idx)]
        # a weight owned by two earlier tasks reads the first one's component
        both = tasks[0][0]["a"] & tasks[1][0]["a"] & shared[2]["a"]
        if t == 2 and both.any():
            assert torch.equal(dense["a"][both], store.decode(0)["a"][both])
    cap = capacity(store)
    for t in range(3):
        owned = [int(tasks[t][0][s.name].sum()) for s in LAYERS]
        assert cap.per_task[t].bits == task_bits(owned, tasks[t][3])
        n_shared = 0 if t == 0 else sum(int(m.sum()) for m in shared[t].values())
        assert cap.per_task[t].shared == n_shared
    assert cap.per_task[1].shared > 0 and cap.shared_pct > 0
    # the words hold components of owned weights only: shared ones took no bits
    used = sum(
        tasks[t][3] * tasks[t][0][s.name].to(torch.int16) for t in range(3) for s in LAYERS[:1]
    )
    assert torch.equal(store.used_bits["a"], used)


def test_shared_masks_round_trip_through_the_model_file(tmp_path: Path) -> None:
    store, _, shared = _three_task_store()
    save_store(store, tmp_path / "m.safetensors")
    back = load_store(tmp_path / "m.safetensors")
    for t in range(3):
        for name, value in store.decode(t).items():
            assert torch.equal(back.decode(t)[name], value)
            expected = shared[t][name] if shared[t] else torch.zeros_like(value, dtype=torch.bool)
            assert torch.equal(back.shared(t)[name], expected)
    header = json.loads(
        __import__("safetensors")
        .safe_open(str(tmp_path / "m.safetensors"), "pt")
        .metadata()["qpacknet"]
    )
    assert header["version"] == 2 and [e.get("shared", False) for e in header["tasks"]] == [
        False,
        True,
        True,
    ]
    plain = PackedStore(LAYERS, b_max=8)
    plain.commit(*_task(0, plain.available(), 3))
    save_store(plain, tmp_path / "p.safetensors")
    meta = __import__("safetensors").safe_open(str(tmp_path / "p.safetensors"), "pt").metadata()
    assert json.loads(meta["qpacknet"])["version"] == 1


@pytest.mark.parametrize(
    ("break_it", "needle"),
    [
        ("owned", "both owned and shared"),
        ("unclaimed", "belong to no earlier task"),
        ("dtype", "must be a bool tensor"),
    ],
)
def test_bad_shared_masks_are_refused_and_change_nothing(break_it: str, needle: str) -> None:
    store = PackedStore(LAYERS, b_max=8)
    store.commit(*_task(0, store.available(), 3))
    task = _task(1, store.available(), 4)
    share = _shared(store, task[0], 7)
    if break_it == "owned":
        share["a"] = share["a"] | task[0]["a"]
    elif break_it == "unclaimed":
        share["b"] = torch.ones(LAYERS[1].shape, dtype=torch.bool) & ~task[0]["b"]
    else:
        share["a"] = share["a"].float()
    words = {k: v.clone() for k, v in store.words.items()}
    with pytest.raises(StoreError, match=needle):
        store.commit(*task, shared=share)
    assert store.num_tasks == 1
    assert all(torch.equal(words[k], v) for k, v in store.words.items())


def test_shared_weights_get_no_gradient_and_keep_their_frozen_value() -> None:
    cfg = tiny_config()
    net = build(cfg.net, (12,), 4, 2)
    specs = net.layer_specs
    g = torch.Generator().manual_seed(0)
    own = [{s.name: torch.rand(s.shape, generator=g) < 0.3 for s in specs} for _ in range(2)]
    share = [
        {s.name: (torch.rand(s.shape, generator=g) < 0.5) & ~o[s.name] for s in specs} for o in own
    ]
    frozen = {s.name: torch.randn(s.shape, generator=g) for s in specs}
    net.init_candidates(0, 1, [0, 1])
    net.set_masks(own)
    net.set_sharing(frozen, share)
    for k in range(2):
        for s in specs:
            w = net.weight(s.name)[k]
            assert torch.equal(w[share[k][s.name]], frozen[s.name][share[k][s.name]])
    x = torch.randn(8, 12, generator=g)
    net(x).sum().backward()
    for k in range(2):
        for s in specs:
            grad = net.theta(s.name).grad[k]
            assert not grad[share[k][s.name]].any()
            assert grad[own[k][s.name]].abs().sum() > 0
    assert not any(p.data_ptr() == frozen["fc0"].data_ptr() for p in net.parameters())
    assert {n for n, _ in net.named_parameters()}.isdisjoint(
        {n for n, _ in net.named_buffers() if "frozen" in n or "share" in n}
    )


def test_config_rejects_an_inverted_share_range() -> None:
    with pytest.raises(ConfigError, match="min_fraction"):
        validate({"sharing": {"enabled": True, "min_fraction": 0.9, "max_fraction": 0.1}})


def test_pipeline_with_sharing_keeps_old_tasks_bit_identical(tmp_path: Path) -> None:
    stream = BlobStream(num_tasks=3)
    cfg = tiny_config(sharing={"enabled": True, "min_fraction": 0.5, "max_fraction": 0.9})
    pipe = Pipeline(cfg, stream, LocalExecutor(), tmp_path, Progress(verbose=False))
    probe = torch.randn(40, 12, generator=torch.Generator().manual_seed(5))
    recorded: list[torch.Tensor] = []
    for t in range(3):
        pipe.learn_task(t)
        model = PackedModel.load(tmp_path / MODEL_FILE)
        recorded.append(model.logits(t, probe))
        for j in range(t + 1):
            assert torch.equal(model.logits(j, probe), recorded[j]), f"task {j} after task {t}"
    store = load_store(tmp_path / MODEL_FILE)
    cap = capacity(store)
    for t in range(3):
        owned = [int(store.mask(t)[s.name].sum()) for s in store.layers]
        assert cap.per_task[t].bits == task_bits(owned, store.bit_width(t))
    assert cap.per_task[0].shared == 0 and cap.per_task[1].shared > 0
    assert cap.per_task[2].shared > 0
    reports = pipe.task_reports
    assert (
        reports[0]["shared_pct"] == 0.0 and reports[2]["shared_pct"] == cap.per_task[2].shared_pct
    )
    assert all(c["shared"] > 0 for c in reports[1]["candidates"])
    # sharing is drawn apart from the mask: a run without it draws the same own masks
    plain = Pipeline(tiny_config(), BlobStream(num_tasks=1), LocalExecutor(), tmp_path / "p")
    plain.progress = Progress(verbose=False)
    plain.learn_task(0)
    assert all(
        torch.equal(plain.store.mask(0)[s.name], store.mask(0)[s.name]) for s in store.layers
    )


def test_a_sharing_file_without_its_shared_masks_is_refused(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from qpacknet.errors import ModelFileError

    store, _, _ = _three_task_store()
    path = tmp_path / "m.safetensors"
    save_store(store, path)
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["qpacknet"])
    tensors = load_file(str(path))
    header["version"] = 1
    broken = tmp_path / "v1.safetensors"
    save_file(tensors, str(broken), metadata={"qpacknet": json.dumps(header)})
    with pytest.raises(ModelFileError, match="task 1 is malformed"):
        load_store(broken)
    for entry in header["tasks"]:
        entry.pop("shared", None)
    header["version"] = 2
    save_file(tensors, str(broken), metadata={"qpacknet": json.dumps(header)})
    with pytest.raises(ModelFileError, match="unexpected tensors"):
        load_store(broken)
