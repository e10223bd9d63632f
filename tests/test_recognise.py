"""Task recognition without task ids (issue 13 point 2, :mod:`qpacknet.recognise`): the
statistics kept at COMMIT recognise held-out inputs far better than entropy, round-trip through
the model file bit for bit under its checksums, are computed the same way after a resume, with
weight sharing and in a grown model, and the penultimate features are the head's input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qpacknet import recognise
from qpacknet.config import InferenceConfig, NetConfig
from qpacknet.errors import ModelFileError
from qpacknet.model import PackedModel
from qpacknet.nets import build
from qpacknet.pipeline import MODEL_FILE
from qpacknet.scenarios import build_stream
from qpacknet.store import PackedStore, load_store, save_store
from tests.conftest import tiny_config
from tests.helpers import local_pipeline

DIGITS = {"scenario": {"name": "digits", "num_tasks": 3}, "net": {"hidden": [32, 32]}}


def _stream(**over: Any) -> Any:
    cfg = tiny_config(**{**DIGITS, **over})
    return build_stream(cfg.scenario, cfg.seed, None, "cpu")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("recognise") / "run"
    stream = _stream()
    results = local_pipeline(out, stream, **DIGITS).run()
    return {"out": out, "stream": stream, "results": results}


def _accuracy(model: PackedModel, stream: Any, method: str) -> float:
    """% of held-out test inputs of every task whose task is inferred right."""
    right = total = 0
    for j in range(model.num_tasks):
        x = stream.test_split(j).x
        right += int((recognise.infer_tasks(model, x, method).task == j).sum())
        total += len(x)
    return 100.0 * right / total


def test_the_statistics_recognise_held_out_inputs_far_better_than_entropy(
    digits_run: dict,
) -> None:
    model = PackedModel.load(digits_run["out"] / MODEL_FILE)
    assert recognise.available(model) == list(recognise.RECOGNISERS)
    acc = {m: _accuracy(model, digits_run["stream"], m) for m in recognise.RECOGNISERS}
    chance = 100.0 / 3
    assert acc["entropy"] > chance
    for method in ("input", "combined"):
        assert acc[method] >= 95.0 and acc[method] > acc["entropy"] + 5.0, acc
    assert acc["feature"] > chance + 30.0, acc
    # the run's reported figures are these, recogniser by recogniser
    reported = digits_run["results"]["task_inference"]
    assert set(reported) == set(recognise.RECOGNISERS)
    for method, value in acc.items():
        assert reported[method]["task_inference_acc"] == pytest.approx(value, abs=1.0)
    assert digits_run["results"]["task_inference_acc"] == reported["combined"]["task_inference_acc"]


def test_statistics_round_trip_bit_identically(digits_run: dict, tmp_path: Path) -> None:
    store = load_store(digits_run["out"] / MODEL_FILE)
    again = tmp_path / "again.safetensors"
    save_store(store, again)
    assert again.read_bytes() == (digits_run["out"] / MODEL_FILE).read_bytes()
    back = load_store(again)
    for t in range(store.num_tasks):
        a, b = store.recognition_stats(t), back.recognition_stats(t)
        assert a is not None and b is not None and set(a) == set(b) == {
            "input.mean", "input.var", "feature.means", "feature.whiten"
        }  # fmt: skip
        for name in a:
            assert a[name].dtype == torch.float32
            assert torch.equal(a[name].view(torch.int32), b[name].view(torch.int32))


def test_file_growth_per_task_is_the_documented_amount(digits_run: dict, tmp_path: Path) -> None:
    store = load_store(digits_run["out"] / MODEL_FILE)
    store._recognise.clear()
    bare = tmp_path / "bare.safetensors"
    save_store(store, bare)
    stats = load_store(digits_run["out"] / MODEL_FILE).recognition_stats(0)
    assert stats is not None
    p, (c, d) = stats["input.mean"].numel(), stats["feature.means"].shape
    assert (p, d) == (64, 32)
    tensor_bytes = 3 * (8 * p + 4 * (c * d + d * (d + 1) // 2))
    growth = (digits_run["out"] / MODEL_FILE).stat().st_size - bare.stat().st_size
    # the tensors' bytes plus their header entries (name, dtype, offsets, sha256)
    assert tensor_bytes < growth < tensor_bytes + 3 * 4 * 400


def _rewrite(src: Path, dst: Path, change: Any) -> Path:
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = json.loads(f.metadata()["qpacknet"])
    change(tensors, header)
    save_file(tensors, str(dst), metadata={"qpacknet": json.dumps(header)})
    return dst


def test_a_damaged_statistics_tensor_is_refused_naming_the_file_and_fix(
    digits_run: dict, tmp_path: Path
) -> None:
    def damage(tensors: dict, header: dict) -> None:
        tensors["task.1.recognise.input.mean"][3] += 1.0

    path = _rewrite(digits_run["out"] / MODEL_FILE, tmp_path / "bad.safetensors", damage)
    with pytest.raises(ModelFileError) as err:
        load_store(path)
    text = str(err.value)
    assert str(path) in text and "checksum mismatch in tensor 'task.1.recognise.input.mean'" in text
    assert "fix: the file is damaged or incomplete; restore it from a good copy" in text

    def drop(tensors: dict, header: dict) -> None:
        del tensors["task.0.recognise.feature.whiten"]

    path = _rewrite(digits_run["out"] / MODEL_FILE, tmp_path / "short.safetensors", drop)
    with pytest.raises(ModelFileError, match=r"missing tensors.*task.0.recognise.feature.whiten"):
        load_store(path)


def test_an_old_file_without_statistics_loads_and_infers_by_entropy_saying_so_once(
    digits_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def strip(tensors: dict, header: dict) -> None:
        for name in [k for k in tensors if ".recognise." in k]:
            del tensors[name]
            del header["sha256"][name]
        del header["recognise"]

    path = _rewrite(digits_run["out"] / MODEL_FILE, tmp_path / "old.safetensors", strip)
    model = PackedModel.load(path)
    assert recognise.available(model) == ["entropy"]
    capsys.readouterr()
    x = digits_run["stream"].test_split(2).x
    found = recognise.infer_tasks(model, x)
    again = recognise.infer_tasks(model, x, "entropy")
    err = capsys.readouterr().err
    assert err.count("holds no task-recognition statistics") == 1
    assert torch.equal(found.task, again.task)
    with pytest.raises(ValueError, match="needs statistics that the model lacks"):
        recognise.infer_tasks(model, x, "combined")


def test_a_resumed_run_keeps_the_same_statistics(digits_run: dict, tmp_path: Path) -> None:
    """Two tasks, then resumed to three: the file equals the uninterrupted run's."""
    stream = _stream()
    out = tmp_path / "resumed"
    two = {**DIGITS, "scenario": {"name": "digits", "num_tasks": 2}}
    local_pipeline(out, stream, **two).run()
    local_pipeline(out, stream, **DIGITS).run()
    resumed, whole = load_store(out / MODEL_FILE), load_store(digits_run["out"] / MODEL_FILE)
    for t in range(3):
        a, b = resumed.recognition_stats(t), whole.recognition_stats(t)
        assert a is not None and b is not None
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_statistics_do_not_depend_on_the_thread_count(digits_run: dict) -> None:
    model = PackedModel.load(digits_run["out"] / MODEL_FILE)
    train = digits_run["stream"].fit_splits(1)[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = recognise.task_statistics(model, 1, train)
        torch.set_num_threads(2)
        two = recognise.task_statistics(model, 1, train)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(one[k], two[k]) for k in one)
    stored = model.store.recognition_stats(1)
    assert stored is not None and all(torch.equal(one[k], stored[k]) for k in one)


