"""Inference from the packed store: ``predict(task, x)`` (DESIGN.md §2, Inference).

Task t's weights are decoded from the 32-bit words (the store caches the dense tensors per
task); the backbone runs with task t's head. Evaluation uses a fixed chunking and no batch
statistics, so a task's logits on a given input never depend on what else is in the batch or
on what was learned after it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qpacknet.nets import PopulationNet, build_from_meta
from qpacknet.scenarios.base import Split
from qpacknet.store import PackedStore, load_store
from qpacknet.train import evaluate, logits_of, outputs_of


class PackedModel:
    """A read-only view of a :class:`PackedStore` that can run any committed task."""

    def __init__(
        self, store: PackedStore, device: str | torch.device = "cpu", batch_size: int = 8192
    ) -> None:
        self.store = store
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._nets: dict[int, PopulationNet] = {}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> PackedModel:
        return cls(load_store(path), device)

    @property
    def num_tasks(self) -> int:
        return self.store.num_tasks

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input as the scenario prepares it (without the batch dimension)."""
        meta = self.store.meta
        shape = meta.get("input_shape") or (meta["in_features"],)
        return tuple(int(d) for d in shape)  # type: ignore[union-attr]

    def refresh(self) -> None:
        """Forget decoded networks (after a commit, so old tasks are re-decoded from words)."""
        self._nets.clear()
        self.store.clear_cache()

    def net(self, task: int) -> PopulationNet:
        if not 0 <= task < self.store.num_tasks:
            raise IndexError(f"task {task} is not in the model (it has {self.num_tasks} tasks)")
        if task not in self._nets:
            net = build_from_meta(self.store.meta, k=1)
            net.load_candidate(
                0, self.store.decode(task), self.store.uses(task), self.store.task_state(task)
            )
            self._nets[task] = net.to(self.device).eval()
        return self._nets[task]

    @torch.no_grad()
    def logits(self, task: int, x: torch.Tensor) -> torch.Tensor:
        """Task ``task``'s logits ``[N, C]`` for inputs ``x`` (float, as the network takes
        them: images standardised with the task's ``standardisation``)."""
        if x.dtype == torch.uint8:
            raise TypeError(
                "uint8 images: standardise them first, or pass a Split with its mean and std "
                "to split_logits()"
            )
        return logits_of(self.net(task), x.to(self.device), self.batch_size)[0]

    @torch.no_grad()
    def split_logits(self, task: int, split: Split) -> torch.Tensor:
        """Task ``task``'s logits ``[N, C]`` on ``split``'s inputs (compact uint8 splits are
        standardised chunk by chunk, with the same result as :meth:`logits` on floats)."""
        return logits_of(self.net(task), split.to(self.device), self.batch_size)[0]

    @torch.no_grad()
    def outputs(self, task: int, x: torch.Tensor | Split) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``task``'s logits ``[N, C]`` and penultimate features ``[N, F]`` (what its head
        reads; task recognition, :mod:`qpacknet.recognise`) on network inputs or a split."""
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            raise TypeError("uint8 images: standardise them first, or pass a Split")
        logits, features = outputs_of(self.net(task), x.to(self.device), self.batch_size)
        return logits[0], features[0]

    @torch.no_grad()
    def predict(self, task: int, x: torch.Tensor) -> torch.Tensor:
        """Predicted class per input (task-incremental: the task id is given)."""
        return self.logits(task, x).argmax(-1)

    def accuracy(self, task: int, split: Split) -> float:
        return evaluate(self.net(task), split.to(self.device), self.batch_size)[0]
