"""How many GPUs a candidate actor asks Ray for (``executor.gpus_per_worker``).

With ``auto`` an actor asks for one GPU when the cluster has one *or its autoscaler can start a
node with one*: a cluster that starts without GPU workers (``min_workers: 0``) only grows GPU
nodes for actors that request GPUs, so counting just the GPUs that are up would run the whole
search on the head's CPUs. Imported by module path (``qpacknet.cluster`` imports the executor).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray

from qpacknet.devices import DeviceError

__all__ = [
    "BOOTSTRAP_CONFIG",
    "auto_gpus",
    "gpus_per_worker",
    "scalable_gpu_total",
    "scalable_gpus",
]

log = logging.getLogger(__name__)

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
"""Where ``ray up`` leaves the launcher config on the head node (its autoscaler reads it)."""

GCS_TIMEOUT_S = 2.0

# Ray's internal KV entry for the autoscaler's ClusterConfig (ray._raylet's
# GCS_AUTOSCALER_STATE_NAMESPACE / GCS_AUTOSCALER_CLUSTER_CONFIG_KEY in Ray 2.60).
_KV_NAMESPACE = b"__autoscaler"
_KV_KEY = b"__autoscaler_cluster_config"


def auto_gpus(cluster_gpus: float, scalable_gpus: float, device_setting: str) -> float:
    """GPUs per actor for ``gpus_per_worker: auto``: none when the user asked for the CPU,
    one when a GPU is up or can be added, else none; ``device=cuda`` with no GPU anywhere is an
    error now rather than actors that wait forever for a GPU or fail on the CPU."""
    if device_setting == "cpu":
        return 0.0
    if cluster_gpus >= 1 or scalable_gpus >= 1:
        return 1.0
    if device_setting == "cuda":
        raise DeviceError(
            "device=cuda, but there is no GPU in the Ray cluster "
            f"(ray.cluster_resources() has GPU={cluster_gpus:g}) nor in any node type its "
            "autoscaler may start. Add GPU nodes (or a GPU node type), or set device=auto or "
            "device=cpu."
        )
    return 0.0


def _gpus_in_gcs_cluster_config() -> float:
    """Largest ``GPU`` of a node group the autoscaler may start (``max_count != 0``), from the
    ``ClusterConfig`` that an autoscaler reports to the GCS (``GcsClient.report_cluster_config``;
    the data behind ``ray._private.state.state.get_cluster_config()``), read with a timeout."""
    from ray._private.worker import global_worker
    from ray.core.generated import autoscaler_pb2

    raw = global_worker.gcs_client.internal_kv_get(_KV_KEY, _KV_NAMESPACE, timeout=GCS_TIMEOUT_S)
    if not raw:
        return 0.0
    config = autoscaler_pb2.ClusterConfig.FromString(raw)
    return float(
        max(
            (g.resources.get("GPU", 0) for g in config.node_group_configs if g.max_count != 0),
            default=0,
        )
    )


def _gpus_in_bootstrap_config(path: Path) -> float:
    """Largest ``resources.GPU`` of a node type in the launcher config that ``ray up`` copies to
    the head node; types with ``max_workers: 0`` (or all workers, with a cluster-wide
    ``max_workers: 0``) cannot be started and do not count, the head type always does."""
    path = path.expanduser()
    if not path.is_file():
        return 0.0
    import yaml

    config: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    head = config.get("head_node_type")
    cluster_max = config.get("max_workers")
    best = 0.0
    for name, spec in (config.get("available_node_types") or {}).items():
        spec = spec or {}
        startable = name == head or (cluster_max != 0 and spec.get("max_workers", cluster_max) != 0)
        if startable:
            best = max(best, float((spec.get("resources") or {}).get("GPU", 0)))
    return best


def scalable_gpus() -> float:
    """The largest GPU count of any node type the cluster's autoscaler may start; 0.0 without
    an autoscaler (a plain ``ray.init``), without Ray, or when nothing can be read.

    Ray 2.60 has no public API for the autoscaler's node types, so this reads, in order:

    1. the ``ClusterConfig`` protobuf in the GCS internal KV (namespace ``__autoscaler``, key
       ``__autoscaler_cluster_config``: ``node_group_configs[*].resources``/``max_count``),
       which autoscalers that call ``report_cluster_config`` publish and Ray Data/Train read
       via ``ray._private.state.state.get_cluster_config()``; one GCS call with a 2 s timeout;
    2. ``~/ray_bootstrap_config.yaml``, the ``ray up`` launcher config that the head node's
       autoscaler runs from (``available_node_types[*].resources.GPU``); present only on the
       head of a launcher cluster, which is where ``ray job submit`` runs the driver.

    KubeRay's autoscaler in Ray 2.60 publishes neither: pin ``gpus_per_worker`` there or keep
    one GPU worker up (the manifests in ``cluster/kuberay`` do).
    """
    if not ray.is_initialized():
        return 0.0
    found = 0.0
    try:
        found = _gpus_in_gcs_cluster_config()
    except Exception as exc:  # an odd GCS or Ray Client mode: not a reason to fail
        log.warning(
            "could not read the autoscaler's node types from the GCS (%s: %s); GPU nodes it "
            "could start are not counted (set executor.gpus_per_worker to be sure)",
            type(exc).__name__,
            exc,
        )
    if found < 1:
        try:
            found = max(found, _gpus_in_bootstrap_config(BOOTSTRAP_CONFIG))
        except Exception as exc:  # unreadable YAML: ignore, as Ray's own readers do
            log.warning(
                "cannot read the launcher config %s (%s); GPU node types in it are not counted",
                BOOTSTRAP_CONFIG,
                exc,
            )
    return found


def _total_in_gcs_cluster_config() -> float:
    """GPUs all node groups of the GCS ``ClusterConfig`` may add up to (``max_count`` × GPU,
    capped by ``max_resources``; -1 means unbounded), as Ray's own
    ``_calculate_max_resource_from_cluster_config`` counts them."""
    from ray._private.worker import global_worker
    from ray.core.generated import autoscaler_pb2

    raw = global_worker.gcs_client.internal_kv_get(_KV_KEY, _KV_NAMESPACE, timeout=GCS_TIMEOUT_S)
    if not raw:
        return 0.0
    config = autoscaler_pb2.ClusterConfig.FromString(raw)
    total = 0.0
    for g in config.node_group_configs:
        gpus, count = g.resources.get("GPU", 0), g.max_count
        if gpus == 0 or count == 0:
            continue
        if gpus < 0 or count < 0:
            return float("inf")
        total += count * gpus
    return min(total, float(config.max_resources.get("GPU", total)))


def _total_in_bootstrap_config(path: Path) -> float:
    """GPUs the launcher config's node types may add up to (``max_workers`` × GPU per type,
    the head's own GPUs included)."""
    path = path.expanduser()
    if not path.is_file():
        return 0.0
    import yaml

    config: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    head = config.get("head_node_type")
    cluster_max = int(config.get("max_workers") or 0)
    total = 0.0
    for name, spec in (config.get("available_node_types") or {}).items():
        spec = spec or {}
        gpus = float((spec.get("resources") or {}).get("GPU", 0))
        count = 1 if name == head else int(spec.get("max_workers", cluster_max) or 0)
        total += count * gpus
    return total


