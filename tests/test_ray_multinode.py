"""Scaling across nodes on a simulated multi-node cluster (``ray.cluster_utils.Cluster``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray import cloudpickle
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
    ex = RayExecutor(cfg)
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


def _has_mlflow(_actor: object) -> bool:
    return "mlflow" in sys.modules


def test_default_population_uses_both_nodes_and_driver_logs_every_candidate_run(
    tmp_path: Path, cluster: Cluster
) -> None:
    """``candidates_per_worker`` unset: one chunk per GPU actor, both nodes busy at once; the
    default local sqlite store (in the driver's out dir, which no actor could reach on a real
    cluster) holds every candidate run, logged by the driver from the streamed events."""
    from mlflow import MlflowClient

    from qpacknet.tracking.tracker import MlflowTracker, default_uri

    over = {"search": {"population": 6, "epochs": 1}, "train": {"epochs": 2}}
    cfg = tiny_config(executor={"workers": "auto", "gpus_per_worker": 1}, **over)
    out = tmp_path / "ray"
    tracker = MlflowTracker(cfg.tracking, out)
    ex = RayExecutor(cfg)
    pipe = Pipeline(
        cfg, BlobStream(num_tasks=2), ex, out, Progress(verbose=False), observers=[tracker]
    )
    ex.close = lambda: None  # type: ignore[method-assign]  # keep the actors for the check
    res = pipe.run()
    assert res["chunks"] == [[0, 1, 2], [3, 4, 5]]
    # the runs were written by the driver: no actor ever imported MLflow
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import tests
    imported = ray.get([a.__ray_call__.remote(_has_mlflow) for a in ex._actors])
    assert imported == [False, False]
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")}
    assert set(ex.placements.values()) == gpu_nodes and len(gpu_nodes) == 2
    assert {w["node_id"] for w in res["workers"].values()} == gpu_nodes
    for task in res["tasks"]:
        assert len(set(task["ran_on"]["search"])) == 2
        assert {c["worker"] for c in task["candidates"]} == set(task["ran_on"]["search"])

    client = MlflowClient(tracking_uri=default_uri(out))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`qpacknet.candidate` != ''")
    assert len(runs) == 2 * 6
    # tags number tasks from 1, as the runs' names do
    by_key = {
        (str(int(r.data.tags["qpacknet.task"]) - 1), r.data.tags["qpacknet.candidate"]): r
        for r in runs
    }
    assert set(by_key) == {(str(t), str(c)) for t in range(2) for c in range(6)}
    RayExecutor.close(ex)
    for (t, c), run in by_key.items():
        node = run.data.tags["qpacknet.worker.node_id"]
        assert (
            node == res["workers"][res["tasks"][int(t)]["candidates"][int(c)]["worker"]]["node_id"]
        )
        acc = res["tasks"][int(t)]["candidates"][int(c)]["acc"]
        assert run.data.metrics["val_acc"] == round(acc, 4)
        assert run.info.end_time >= run.info.start_time
    for t, task in enumerate(res["tasks"]):
        winner = by_key[(str(t), str(task["winner"]))]
        assert winner.data.tags.get("qpacknet.winner") == "true"
        history = client.get_metric_history(winner.info.run_id, "train_val_acc")
        assert [m.step for m in history] == [1, 2]


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_actor_given_a_gpu_it_cannot_see_fails_loudly(
    tmp_path: Path, cluster: Cluster, device: str
) -> None:
    """The simulated nodes advertise a GPU that no CUDA backs: an actor that Ray gave a GPU
    must stop the run naming its node, not train on the CPU unannounced. With ``device: cuda``
    the CPU-only driver is not what is checked: the actors are."""
    from qpacknet.devices import DeviceError

    cfg = tiny_config(device=device, executor={"workers": 1, "gpus_per_worker": "auto"})
    ex = RayExecutor(cfg)
    try:
        with pytest.raises(DeviceError, match=r"Ray actor pid \d+ on node [0-9a-f]{8}.*GPU"):
            Pipeline(
                cfg, BlobStream(num_tasks=1), ex, tmp_path / "gpu", Progress(verbose=False)
            ).run()
    finally:
        ex.close()
