"""Scaling across nodes on a simulated multi-node cluster (``ray.cluster_utils.Cluster``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from qpacknet.cluster import RayExecutor
from qpacknet.cluster.connect import keep_loopback
from qpacknet.executor import LocalExecutor
from qpacknet.pipeline import MODEL_FILE, Pipeline
from qpacknet.progress import Progress
from tests.conftest import BlobStream, tiny_config


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # all nodes live on 127.0.0.1; without this Ray rewrites a loopback address to the
    # machine's external IP when connecting, where nothing listens
    keep_loopback()
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    for _ in range(2):
        c.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR")
    yield c
    ray.shutdown()
    c.shutdown()


def test_population_spreads_over_gpu_nodes_and_queues(tmp_path: Path, cluster: Cluster) -> None:
    over = {"search": {"population": 6, "epochs": 1}, "train": {"epochs": 2}}
    cfg = tiny_config(
        executor={"candidates_per_worker": 1, "workers": "auto", "gpus_per_worker": 1}, **over
    )
    assert ray.cluster_resources().get("GPU") == 2
    ex = RayExecutor(cfg.executor)
    remote = Pipeline(
        cfg, BlobStream(num_tasks=2), ex, tmp_path / "ray", Progress(verbose=False)
    ).run()
    # 6 one-candidate chunks on 2 single-GPU actors: the rest queued, all completed
    assert ex.actors_started == 2 and ex.restarts == 0
    assert sorted(ex.placements) == list(range(6))
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")}
    assert set(ex.placements.values()) == gpu_nodes and len(gpu_nodes) == 2
    local_cfg = cfg.model_copy(
        update={"executor": cfg.executor.model_copy(update={"kind": "local"})}
    )
    local = Pipeline(
        local_cfg,
        BlobStream(num_tasks=2),
        LocalExecutor(),
        tmp_path / "local",
        Progress(verbose=False),
    ).run()
    assert [t["winner"] for t in remote["tasks"]] == [t["winner"] for t in local["tasks"]]
    assert (tmp_path / "ray" / MODEL_FILE).read_bytes() == (
        tmp_path / "local" / MODEL_FILE
    ).read_bytes()
