"""The Ray executor plugs into the unchanged pipeline and gives the local executor's result."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from qpacknet.cluster import RayExecutor
from qpacknet.cluster.connect import keep_loopback
from qpacknet.config import RunConfig
from qpacknet.executor import LocalExecutor
from qpacknet.pipeline import MODEL_FILE, Pipeline
from qpacknet.progress import Progress
from qpacknet.scenarios import PermutedDigits, TaskStream
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
        runtime_env={"env_vars": {FAULT_ENV: str(marker_dir / "die")}},
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
