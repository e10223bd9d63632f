"""The Ray executor: candidate actors on (GPU) workers behind the executor interface.

This package imports Ray; the rest of qpacknet does not, so the core stays usable where Ray is
not installed (e.g. a bare GPU box). ``RayExecutor`` is imported on first use so that
``qpacknet.cluster.connect`` can start Ray before torch is imported.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RayExecutor"]


def __getattr__(name: str) -> Any:
    if name == "RayExecutor":
        from qpacknet.cluster.ray_executor import RayExecutor

        return RayExecutor
    raise AttributeError(f"module 'qpacknet.cluster' has no attribute {name!r}")
