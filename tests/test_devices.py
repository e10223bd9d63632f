"""Devices are explicit and recorded: one resolver, loud failures, reproducible CUDA settings,
and actors that ask for GPUs an autoscaler can add. CPU only: CUDA is simulated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from qpacknet.cluster import placement
from qpacknet.cluster.connect import keep_loopback
from qpacknet.devices import DeviceError, configure, describe, resolve_device
from qpacknet.errors import UsageError

WHERE = "Ray actor pid 4242 on node 5f3a9c (host gpu-worker-7)"


@pytest.fixture
def cuda_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def cuda_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def torch_flags(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure() changes process-wide torch state: put every flag back afterwards."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        mode,
        warn_only,
    ) = saved
    torch.use_deterministic_algorithms(mode, warn_only=warn_only)


# --- resolve_device -------------------------------------------------------------------------


def test_auto_follows_cuda(cuda_visible: None) -> None:
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda") == "cuda"


def test_auto_is_cpu_without_cuda(cuda_absent: None) -> None:
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"


def test_cpu_is_honoured_where_cuda_is_visible(cuda_visible: None) -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cpu", gpu_ids=["0"], where=WHERE) == "cpu"


def test_cuda_without_cuda_names_the_fix(cuda_absent: None) -> None:
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda", where=WHERE)
    assert isinstance(err.value, UsageError)  # CLI exit code 2
    assert WHERE in str(err.value)
    assert "device=auto" in str(err.value) and "device=cpu" in str(err.value)


@pytest.mark.parametrize("setting", ["auto", "cuda"])
def test_assigned_gpu_that_is_not_visible_fails_loudly(cuda_absent: None, setting: str) -> None:
    with pytest.raises(DeviceError) as err:
        resolve_device(setting, gpu_ids=["3", "5"], where=WHERE)
    msg = str(err.value)
    assert WHERE in msg
    assert "3, 5" in msg
    assert "CPU-only" in msg or "CUDA_VISIBLE_DEVICES" in msg
    assert "nvidia-smi" in msg


def test_assigned_gpu_that_is_visible_is_used(cuda_visible: None) -> None:
    assert resolve_device("auto", gpu_ids=["0"], where=WHERE) == "cuda"


def test_unknown_setting_is_rejected() -> None:
    with pytest.raises(DeviceError, match="device must be one of"):
        resolve_device("tpu")


# --- configure / describe -------------------------------------------------------------------


def test_configure_on_cpu_changes_nothing(torch_flags: None) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    torch.use_deterministic_algorithms(False)
    record = configure("cpu", allow_tf32=True)
    json.dumps(record)
    assert record["device"] == "cpu"
    assert record["tf32"] is False
    assert record["deterministic"] is False
    assert record["cublas_workspace_config"] is None
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is True
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_configure_on_cuda_is_reproducible(torch_flags: None, allow_tf32: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = not allow_tf32
    torch.backends.cudnn.allow_tf32 = not allow_tf32
    torch.backends.cudnn.benchmark = True
    record = configure("cuda", allow_tf32=allow_tf32)
    assert torch.backends.cuda.matmul.allow_tf32 is allow_tf32
    assert torch.backends.cudnn.allow_tf32 is allow_tf32
    assert torch.backends.cudnn.benchmark is False
    assert torch.backends.cudnn.deterministic is True
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert json.loads(json.dumps(record)) == {
        "device": "cuda",
        "tf32": allow_tf32,
        "deterministic": True,
        "deterministic_warn_only": False,
        "cublas_workspace_config": ":4096:8",
    }


def test_configure_keeps_a_users_cublas_setting(
    torch_flags: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert configure("cuda", allow_tf32=False)["cublas_workspace_config"] == ":16:8"


def test_describe_cpu_worker() -> None:
    info = describe("cpu", node_id="abc123")
    json.dumps(info)
    assert info["device"] == "cpu"
    assert info["device_name"]
    assert info["node_id"] == "abc123"
    assert info["pid"] == os.getpid()
    assert info["torch"] == torch.__version__
    assert info["threads"] == torch.get_num_threads()
    assert set(info) == {
        "device",
        "device_name",
        "host",
        "pid",
        "node_id",
        "torch",
        "cuda_version",
        "threads",
    }


def test_describe_cuda_worker_names_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A10G")
    info = describe("cuda")
    assert info["device"] == "cuda" and info["device_name"] == "NVIDIA A10G"


def test_devices_imports_neither_ray_nor_mlflow() -> None:
    code = (
        "import sys, qpacknet.devices; "
        "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# --- placement ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cluster", "scalable", "device", "want"),
    [
        (0, 0, "auto", 0.0),  # CPU-only cluster: CPU actors
        (2, 0, "auto", 1.0),  # GPUs are up
        (0, 1, "auto", 1.0),  # none up, but the autoscaler can add GPU nodes: ask for them
        (0, 4, "cuda", 1.0),
        (8, 1, "cuda", 1.0),
        (8, 1, "cpu", 0.0),  # the user asked for the CPU
        (0, 0, "cpu", 0.0),
        (0.5, 0, "auto", 0.0),  # a fractional GPU is no whole GPU per actor
    ],
)
def test_auto_gpus(cluster: float, scalable: float, device: str, want: float) -> None:
    assert placement.auto_gpus(cluster, scalable, device) == want


def test_auto_gpus_cuda_without_any_gpu() -> None:
    with pytest.raises(DeviceError, match="no GPU in the Ray cluster") as err:
        placement.auto_gpus(0, 0, "cuda")
    assert "autoscaler" in str(err.value)


def test_bootstrap_config_counts_startable_gpu_types(tmp_path: Path) -> None:
    cfg = tmp_path / "ray_bootstrap_config.yaml"
    cfg.write_text(
        "max_workers: 8\n"
        "head_node_type: head\n"
        "available_node_types:\n"
        "  head: {resources: {CPU: 0}}\n"
        "  gpu: {min_workers: 0, max_workers: 8, resources: {CPU: 4, GPU: 1}}\n"
        "  big: {max_workers: 0, resources: {GPU: 8}}\n"
    )
    assert placement._gpus_in_bootstrap_config(cfg) == 1.0
    assert placement._gpus_in_bootstrap_config(tmp_path / "missing.yaml") == 0.0
    # 8 one-GPU workers may be added: a run can plan 8 one-GPU actors before any is up
    assert placement._total_in_bootstrap_config(cfg) == 8.0
    assert placement._total_in_bootstrap_config(tmp_path / "missing.yaml") == 0.0


def test_scalable_gpus_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement.ray, "is_initialized", lambda: False)
    assert placement.scalable_gpus() == 0.0
    assert placement.scalable_gpu_total() == 0.0


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    keep_loopback()
    ray.init(
        num_cpus=1, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR"
    )
    yield
    ray.shutdown()


@pytest.fixture
def no_bootstrap_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(placement, "BOOTSTRAP_CONFIG", tmp_path / "absent.yaml")


def _report_cluster_config(gpus_per_node: int, max_count: int) -> None:
    """Publish a ClusterConfig to the GCS as an autoscaler does (0 nodes: an empty config)."""
    from ray._private.worker import global_worker
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    if gpus_per_node:
        group = config.node_group_configs.add(name="gpu", min_count=0, max_count=max_count)
        group.resources["CPU"] = 4
        group.resources["GPU"] = gpus_per_node
    global_worker.gcs_client.report_cluster_config(config.SerializeToString())


def test_plain_local_ray_has_no_autoscaler(local_ray: None, no_bootstrap_file: None) -> None:
    assert placement.scalable_gpus() == 0.0
    assert placement.gpus_per_worker("auto", "auto") == 0.0
    assert placement.gpus_per_worker(0.5, "auto") == 0.5
    with pytest.raises(DeviceError):
        placement.gpus_per_worker("auto", "cuda")


def test_autoscaler_gpu_node_type_makes_actors_ask_for_gpus(
    local_ray: None, no_bootstrap_file: None
) -> None:
    try:
        _report_cluster_config(gpus_per_node=4, max_count=0)  # a type it may never start
        assert placement.scalable_gpus() == 0.0
        assert placement.scalable_gpu_total() == 0.0
        _report_cluster_config(gpus_per_node=4, max_count=8)
        assert placement.scalable_gpus() == 4.0
        assert placement.scalable_gpu_total() == 32.0
        assert placement.gpus_per_worker("auto", "auto") == 1.0
        assert placement.gpus_per_worker("auto", "cpu") == 0.0
    finally:
        _report_cluster_config(gpus_per_node=0, max_count=0)
    assert placement.scalable_gpus() == 0.0
