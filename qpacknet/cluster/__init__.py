"""The Ray executor: candidate actors on (GPU) workers behind the executor interface.

This package imports Ray; the rest of qpacknet does not, so the core stays usable where Ray is
not installed (e.g. a bare GPU box).
"""

from qpacknet.cluster.ray_executor import RayExecutor

__all__ = ["RayExecutor"]
