"""Population networks: K candidate sub-networks trained in one forward/backward pass.

Every trainable tensor carries a leading population dimension ``K``. Prunable layers hold
``theta`` (``[K, *shape]``) and a ``mask`` buffer of the same shape; the effective weight is
``theta * mask``, so masked-out entries get zero gradient. Task parameters (the per-task head,
later normalisation state) are per candidate too. Candidates share the input batch and nothing
else: every reduction (loss, gradient, optimiser state) stays per candidate, which is what
makes a population equal K separate trainings (DESIGN.md §7).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from qpacknet.layerspec import LayerSpec
from qpacknet.seeding import generator


class PopulationNet(nn.Module):
    """Base class: prunable ``theta``/``mask`` pairs plus per-task parameters, all ``[K, …]``."""

    def __init__(self, k: int) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"population size must be >= 1, got {k}")
        self.k = k
        self.thetas = nn.ParameterDict()
        self.task_params = nn.ParameterDict()
        self._mask_names: dict[str, str] = {}
        self._shared_keys: set[str] = set()

    def _add_prunable(self, name: str, shape: tuple[int, ...]) -> None:
        key = name.replace(".", "_")
        self.thetas[key] = nn.Parameter(torch.zeros(self.k, *shape))
        self.register_buffer(f"mask_{key}", torch.ones(self.k, *shape))
        self._mask_names[name] = key

    def _add_task_param(self, name: str, shape: tuple[int, ...]) -> None:
        self.task_params[name.replace(".", "_")] = nn.Parameter(torch.zeros(self.k, *shape))

    @property
    @abstractmethod
    def layer_specs(self) -> list[LayerSpec]:
        """The prunable layers in forward order (their names key the store)."""

    @property
    @abstractmethod
    def task_param_names(self) -> list[str]:
        """Names of the per-task tensors (head, normalisation) the store keeps as float32."""

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """JSON description from which :func:`qpacknet.nets.build_from_meta` rebuilds the net."""

    @abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[K, B, F]``: exactly what the task's head reads. Task
        recognition (:mod:`qpacknet.recognise`) keeps per-task statistics of them."""

    @abstractmethod
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The task's linear head on :meth:`features`: logits ``[K, B, classes]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[K, B, classes]``: the head on the penultimate features."""
        return self.head(self.features(x))

    def theta(self, name: str) -> nn.Parameter:
        return self.thetas[self._mask_names[name]]

    def mask(self, name: str) -> torch.Tensor:
        return getattr(self, f"mask_{self._mask_names[name]}")

    def task_param(self, name: str) -> nn.Parameter:
        return self.task_params[name.replace(".", "_")]

    def weight(self, name: str) -> torch.Tensor:
        """The effective weight: own ``theta * mask``, plus, with weight sharing, the earlier
        tasks' frozen values where the candidate shares (no gradient reaches those)."""
        key = self._mask_names[name]
        if key in self._shared_keys:
            return self.theta(name) * self.mask(name) + getattr(self, f"sharedw_{key}")
        return self.theta(name) * self.mask(name)

    @torch.no_grad()
    def set_sharing(
        self, frozen: dict[str, torch.Tensor], shared: list[dict[str, torch.Tensor]]
    ) -> None:
        """Weight sharing (DESIGN.md §2): candidate k also reads ``frozen`` (the earlier tasks'
        decoded values, :meth:`PackedStore.first_values`) where ``shared[k]`` is True. Both are
        buffers, not parameters, so training cannot change them: shared weights are read-only."""
        if len(shared) != self.k:
            raise ValueError(f"need {self.k} shared masks, got {len(shared)}")
        device = next(self.parameters()).device
        for spec in self.layer_specs:
            key = self._mask_names[spec.name]
            stack = torch.stack([m[spec.name].to(torch.bool) for m in shared])
            self.register_buffer(
                f"frozen_{key}", frozen[spec.name].to(device, torch.float32), persistent=False
            )
            self.register_buffer(f"share_{key}", stack.to(device), persistent=False)
            # frozen * share is constant: computed once, added each step
            self.register_buffer(
                f"sharedw_{key}",
                getattr(self, f"frozen_{key}") * getattr(self, f"share_{key}"),
                persistent=False,
            )
            self._shared_keys.add(key)

    def shared_mask(self, i: int) -> dict[str, torch.Tensor] | None:
        """Slot ``i``'s shared-weight masks (bool, copies), or None without weight sharing."""
        if not self._shared_keys:
            return None
        return {
            s.name: getattr(self, f"share_{self._mask_names[s.name]}")[i].clone()
            for s in self.layer_specs
        }

    def frozen_values(self) -> dict[str, torch.Tensor] | None:
        """The shared weights' frozen values per layer, or None without weight sharing."""
        if not self._shared_keys:
            return None
        return {
            s.name: getattr(self, f"frozen_{self._mask_names[s.name]}") for s in self.layer_specs
        }

    @torch.no_grad()
    def set_masks(self, masks: list[dict[str, torch.Tensor]]) -> None:
        """Set candidate k's mask for every prunable layer (``len(masks) == K``)."""
        if len(masks) != self.k:
            raise ValueError(f"need {self.k} masks, got {len(masks)}")
        for spec in self.layer_specs:
            buf = self.mask(spec.name)
            for i, m in enumerate(masks):
                buf[i].copy_(m[spec.name].to(buf.dtype))

    @torch.no_grad()
    def init_candidates(self, seed: int, task: int, candidates: list[int]) -> None:
        """Fresh Xavier-uniform weights (paper §4.1) for each candidate, each drawn from its own
        generator keyed by (seed, task, candidate index), so a candidate's initial weights do not
        depend on which population or executor it is trained in."""
        if len(candidates) != self.k:
            raise ValueError(f"need {self.k} candidate indices, got {len(candidates)}")
        for i, c in enumerate(candidates):
            g = generator(seed, "init", task, c)
            for spec in self.layer_specs:
                t = torch.empty(spec.shape)
                nn.init.xavier_uniform_(t, generator=g)
                self.theta(spec.name)[i].copy_(t)
            for name in self.task_param_names:
                p = self.task_param(name)[i]
                if p.dim() >= 2:
                    t = torch.empty(p.shape)
                    nn.init.xavier_uniform_(t, generator=g)
                    p.copy_(t)
                else:
                    p.zero_()

    @torch.no_grad()
    def load_candidate(
        self,
        i: int,
        weights: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        task_state: dict[str, torch.Tensor],
    ) -> None:
        """Write one sub-network (dense weights, masks, task tensors) into slot ``i``."""
        for spec in self.layer_specs:
            self.theta(spec.name)[i].copy_(weights[spec.name])
            self.mask(spec.name)[i].copy_(masks[spec.name].to(self.mask(spec.name).dtype))
        for name in self.task_param_names:
            self.task_param(name)[i].copy_(task_state[name])

    @torch.no_grad()
    def candidate(
        self, i: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Copies of slot ``i``: (masked weights, bool masks, task tensors)."""
        weights = {s.name: self.weight(s.name)[i].detach().clone() for s in self.layer_specs}
        masks = {s.name: self.mask(s.name)[i].bool().clone() for s in self.layer_specs}
        state = {n: self.task_param(n)[i].detach().clone() for n in self.task_param_names}
        return weights, masks, state

    def num_prunable(self) -> int:
        return sum(s.numel for s in self.layer_specs)


class PopulationMLP(PopulationNet):
    """The p-MNIST backbone (DESIGN.md §3): bias-free linear layers with ReLU, one linear
    head with bias per task. Forward maps ``[B, D]`` to logits ``[K, B, C]``.

    The first layer multiplies the shared input once by all candidates' weights as one
    ``[B, D] x [D, K*H]`` product (the "wide" layout that won on CPU, DESIGN.md §7); the rest
    are batched products over K.
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, k: int = 1) -> None:
        super().__init__(k)
        self.in_features = in_features
        self.hidden = list(hidden)
        self.num_classes = num_classes
        sizes = [in_features, *hidden]
        self._specs = [LayerSpec(f"fc{i}", (sizes[i + 1], sizes[i])) for i in range(len(hidden))]
        for spec in self._specs:
            self._add_prunable(spec.name, spec.shape)
        self._add_task_param("head.weight", (num_classes, hidden[-1]))
        self._add_task_param("head.bias", (num_classes,))

    @property
    def layer_specs(self) -> list[LayerSpec]:
        return self._specs

    @property
    def task_param_names(self) -> list[str]:
        return ["head.weight", "head.bias"]

    def describe(self) -> dict[str, object]:
        return {
            "backbone": "mlp",
            "in_features": self.in_features,
            "hidden": self.hidden,
            "num_classes": self.num_classes,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = x.reshape(b, -1)
        first, *rest = self._specs
        w = self.weight(first.name)
        h = x @ w.reshape(self.k * first.shape[0], first.shape[1]).t()
        h = torch.relu(h.reshape(b, self.k, first.shape[0]).transpose(0, 1))
        for spec in rest:
            h = torch.relu(torch.bmm(h, self.weight(spec.name).transpose(1, 2)))
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The task's linear head (with bias) on ``[K, B, F]``: logits ``[K, B, classes]``."""
        hw = self.task_param("head.weight")
        hb = self.task_param("head.bias")
        return torch.baddbmm(hb.unsqueeze(1), h, hw.transpose(1, 2))