def scalable_gpu_total() -> float:
    """How many GPUs the cluster may have once its autoscaler has added every node it can (0.0
    without an autoscaler): how many one-GPU actors a run can plan while no GPU node is up yet,
    so that the autoscaler starts that many GPU nodes and no actor waits for one that can never
    come. Reads the same two sources as :func:`scalable_gpus`."""
    if not ray.is_initialized():
        return 0.0
    try:
        total = _total_in_gcs_cluster_config()
    except Exception as exc:
        log.warning("could not read the autoscaler's node types from the GCS (%s)", exc)
        total = 0.0
    if total < 1:
        try:
            total = max(total, _total_in_bootstrap_config(BOOTSTRAP_CONFIG))
        except Exception as exc:
            log.warning("cannot read the launcher config %s (%s)", BOOTSTRAP_CONFIG, exc)
    return total


def gpus_per_worker(setting: float | str, device_setting: str) -> float:
    """GPUs each candidate actor requests: ``setting`` as configured, or with ``"auto"``
    :func:`auto_gpus` over ``ray.cluster_resources()`` and :func:`scalable_gpus` (asked only
    when no GPU is up, so a GPU cluster pays no extra call)."""
    if setting != "auto":
        return float(setting)
    if device_setting == "cpu":
        return 0.0
    cluster = float(ray.cluster_resources().get("GPU", 0))
    scalable = 0.0 if cluster >= 1 else scalable_gpus()
    return auto_gpus(cluster, scalable, device_setting)