def test_statistics_with_weight_sharing_and_in_a_grown_model(tmp_path: Path) -> None:
    """Sharing tasks read earlier tasks' weights: their statistics come from the same decoded
    sub-network that predicts. A task moved to a new network (grow) decodes the same weights
    and gives the same statistics."""
    stream = _stream()
    sharing = {**DIGITS, "sharing": {"enabled": True}}
    local_pipeline(tmp_path / "share", stream, **sharing).run()
    store = load_store(tmp_path / "share" / MODEL_FILE)
    assert any(bool(m.any()) for m in store.shared(1).values())
    model = PackedModel(store)
    for t in range(3):
        fresh = recognise.task_statistics(model, t, stream.fit_splits(t)[0])
        kept = store.recognition_stats(t)
        assert kept is not None and all(torch.equal(fresh[k], kept[k]) for k in fresh)
    # task 0 alone in network 0, then task 0's parts again in a second network
    grown = PackedStore(list(store.layers), b_max=store.b_max, meta=store.meta)
    for network in range(2):
        if network:
            grown.grow()
        grown.commit(
            store.mask(0), store.codes(0), store.codebooks(0), store.bit_width(0),
            store.task_state(0),
        )  # fmt: skip
    assert grown.network_of(1) == 1
    in_grown = recognise.task_statistics(PackedModel(grown), 1, stream.fit_splits(0)[0])
    kept = store.recognition_stats(0)
    assert kept is not None and all(torch.equal(in_grown[k], kept[k]) for k in kept)


