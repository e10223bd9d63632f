"""Class-incremental inference: the lowest-entropy task wins, figures match a brute-force
recomputation from the saved model (entropy by hand, the other recognisers through
:func:`qpacknet.recognise.infer_tasks`), and each (sub-network, test set) pair is evaluated
once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qpacknet.executor import LocalExecutor
from qpacknet.metrics import TaskInference
from qpacknet.model import PackedModel
from qpacknet.pipeline import MODEL_FILE, RESULTS_FILE, Pipeline
from qpacknet.progress import Progress
from qpacknet.recognise import infer_tasks
from tests.conftest import BlobStream, tiny_config

SURE = [9.0, 0.0, 0.0]  # low entropy, predicts class 0
UNSURE = [1.0, 1.0, 0.9]  # high entropy, predicts class 0 or 1
FLAT = [0.0, 0.0, 0.0]  # maximal entropy


def test_lowest_entropy_task_is_inferred_and_ties_go_to_the_lower_task() -> None:
    # outputs[(i, j)]: sub-network i on the two inputs of test task j
    outputs = {
        (0, 0): [SURE, UNSURE],
        (1, 0): [UNSURE, SURE],
        (0, 1): [FLAT, [0.0, 9.0, 0.0]],
        (1, 1): [FLAT, [0.0, 0.0, 9.0]],
    }
    labels = {0: torch.tensor([0, 0]), 1: torch.tensor([2, 2])}
    calls: list[tuple[int, int]] = []

    def logits(i: int, j: int) -> torch.Tensor:
        calls.append((i, j))
        return torch.tensor(outputs[(i, j)])

    fig = TaskInference().update(2, logits, labels.__getitem__)
    # task 0: input 0 -> task 0 (right, class 0 right); input 1 -> task 1 (wrong)
    # task 1: input 0 -> tie, goes to task 0 (wrong); input 1 -> tie, task 0 (wrong)
    assert fig.per_task == [
        {"task_inference_acc": 50.0, "class_incremental_acc": 50.0},
        {"task_inference_acc": 0.0, "class_incremental_acc": 0.0},
    ]
    assert fig.task_inference_acc == 25.0 and fig.class_incremental_acc == 25.0
    assert sorted(calls) == sorted(outputs)


def test_each_pair_is_evaluated_once_across_tasks() -> None:
    calls: list[tuple[int, int]] = []

    def logits(i: int, j: int) -> torch.Tensor:
        calls.append((i, j))
        g = torch.Generator().manual_seed(10 * i + j)
        return torch.randn(5, 3, generator=g)

    inference = TaskInference()
    for t in range(1, 5):
        inference.update(t, logits, lambda j: torch.zeros(5, dtype=torch.long))
        assert len(calls) == t * t and len(set(calls)) == t * t


def _brute_force(model: PackedModel, stream: BlobStream) -> tuple[list[float], list[float]]:
    """Per test task: % of inputs whose lowest-entropy task is right, and right with class."""
    inferred_right, class_right = [], []
    n = model.num_tasks
    for j in range(n):
        split = stream.test_split(j)
        good_task = good_class = 0
        for x, y in zip(split.x, split.y, strict=True):
            best, best_h, best_pred = -1, math.inf, -1
            for i in range(n):
                p = torch.softmax(model.logits(i, x[None]).double(), -1)[0]
                h = float(-(p * p.log()).sum())
                if h < best_h - 1e-6:
                    best, best_h, best_pred = i, h, int(p.argmax())
            good_task += best == j
            good_class += best == j and best_pred == int(y)
        inferred_right.append(100.0 * good_task / len(split.y))
        class_right.append(100.0 * good_class / len(split.y))
    return inferred_right, class_right


def test_pipeline_reports_task_inference_next_to_task_incremental(tmp_path: Path) -> None:
    stream = BlobStream(num_tasks=3)
    config = tiny_config(inference={"recogniser": "entropy"})
    pipe = Pipeline(config, stream, LocalExecutor(), tmp_path, Progress(verbose=False))
    res = pipe.run()
    assert res["task_inference_recogniser"] == "entropy"
    on_disk = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert on_disk["task_inference_acc"] == res["task_inference_acc"]
    ti, ci = _brute_force(PackedModel.load(tmp_path / MODEL_FILE), stream)
    per_task = res["task_inference_per_task"]
    assert [p["task_inference_acc"] for p in per_task] == ti
    assert [p["class_incremental_acc"] for p in per_task] == ci
    assert res["task_inference_acc"] == sum(ti) / 3
    assert res["class_incremental_acc"] <= res["task_inference_acc"]
    assert res["class_incremental_acc"] <= res["acc"]
    # every task's report carries the figures over the tasks learned so far
    assert res["tasks"][0]["task_inference_acc"] == 100.0
    assert res["tasks"][-1]["class_incremental_acc"] == res["class_incremental_acc"]
    # the other recognisers' figures are those of infer_tasks on the saved model
    model = PackedModel.load(tmp_path / MODEL_FILE)
    assert list(res["task_inference"]) == ["entropy", "input", "feature", "combined"]
    for method, figures in res["task_inference"].items():
        right = class_right = 0.0
        for j in range(3):
            split = stream.test_split(j)
            found = infer_tasks(model, split.x, method)
            ok = found.task == j
            right += 100.0 * int(ok.sum()) / len(ok) / 3
            class_right += 100.0 * int((ok & (found.prediction == split.y)).sum()) / len(ok) / 3
        assert figures["task_inference_acc"] == pytest.approx(right, abs=1e-9)
        assert figures["class_incremental_acc"] == pytest.approx(class_right, abs=1e-9)
