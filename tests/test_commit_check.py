"""COMMIT is checked bit for bit, never by comparing floats from two processes (issue 10):
a worker whose accuracies are off by one ulp still commits; a worker whose codes differ by one
bit from what it quantised is refused, and nothing reaches the model file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qpacknet.errors import CommitRefused, ForgettingDetected
from qpacknet.pipeline import MODEL_FILE
from qpacknet.store import PackedStore
from qpacknet.worker import FLIP_CODE_BIT_ENV, ULP_ENV
from tests.conftest import BlobStream
from tests.helpers import local_pipeline


def _marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str) -> Path:
    marker = tmp_path / env.lower()
    monkeypatch.setenv(env, str(marker))
    return marker


def test_one_ulp_from_the_worker_still_commits_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = local_pipeline(tmp_path / "plain", BlobStream(num_tasks=2)).run()
    _marker(tmp_path, monkeypatch, ULP_ENV).write_text("on")
    nudged = local_pipeline(tmp_path / "ulp", BlobStream(num_tasks=2)).run()
    for a, b in zip(plain["tasks"], nudged["tasks"], strict=True):
        assert b["quant_acc"] == math.nextafter(a["quant_acc"], math.inf)
        assert b["commit_digest"] == a["commit_digest"]
    up = [[math.nextafter(v, math.inf) for v in row] for row in plain["accuracy_matrix"]]
    assert nudged["accuracy_matrix"] == up
    assert nudged["bwt"] == 0.0
    assert (tmp_path / "ulp" / MODEL_FILE).read_bytes() == (
        tmp_path / "plain" / MODEL_FILE
    ).read_bytes()


def test_one_flipped_code_bit_is_refused_and_the_model_file_is_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = _marker(tmp_path, monkeypatch, FLIP_CODE_BIT_ENV)
    pipe = local_pipeline(tmp_path / "run", BlobStream(num_tasks=2))
    pipe.learn_task(0)
    before = pipe.model_path.read_bytes()
    marker.write_text("on")
    with pytest.raises(CommitRefused, match=r"task 2: COMMIT refused: .* not what the worker"):
        pipe.learn_task(1)
    assert pipe.store.num_tasks == 1
    assert pipe.model_path.read_bytes() == before
    assert len(pipe.matrix.rows) == 1


def test_words_that_read_back_wrong_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packing bug (here: the read-back of the words loses one bit) stops COMMIT before
    the model file is written."""
    original = PackedStore.codes

    def damaged(self: PackedStore, task: int) -> dict[str, torch.Tensor]:
        codes = original(self, task)
        name = sorted(codes)[0]
        codes[name] = codes[name].clone()
        codes[name].view(-1)[-1] ^= 1
        return codes

    monkeypatch.setattr(PackedStore, "codes", damaged)
    pipe = local_pipeline(tmp_path / "run", BlobStream(num_tasks=1))
    with pytest.raises(CommitRefused, match=r"task 1: COMMIT refused: the packed words"):
        pipe.learn_task(0)
    assert not pipe.model_path.exists()


def test_an_earlier_task_that_changes_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run checks its own promise after every commit: R[t][j] == R[j][j] bit for bit."""
    from qpacknet.model import PackedModel

    original = PackedModel.accuracy

    def drifting(self: PackedModel, task: int, split: object) -> float:
        acc = original(self, task, split)  # type: ignore[arg-type]
        return acc - 1.0 if task == 0 and self.store.num_tasks == 2 else acc

    monkeypatch.setattr(PackedModel, "accuracy", drifting)
    pipe = local_pipeline(tmp_path / "run", BlobStream(num_tasks=2))
    pipe.learn_task(0)
    with pytest.raises(ForgettingDetected, match=r"after task 2, task 1's test accuracy is"):
        pipe.learn_task(1)
