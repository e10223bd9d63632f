"""Long streams that outgrow the words (issue 11, point 1): ``capacity.when_full`` decides
what happens when a layer cannot give a new task its minimum density, and the quality gate
stops a task that learned nothing from being committed silently. The tests run the real
entry point on a 60-task digits stream at tiny settings (a 32-32 MLP's words are full after
about 15 tasks); chance on a digits task is about 10 %."""

from __future__ import annotations

import json
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

from qpacknet.cli import main
from qpacknet.layout import CHECKPOINT_FILE, MODEL_FILE, RESULTS_FILE
from qpacknet.model import PackedModel
from qpacknet.store import load_store

TINY = (
    "scenario.num_tasks=60",
    "search.population=2",
    "search.epochs=1",
    "train.epochs=3",
    "net.hidden=[32,32]",
    "threads=1",
)
WELL_ABOVE_CHANCE = 50.0


def _run(out: Path, *settings: str) -> tuple[int, str, str]:
    """``qpacknet run --preset digits`` in-process; (exit code, stdout, stderr)."""
    argv = ["run", "--preset", "digits", "--executor", "local", "--no-tracking", "--quiet"]
    argv += ["--out", str(out)]
    for s in (*TINY, *settings):
        argv += ["--set", s]
    stdout, stderr = StringIO(), StringIO()
    threads = torch.get_num_threads()
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            rc = main(argv)
    finally:
        torch.set_num_threads(threads)  # also for the module-scoped run (no autouse there)
    return rc, stdout.getvalue(), stderr.getvalue()


