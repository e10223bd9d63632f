"""Devices are resolved here, once, for the driver and for every Ray actor, and recorded.

One place decides "cpu" or "cuda" so that the driver and each worker apply the same rules, an
actor that Ray gave a GPU but that cannot see one fails loudly (a silent CPU fallback would
train 10-100x slower and still report success), and every result says where it was computed.
This module imports neither Ray nor MLflow: the core runs where they are not installed.
"""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

import torch

from qpacknet.errors import ConfigError

__all__ = ["CUBLAS_WORKSPACE", "DeviceError", "configure", "describe", "resolve_device"]

SETTINGS = ("auto", "cpu", "cuda")
CUBLAS_WORKSPACE = ":4096:8"
"""The cuBLAS workspace setting PyTorch's reproducibility notes name (``:16:8`` is the other)."""

_CPUINFO = "/proc/cpuinfo"


class DeviceError(ConfigError):
    """The configured device cannot be used where the code runs (exit code 2, like any bad
    setting): the message says which process, what it sees, and what to change."""


def _cuda_visible() -> bool:
    return bool(torch.cuda.is_available())


def _why_no_cuda() -> str:
    """What this process knows about its missing CUDA, so the message points at the cause."""
    build = torch.version.cuda
    return (
        f"torch {torch.__version__} "
        f"({'built for CUDA ' + build if build else 'a CPU-only build'}), "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}"
    )


def resolve_device(
    setting: str, *, gpu_ids: list[str] | None = None, where: str = "this process"
) -> str:
    """The torch device (``"cpu"`` or ``"cuda"``) for ``setting`` (the config's ``device``).

    ``"cpu"`` is honoured everywhere, even where CUDA is visible or Ray assigned a GPU (the user
    asked for it). ``"cuda"`` needs a visible CUDA device, else :class:`DeviceError`. ``"auto"``
    takes CUDA when visible, else the CPU. ``gpu_ids`` is what Ray assigned to an actor
    (``ray.get_gpu_ids()``, passed in so that this module needs no Ray): assigned GPUs that torch
    cannot see raise :class:`DeviceError` naming ``where`` instead of silently training on the
    CPU. The result is plain ``"cuda"``: in an actor Ray's ``CUDA_VISIBLE_DEVICES`` already
    maps its GPU to index 0, and the driver uses the current device.
    """
    if setting not in SETTINGS:
        raise DeviceError(f"device must be one of {', '.join(SETTINGS)}; got {setting!r}")
    if setting == "cpu":
        return "cpu"
    visible = _cuda_visible()
    if gpu_ids and not visible:
        raise DeviceError(
            f"{where}: Ray assigned GPU(s) {', '.join(map(str, gpu_ids))} to this worker, but "
            f"torch sees no CUDA device ({_why_no_cuda()}). Likely causes: a CPU-only torch "
            "build on that node (install the CUDA build the image pins), CUDA_VISIBLE_DEVICES "
            "hiding the GPU, or a missing or mismatched NVIDIA driver (run nvidia-smi there). "
            "To run on CPUs on purpose, set device=cpu or executor.gpus_per_worker=0."
        )
    if visible:
        return "cuda"
    if setting == "cuda":
        raise DeviceError(
            f"{where}: device=cuda was asked for, but torch sees no CUDA device "
            f"({_why_no_cuda()}). Use device=auto (GPU when there is one) or device=cpu, or "
            "check the NVIDIA driver (nvidia-smi), CUDA_VISIBLE_DEVICES and the torch build."
        )
    return "cpu"


def configure(device: str, allow_tf32: bool, *, warn_only: bool = False) -> dict[str, Any]:
    """Make this process's CUDA math reproducible and return a record of what was set.

    Why each switch: cuDNN allows TF32 in convolutions by default (cuBLAS matmuls do not), and
    ``cudnn.benchmark`` times kernels per shape and may pick a different one each run; the
    grouped convolutions of the population backbones then take other kernels and the same seed
    would not give the same winner. ``cudnn.deterministic`` and
    ``torch.use_deterministic_algorithms(True)`` make ops pick deterministic kernels and raise
    (or warn, with ``warn_only``) on ops that have none. ``CUBLAS_WORKSPACE_CONFIG`` is set
    (unless already set) to ``:4096:8``; cuBLAS reads it when it creates its handle, i.e. at the
    first GPU matmul, so this must run before any CUDA work in the process (recent PyTorch
    gives each handle/stream its own workspace and no longer insists on it; it is kept and
    recorded for older builds). ``allow_tf32`` trades exactness for speed on Ampere and newer.

    On the CPU nothing that affects results is changed (the flags above only steer CUDA
    kernels; the deterministic-algorithms mode would also make some CPU ops raise).
    """
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        tf32 = allow_tf32
    else:
        tf32 = False  # no TF32 on the CPU
    return {
        "device": "cuda" if device.startswith("cuda") else "cpu",
        "tf32": tf32,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open(_CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe(device: str, node_id: str | None = None) -> dict[str, Any]:
    """Where a worker (or the driver) computes: what results.json and MLflow record per worker,
    so that accuracies and timings can be traced to the hardware and build that made them."""
    cuda = device.startswith("cuda")
    return {
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name() if cuda else cpu_model(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "node_id": node_id,
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "threads": torch.get_num_threads(),
    }
