"""The Ray executor plugs into the unchanged pipeline and gives the local executor's result."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from qpacknet.cluster import RayExecutor
from qpacknet.cluster.connect import keep_loopback
from qpacknet.config import RunConfig
from qpacknet.errors import CommitRefused
from qpacknet.executor import LocalExecutor
from qpacknet.pipeline import MODEL_FILE, Pipeline
from qpacknet.progress import Progress
from qpacknet.scenarios import PermutedDigits, TaskStream
from qpacknet.worker import FLIP_CODE_BIT_ENV, ULP_ENV
from tests.conftest import BlobStream, tiny_config

FAULT_ENV = "QPACKNET_TEST_DIE_ONCE"


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    marker_dir = tmp_path_factory.mktemp("faults")
    keep_loopback()
    ray.init(
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        runtime_env={
            "env_vars": {
                FAULT_ENV: str(marker_dir / "die"),
                ULP_ENV: str(marker_dir / "ulp"),
                FLIP_CODE_BIT_ENV: str(marker_dir / "flip"),
            }
        },
        logging_level="ERROR",
    )
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    yield marker_dir
    ray.shutdown()


def _stream(kind: str) -> TaskStream:
    """``blobs`` has no worker copy (each task's data is sent); ``digits`` has one (actors
    rebuild each task from the stream they got once)."""
    return (
        BlobStream(num_tasks=2) if kind.startswith("blobs") else PermutedDigits(num_tasks=2, seed=3)
    )


def _config(kind: str) -> RunConfig:
    return tiny_config(
        executor={
            "candidates_per_worker": 2,
            "workers": 2,
            "cpus_per_worker": 1,
            "gpus_per_worker": 0,
        },
        sharing={"enabled": kind.endswith("sharing")},
    )


def _run(tmp: Path, executor: object, kind: str = "blobs") -> dict:
    return Pipeline(_config(kind), _stream(kind), executor, tmp, Progress(verbose=False)).run()


@pytest.mark.parametrize("kind", ["blobs", "digits", "blobs-sharing"])
def test_same_winner_and_packed_model_as_local(tmp_path: Path, local_ray: Path, kind: str) -> None:
    local = _run(tmp_path / "local", LocalExecutor(), kind)
    remote_exec = RayExecutor(_config(kind))
    assert remote_exec.actors_started == 2, "the actors must start up front"
    remote = _run(tmp_path / "ray", remote_exec, kind)
    assert remote_exec.actors_started == 2
    assert [t["winner"] for t in remote["tasks"]] == [t["winner"] for t in local["tasks"]]
    assert remote["accuracy_matrix"] == local["accuracy_matrix"]
    assert (tmp_path / "ray" / MODEL_FILE).read_bytes() == (
        tmp_path / "local" / MODEL_FILE
    ).read_bytes()
    assert remote["executor"] == "ray"
    assert (remote["shared_pct"] > 0) == kind.endswith("sharing")


@pytest.mark.parametrize("kind", ["blobs", "digits"])
def test_killed_actor_is_replaced_and_search_ends_with_same_winner(
    tmp_path: Path, local_ray: Path, kind: str
) -> None:
    """The replacement must also get the run's stream (``digits``) or the task's data."""
    baseline = _run(tmp_path / "base", LocalExecutor(), kind)
    (local_ray / "die").write_text("candidate actor: exit once")
    ex = RayExecutor(_config(kind))
    res = _run(tmp_path / "faulty", ex, kind)
    assert not (local_ray / "die").exists(), "the fault was never injected"
    assert ex.restarts >= 1
    assert [t["winner"] for t in res["tasks"]] == [t["winner"] for t in baseline["tasks"]]
    assert res["accuracy_matrix"] == baseline["accuracy_matrix"]
    assert os.environ.get(FAULT_ENV) is None


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_actor_killed_in_a_later_stage_is_replaced_said_and_gives_the_same_run(
    tmp_path: Path, local_ray: Path, stage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The winner's actor dying at TRAIN (it may be the evaluation actor too), or the
    evaluation actor dying at EVALUATE: the work moves to a fresh actor, the log says so, and
    the run's results and model bytes are those of an undisturbed run."""
    baseline = _run(tmp_path / "base", LocalExecutor())
    (local_ray / "die").write_text(stage)
    ex = RayExecutor(_config("blobs"))
    res = Pipeline(
        _config("blobs"), _stream("blobs"), ex, tmp_path / "faulty", Progress(verbose=False)
    ).run()
    assert not (local_ray / "die").exists(), "the fault was never injected"
    assert ex.restarts == 1
    assert f"{stage.upper()}: worker " in capsys.readouterr().out
    assert res["accuracy_matrix"] == baseline["accuracy_matrix"]
    assert [t["winner"] for t in res["tasks"]] == [t["winner"] for t in baseline["tasks"]]
    assert [len(t["train_epochs"]) for t in res["tasks"]] == [3, 3]
    assert (tmp_path / "faulty" / MODEL_FILE).read_bytes() == (
        tmp_path / "base" / MODEL_FILE
    ).read_bytes()
    # every row has one evaluation worker; here the first one died before it reported any
    assert sorted(t for tasks in res["evaluators"].values() for t in tasks) == [0, 1]
    ev = res["evaluation"]
    assert res["evaluators"][f"{ev['host']}:{ev['pid']}"][-1] == 1


def test_ray_workers_one_ulp_off_commit_and_one_flipped_bit_is_refused(
    tmp_path: Path, local_ray: Path
) -> None:
    """The cross-process COMMIT check: actors whose accuracies are one ulp off still commit
    the same model; an actor whose codes differ by one bit from what it hashed is refused."""
    baseline = _run(tmp_path / "base", LocalExecutor())
    (local_ray / "ulp").write_text("on")
    try:
        nudged = _run(tmp_path / "ulp", RayExecutor(_config("blobs")))
    finally:
        (local_ray / "ulp").unlink()
    up = [[math.nextafter(v, math.inf) for v in row] for row in baseline["accuracy_matrix"]]
    assert nudged["accuracy_matrix"] == up
    assert (tmp_path / "ulp" / MODEL_FILE).read_bytes() == (
        tmp_path / "base" / MODEL_FILE
    ).read_bytes()
    (local_ray / "flip").write_text("on")
    try:
        with pytest.raises(CommitRefused, match="task 1: COMMIT refused"):
            _run(tmp_path / "flip", RayExecutor(_config("blobs")))
    finally:
        (local_ray / "flip").unlink()
    assert not (tmp_path / "flip" / MODEL_FILE).exists()