def _results(out: Path) -> dict:
    return json.loads((out / RESULTS_FILE).read_text())


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The default policy (grow) on the 60-task stream."""
    out = tmp_path_factory.mktemp("grow")
    rc, printed, err = _run(out)
    assert rc == 0, err
    return out, printed


def test_grow_opens_networks_and_every_task_is_learned(grown: tuple[Path, str]) -> None:
    out, printed = grown
    res = _results(out)
    row = res["accuracy_matrix"][-1]
    assert len(row) == 60 and min(row) > WELL_ABOVE_CHANCE, sorted(row)[:3]
    assert res["bwt"] == 0.0 and res["quality_gate_failed"] == []
    networks = res["networks"]
    assert len(networks) >= 2
    assert sorted(t for n in networks for t in n["tasks"]) == list(range(60))
    opened = [r["task"] for r in res["tasks"] if r.get("when_full") == "grow"]
    assert [n["tasks"][0] for n in networks[1:]] == opened
    assert [r["network"] for r in res["tasks"]] == sorted(r["network"] for r in res["tasks"])
    assert res["capacity_pct"] == pytest.approx(sum(n["capacity_pct"] for n in networks))
    first = opened[0]
    assert f"task {first + 1}: network 0 is full" in printed
    assert "opened network 1 for this and later tasks" in printed
    store = load_store(out / MODEL_FILE)
    assert store.num_networks == len(networks)
    assert [store.network_of(t) for t in range(60)] == [r["network"] for r in res["tasks"]]


def test_stop_exits_2_before_the_first_starving_task(
    grown: tuple[Path, str], tmp_path: Path
) -> None:
    """Same settings, ``stop``: the run ends with exit 2 exactly where ``grow`` opened its
    first new network, naming the layer, the task and the three policies; nothing of that
    task is committed. Resumed with ``grow`` it continues, and the tasks learned before the
    growth keep their logits bit for bit."""
    first = next(r["task"] for r in _results(grown[0])["tasks"] if r.get("when_full"))
    out = tmp_path / "stop"
    rc, printed, err = _run(out, "capacity.when_full=stop")
    assert rc == 2, err
    for words in (
        f"task {first + 1}: network 0 is full: layer 'fc0'",
        "capacity.when_full: grow",
        "share",
        "stop (this message)",
        f"tasks 1..{first} are committed",
    ):
        assert words in err, err
    assert f"task {first + 1} SEARCH" not in printed
    before = PackedModel.load(out / MODEL_FILE)
    assert before.num_tasks == first
    assert len(json.loads((out / CHECKPOINT_FILE).read_text())["tasks"]) == first
    x = torch.rand(16, 64)
    logits = [before.logits(j, x) for j in range(first)]

    rc, printed, err = _run(out, "capacity.when_full=grow", f"scenario.num_tasks={first + 2}")
    assert rc == 0, err
    after = PackedModel.load(out / MODEL_FILE)
    assert after.num_tasks == first + 2 and after.store.num_networks == 2
    for j in range(first):
        assert torch.equal(after.logits(j, x), logits[j]), f"task {j + 1} changed"
    grown_row = _results(grown[0])["accuracy_matrix"][first + 1]
    assert _results(out)["accuracy_matrix"][-1] == grown_row, "resume = uninterrupted run"


def test_share_reads_frozen_weights_once_the_words_are_full(tmp_path: Path) -> None:
    rc, printed, err = _run(tmp_path, "capacity.when_full=share")
    assert rc == 0, err
    res = _results(tmp_path)
    row = res["accuracy_matrix"][-1]
    assert len(row) == 60 and min(row) > WELL_ABOVE_CHANCE, sorted(row)[:3]
    assert len(res["networks"]) == 1 and res["quality_gate_failed"] == []
    full = [r for r in res["tasks"] if r.get("when_full") == "share"]
    assert full and full[-1]["task"] == 59
    assert all(r["shared_pct"] > 0 for r in full)
    assert "the task also reads earlier tasks' frozen weights" in printed


def test_quality_gate_stops_a_task_that_learned_nothing(tmp_path: Path) -> None:
    """A learning rate that cannot move the weights leaves the first task near chance: the
    run stops (exit 1) before committing it; with ``quality_gate=warn`` it is committed and
    marked in results.json."""
    dead = ("scenario.num_tasks=2", "train.lr=1e-9", "train.lr_min=0", "search.epochs=1")
    rc, printed, err = _run(tmp_path / "stop", *dead)
    assert rc == 1, err
    assert "task 1: validation accuracy after TRAIN is" in err
    assert "within capacity.chance_margin=10 points of chance" in err
    assert "capacity.quality_gate=warn" in err
    assert not (tmp_path / "stop" / MODEL_FILE).exists()

    rc, printed, err = _run(tmp_path / "warn", *dead, "capacity.quality_gate=warn")
    assert rc == 0, err
    assert "WARNING: task 1: validation accuracy after TRAIN" in printed
    res = _results(tmp_path / "warn")
    assert res["quality_gate_failed"] == [0, 1]
    report = res["tasks"][0]
    assert report["quality_gate"] == "failed"
    assert report["float_acc"] < report["chance_acc"] + 10.0


def test_a_grown_model_is_tracked_and_learn_continues_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dense 8-bit tasks fill a network's words after 4 tasks, so task 5 opens network 1.
    MLflow records it (tags and the network metric of the task run), and ``qpacknet learn``
    continues the registered two-network model with task 6 in network 1, the earlier tasks'
    logits bit-identical across both networks."""
    from mlflow.tracking import MlflowClient

    from qpacknet.config import load_config
    from qpacknet.scenarios import build_stream
    from tests.helpers import learn_one_more_task

    dense = ["search.v_min=0.0", "search.v_max=0.1", "quantize.psi_min=8"]
    sets = ["scenario.num_tasks=5", "search.population=2", "search.epochs=1", "train.epochs=2"]
    out = tmp_path / "run"
    argv = ["run", "--preset", "digits", "--executor", "local", "--quiet", "--out", str(out)]
    for s in [*sets, *dense]:
        argv += ["--set", s]
    assert main(argv) == 0, capsys.readouterr().err
    res = _results(out)
    assert [r["network"] for r in res["tasks"]] == [0, 0, 0, 0, 1]
    client = MlflowClient(f"sqlite:///{(out / 'mlflow.db').resolve()}")
    runs = client.search_runs(
        [client.get_experiment_by_name("qpacknet").experiment_id],
        "tags.`qpacknet.when_full` = 'grow'",
    )
    assert len(runs) == 1 and runs[0].data.metrics["network"] == 1.0

    cfg = load_config("digits", None, [*sets, *dense, "scenario.num_tasks=6"])
    stream = build_stream(cfg.scenario, cfg.seed, None, "cpu")
    after = learn_one_more_task(out, "qpacknet-digits", tmp_path / "learned", stream, capsys)
    assert after.num_tasks == 6 and after.store.num_networks == 2
    assert after.store.network_of(5) == 1


def test_quality_gate_also_checks_the_quantised_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that trained well but whose quantised network sits near chance (no width met
    the criterion and b_max fell short) is not committed either."""
    import dataclasses

    from qpacknet.executor import LocalExecutor

    quantize = LocalExecutor.quantize

    def near_chance(self: LocalExecutor, on_event: object = None) -> object:
        return dataclasses.replace(quantize(self, on_event), quant_acc=5.0, within_delta=False)

    monkeypatch.setattr(LocalExecutor, "quantize", near_chance)
    rc, _, err = _run(tmp_path, "scenario.num_tasks=1")
    assert rc == 1, err
    assert "task 1: the quantised network's validation accuracy is 5.00 %" in err
    assert "The task was not committed" in err
    assert not (tmp_path / MODEL_FILE).exists()