@pytest.mark.parametrize(
    ("net", "shape"),
    [
        ({"backbone": "mlp", "hidden": [16, 8]}, (12,)),
        ({"backbone": "alexnet", "width": 1 / 16}, (3, 20, 20)),
        ({"backbone": "resnet18_reduced", "width": 0.2}, (3, 8, 8)),
        ({"backbone": "resnet18", "width": 1 / 16}, (3, 16, 16)),
        ({"backbone": "tinynet", "width": 1 / 16}, (3, 16, 16)),
    ],
)
def test_features_are_exactly_the_heads_input(net: dict, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    population = build(NetConfig(**net), shape, 5, 2)
    population.init_candidates(1, 0, [0, 1])
    population.eval()
    x = torch.randn(7, *shape)
    seen: list[torch.Tensor] = []
    head = population.head

    def spy(h: torch.Tensor) -> torch.Tensor:
        seen.append(h)
        return head(h)

    population.head = spy  # type: ignore[method-assign]
    logits = population(x)
    features = population.features(x)
    assert features.shape[:2] == (2, 7) and features.dim() == 3
    assert torch.equal(seen[0], features)
    assert torch.equal(logits, head(features))


def test_the_config_names_every_recogniser_and_refuses_others() -> None:
    from typing import get_args

    names = get_args(InferenceConfig.model_fields["recogniser"].annotation)
    assert names == recognise.RECOGNISERS
    from qpacknet.config import validate
    from qpacknet.errors import ConfigError

    with pytest.raises(ConfigError, match=r"inference\.recogniser"):
        validate({"inference": {"recogniser": "nope"}})
    with pytest.raises(ConfigError, match="needs the feature statistics"):
        validate({"inference": {"recogniser": "combined", "statistics": ["input"]}})


def test_image_figures_are_those_of_predict_on_raw_images(tmp_path: Path) -> None:
    """Split CIFAR-100 standardises each task with its own statistics: the run's figures give
    every sub-network the test images as its own task prepares them, as predict does."""
    from qpacknet.cli import main
    from qpacknet.config import load_config
    from qpacknet.preparation import of_store, task_inputs
    from tests.test_image_scenarios import _make_cifar100

    _make_cifar100(tmp_path / "data")
    out = tmp_path / "run"
    sets = ["scenario.name=cifar100", "scenario.num_tasks=2", "search.population=2"]
    sets += ["search.epochs=1", "train.epochs=2", "capacity.quality_gate=warn", "threads=1"]
    args = ["run", "--preset", "digits", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    args += [f"--set={s}" for s in sets] + ["--executor", "local", "--no-tracking", "--quiet"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    model = PackedModel.load(out / MODEL_FILE)
    preps = of_store(model.store)
    assert preps is not None and preps[0].mean != preps[1].mean
    cfg = load_config(overrides=sets)
    stream = build_stream(cfg.scenario, cfg.seed, str(tmp_path / "data"), "cpu")
    for method, figures in results["task_inference"].items():
        right = 0.0
        for j in range(2):
            split = stream.test_split(j)
            inputs = task_inputs(preps, split.x, model.input_shape)
            found = recognise.infer_tasks(model, inputs, method)
            right += 100.0 * int((found.task == j).sum()) / len(split) / 2
        assert figures["task_inference_acc"] == pytest.approx(right, abs=1e-9), method


def test_a_diagonal_covariance_keeps_d_values_scores_by_definition_and_round_trips(
    digits_run: dict, tmp_path: Path
) -> None:
    """``inference.feature_covariance=diagonal``: the feature statistics keep one scale per
    dimension, ``1/sqrt(pooled within-class variance + ridge)``
    computed here independently; the score is the diagonal Mahalanobis distance; the file
    round-trips them bit for bit; a whitening of another length is refused."""
    assert InferenceConfig().feature_covariance == "full"
    model = PackedModel.load(digits_run["out"] / MODEL_FILE)
    train = digits_run["stream"].fit_splits(1)[0]
    diag = recognise.task_statistics(model, 1, train, covariance="diagonal")
    full = recognise.task_statistics(model, 1, train, covariance="full")
    assert torch.equal(diag["feature.means"], full["feature.means"])
    assert torch.equal(diag["input.var"], full["input.var"])
    with torch.no_grad():
        f = model.net(1).features(train.inputs(slice(0, len(train))))[0].double()
    y = train.y
    means = torch.stack([f[y == c].mean(0) for c in sorted(set(y.tolist()))])
    centred = f - means[torch.searchsorted(torch.tensor(sorted(set(y.tolist()))), y)]
    var = (centred * centred).mean(0)
    scale = (var + 0.1 * var.mean() + 1e-12).rsqrt()
    assert diag["feature.whiten"].shape == (f.shape[1],)
    assert torch.allclose(diag["feature.whiten"].double(), scale, rtol=1e-5)

    x = digits_run["stream"].test_split(1).x[:50]
    with torch.no_grad():
        g = model.net(1).features(x)[0].double()
    w, m = diag["feature.whiten"].double(), diag["feature.means"].double()
    by_hand = -(((g[:, None] - m[None]) * w) ** 2).sum(-1).min(1).values / g.shape[1]
    assert torch.allclose(recognise.feature_score(diag, g), by_hand, atol=1e-9)
    assert not torch.allclose(recognise.feature_score(full, g), by_hand, atol=1e-3)

    store = load_store(digits_run["out"] / MODEL_FILE)
    store.set_recognition_stats(1, diag)
    again = tmp_path / "diagonal.safetensors"
    save_store(store, again)
    kept = load_store(again).recognition_stats(1)
    assert kept is not None and all(torch.equal(kept[k], diag[k]) for k in diag)
    with pytest.raises(Exception, match=r"holds 31 values, 528 \(full covariance\) or 32"):
        store.set_recognition_stats(1, {**diag, "feature.whiten": diag["feature.whiten"][:31]})


def test_commit_says_once_when_full_covariance_statistics_grow_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Statistics above ``LARGE_STATS_BYTES`` a task are said once per run, with their size and
    the settings that shrink them; with the diagonal covariance nothing is said and the file
    holds ``D`` whitening values a task."""
    import io

    from qpacknet import pipeline
    from qpacknet.executor import LocalExecutor
    from qpacknet.progress import Progress

    monkeypatch.setattr(pipeline, "LARGE_STATS_BYTES", 1000)
    stream = _stream()
    said = {}
    for covariance in ("full", "diagonal"):
        text = io.StringIO()
        cfg = tiny_config(**DIGITS, inference={"feature_covariance": covariance})
        out = tmp_path / covariance
        pipe = pipeline.Pipeline(cfg, stream, LocalExecutor(), out, Progress(text, verbose=False))
        pipe.run()
        said[covariance] = [line for line in text.getvalue().splitlines() if " MB to " in line]
        whiten = load_store(out / MODEL_FILE).recognition_stats(2)
        assert whiten is not None
        assert whiten["feature.whiten"].numel() == (528 if covariance == "full" else 32)
    full = recognise.stats_bytes(load_store(tmp_path / "full" / MODEL_FILE).recognition_stats(0))
    assert len(said["full"]) == 1 and said["diagonal"] == []
    assert f"task 1: its recognition statistics add {full / 1e6:.1f} MB" in said["full"][0]
    assert "full covariance of 32 features" in said["full"][0]
    assert "inference.feature_covariance=diagonal keeps 0.00 MB" in said["full"][0]
