"""Shared fixtures: a tiny synthetic task stream and small configs (all CPU, seconds)."""

from __future__ import annotations

import os

import pytest
import torch

from qpacknet.config import RunConfig, validate
from qpacknet.scenarios.base import Split, TaskData, TaskStream


class BlobStream(TaskStream):
    """Gaussian class clusters in ``dim`` features; each task permutes the features and
    relabels the classes, so tasks genuinely differ (and would interfere if not isolated)."""

    name = "blobs"

    def __init__(
        self, num_tasks: int = 3, dim: int = 12, classes: int = 4, n: int = 160, seed: int = 0
    ) -> None:
        self.input_shape = (dim,)
        self.num_classes = classes
        self._n = num_tasks
        g = torch.Generator().manual_seed(seed)
        self._centers = torch.randn(classes, dim, generator=g) * 2.0
        self._tasks = [self._make(t, n, seed) for t in range(num_tasks)]

    @property
    def num_tasks(self) -> int:
        return self._n

    def _make(self, t: int, n: int, seed: int) -> TaskData:
        g = torch.Generator().manual_seed(seed * 1000 + t + 1)
        perm = torch.randperm(self.input_shape[0], generator=g)
        relabel = torch.randperm(self.num_classes, generator=g)

        def split(m: int) -> Split:
            y = torch.randint(0, self.num_classes, (m,), generator=g)
            x = self._centers[y] + torch.randn(m, self.input_shape[0], generator=g)
            return Split(x[:, perm].contiguous(), relabel[y])

        return TaskData(t, f"blobs-{t}", self.num_classes, split(n), split(n // 4), split(n // 2))

    def task(self, index: int) -> TaskData:
        return self._tasks[index]


def tiny_config(**sections: dict) -> RunConfig:
    """A config small enough for unit tests; ``sections`` override top-level sections."""
    data: dict = {
        "seed": 3,
        "device": "cpu",
        "scenario": {"name": "digits", "num_tasks": 3},
        "net": {"hidden": [16, 16]},
        "search": {"population": 4, "epochs": 2},
        "train": {"epochs": 3, "batch_size": 16, "lr": 0.05, "lr_min": 0.001},
        "quantize": {"psi_min": 1, "b_max": 8, "delta": 2.0},
        # tiny tasks on random data learn little by design: the gate warns instead of stopping
        "capacity": {"quality_gate": "warn"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return validate(data)


# In-process runs use one torch thread: the suite's models are tiny, and two threads on a
# 2-core machine that also runs Ray actors and subprocesses make them several times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> object:
    """A test that runs the CLI with ``threads=N`` changes torch's global thread count; later
    tests (float32 comparisons among them) must run with the default again."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def blobs() -> BlobStream:
    return BlobStream()


# Ray declares a node dead after 5 missed health checks 3 s apart; with both test workers busy
# on a 2-core machine a simulated node's raylet can starve that long, so the tests' Ray
# instances (which inherit the environment) tolerate 30.
os.environ.setdefault("RAY_health_check_failure_threshold", "30")

# Files whose tests start Ray. With ``pytest -n 2`` (make test) they form one unit of work, run
# one after another on one worker, so two Ray instances never share this machine's cores (and
# one test's ``ray stop`` never hits another's cluster), while the other worker runs the rest.
# Done with a scheduler of our own: xdist's ``--dist loadgroup`` marks do nothing under pytest 9
# (xdist 3.8 renames the items through an attribute pytest 9 no longer reads).
RAY_FILES = {
    "test_devices.py",
    "test_events.py",
    "test_mlflow_server.py",
    "test_ray_connect.py",
    "test_ray_executor.py",
    "test_ray_job.py",
    "test_ray_multinode.py",
    "test_tune.py",
}


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsTogether(LoadScopeScheduling):
        """Every test its own unit of work, except the Ray files' tests: one unit."""

        def _split_scope(self, nodeid: str) -> str:
            return "ray" if nodeid.split("::", 1)[0].rsplit("/", 1)[-1] in RAY_FILES else nodeid

    return RayTestsTogether(config, log)
