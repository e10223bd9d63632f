"""The pipeline end to end on a tiny stream: forget-free commits, honest metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qpacknet.errors import ModelFileError
from qpacknet.model import PackedModel
from qpacknet.pipeline import MODEL_FILE, Pipeline
from tests.conftest import BlobStream
from tests.helpers import learn_checking_old_logits, local_pipeline


def test_old_tasks_logits_bit_identical_from_reloaded_file(tmp_path: Path) -> None:
    stream = BlobStream(num_tasks=4)
    probe = torch.randn(50, 12, generator=torch.Generator().manual_seed(9))
    pipe = local_pipeline(tmp_path, stream)
    learn_checking_old_logits(pipe, probe)
    assert pipe.matrix.bwt == 0.0
    # every row was re-evaluated from the model: each diagonal equals a fresh evaluation
    model = PackedModel.load(tmp_path / MODEL_FILE)
    for j in range(stream.num_tasks):
        assert pipe.matrix.rows[-1][j] == model.accuracy(j, stream.test_split(j))


def test_tasks_learn_their_own_function(tmp_path: Path) -> None:
    stream = BlobStream(num_tasks=2)
    pipe = local_pipeline(tmp_path, stream, train={"epochs": 8})
    pipe.run()
    model = PackedModel.load(tmp_path / MODEL_FILE)
    for j in range(2):
        assert model.accuracy(j, stream.test_split(j)) > 70.0
    # task 0's head on task 1's data is much worse than task 1's own sub-network
    x1 = stream.test_split(1)
    assert model.accuracy(1, x1) > model.accuracy(0, x1) + 10.0


def test_results_json_and_determinism(tmp_path: Path) -> None:
    stream = BlobStream(num_tasks=2)
    a = local_pipeline(tmp_path / "a", stream).run()
    b = local_pipeline(tmp_path / "b", BlobStream(num_tasks=2)).run()
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
    for key in (
        "scenario",
        "config",
        "accuracy_matrix",
        "acc",
        "bwt",
        "capacity_pct",
        "packed_bytes",
        "tasks",
        "seconds_total",
        "hardware",
    ):
        assert key in on_disk
    task = on_disk["tasks"][0]
    for key in (
        "task",
        "bit_width",
        "density",
        "candidates",
        "winner",
        "float_acc",
        "quant_acc",
        "seconds",
    ):
        assert key in task
    assert set(task["seconds"]) >= {"search", "train", "quantize", "commit"}
    assert len(task["candidates"]) == 4
    assert set(task["candidates"][0]) >= {"acc", "sparsity", "score"}
    assert on_disk["packed_bytes"] == (tmp_path / "a" / MODEL_FILE).stat().st_size
    assert on_disk["bwt"] == 0.0
    assert [len(r) for r in on_disk["accuracy_matrix"]] == [1, 2]
    for key in ("accuracy_matrix", "acc", "capacity_pct", "packed_bytes"):
        assert a[key] == b[key]
    assert [t["winner"] for t in a["tasks"]] == [t["winner"] for t in b["tasks"]]
    assert (tmp_path / "a" / MODEL_FILE).read_bytes() == (tmp_path / "b" / MODEL_FILE).read_bytes()


def test_winner_has_the_best_score_and_commit_uses_available_weights(tmp_path: Path) -> None:
    stream = BlobStream(num_tasks=3)
    pipe = local_pipeline(tmp_path, stream, quantize={"b_max": 8, "psi_min": 8, "delta": 100.0})
    pipe.run()
    for rep in pipe.task_reports:
        scores = [c["score"] for c in rep["candidates"]]
        assert rep["winner"] == scores.index(max(scores))
        assert rep["bit_width"] == 8
    for spec in pipe.store.layers:
        used = pipe.store.used_bits[spec.name]
        assert int(used.max()) <= 32
        owners = sum(pipe.store.mask(t)[spec.name].long() for t in range(3))
        assert torch.equal(used, owners * 8)


def _without_timings(res: dict) -> dict:
    res = json.loads(json.dumps(res))
    for key in ("seconds_total", "seconds_by_stage", "throughput", "hardware", "event_latency_s"):
        res.pop(key)
    for task in res["tasks"]:
        task.pop("seconds")
        task.pop("training_seconds")
        for key in ("started_at", "committed_at"):
            task.pop(key)
        for epoch in task["train_epochs"]:
            epoch.pop("ended_at")
        for chunk in task["search_chunks"]:
            chunk.pop("started_at")
            chunk.pop("ended_at")
        for c in task["candidates"]:
            c["epochs"] = [e[:4] for e in c["epochs"]]  # without the time each epoch ended
    return res


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("crash_at", [1, 2])
def test_driver_crash_then_resume_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int
) -> None:
    full = local_pipeline(tmp_path / "full", BlobStream(num_tasks=3)).run()
    original = Pipeline.learn_task

    def dying(self: Pipeline, t: int) -> None:
        if t == crash_at:
            raise _Crash(f"driver died before task {t}")
        original(self, t)

    monkeypatch.setattr(Pipeline, "learn_task", dying)
    with pytest.raises(_Crash):
        local_pipeline(tmp_path / "cut", BlobStream(num_tasks=3)).run()
    assert not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(Pipeline, "learn_task", original)
    resumed = local_pipeline(tmp_path / "cut", BlobStream(num_tasks=3)).run()
    assert _without_timings(resumed) == _without_timings(full)
    assert (tmp_path / "cut" / MODEL_FILE).read_bytes() == (
        tmp_path / "full" / MODEL_FILE
    ).read_bytes()


def test_crash_between_model_and_checkpoint_relearns_the_task(tmp_path: Path) -> None:
    full = local_pipeline(tmp_path / "full", BlobStream(num_tasks=2)).run()
    cut = local_pipeline(tmp_path / "cut", BlobStream(num_tasks=2))
    cut.learn_task(0)
    cut._checkpoint(1.0)
    cut.learn_task(1)  # model saved with 2 tasks, checkpoint still says 1
    resumed = local_pipeline(tmp_path / "cut", BlobStream(num_tasks=2)).run()
    assert _without_timings(resumed) == _without_timings(full)


def test_damaged_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    local_pipeline(tmp_path, BlobStream(num_tasks=1)).run()
    (tmp_path / "checkpoint.json").write_text('{"format": "qpacknet-checkpoint", "vers')
    with pytest.raises(ModelFileError, match=r"checkpoint\.json is damaged"):
        local_pipeline(tmp_path, BlobStream(num_tasks=1)).run()


def test_validation_matrix_is_reevaluated_from_the_packed_model(tmp_path: Path) -> None:
    """``val_accuracy_matrix``/``val_acc`` (what tuning ranks on) come from the packed model,
    like the test matrix: the saved file reproduces the last row on the validation splits."""
    stream = BlobStream(num_tasks=3, seed=5)
    res = local_pipeline(tmp_path, stream).run()
    rows = res["val_accuracy_matrix"]
    assert [len(r) for r in rows] == [1, 2, 3]
    assert all(rows[i][j] == rows[j][j] for i in range(3) for j in range(i + 1))
    model = PackedModel.load(tmp_path / MODEL_FILE)
    last = [model.accuracy(j, stream.val_split(j)) for j in range(3)]
    assert rows[-1] == last
    assert res["val_acc"] == sum(last) / 3
    assert "val_acc" in res and res["acc"] == sum(res["accuracy_matrix"][-1]) / 3
