"""Convolutional populations: the shared machinery of the conv backbones (DESIGN.md §3, §7).

Layout. Candidate ``i``'s feature maps are channels ``i*C .. (i+1)*C`` of one ``[B, K*C, H, W]``
tensor. The first convolution multiplies the shared input once by all candidates' filters (one
ordinary convolution with ``K*C_out`` output channels, the conv analogue of the MLP's "wide"
first layer); every later convolution is a grouped convolution with ``groups=K``, so a candidate
only ever sees its own channels. Pooling, ReLU and the residual additions act per channel and so
per candidate; the flatten reorders ``[B, K*C, h, w]`` to ``[K, B, C*h*w]`` (the same feature
order as a single network), after which the fully connected layers are batched products over K.

Normalisation is per task (DESIGN.md §2, "Heads and normalisation"): every batch-norm layer's
affine parameters are task parameters and its running statistics are task buffers, both
``[K, C]``, and all of them are listed in :attr:`task_param_names`, so the store keeps them in
the task's ``task_state`` and :class:`~qpacknet.model.PackedModel` restores them with the task.
``F.batch_norm`` on the population layout reduces per channel, i.e. per candidate, so the
batch statistics and running-average updates are those of K separate networks (DESIGN.md §7:
every reduction stays per candidate). Evaluation uses the running statistics only, so a task's
logits never depend on how a batch is composed.

Dropout is per candidate: candidate ``i``'s mask at dropout site ``s`` of training step ``n`` is
drawn from a generator seeded by ``(key_i, n, s)``, in float32 and channels-last order, so the
masks depend on neither the dtype nor the memory layout (only on the device's generator).
:meth:`init_candidates` sets ``key_i`` from (seed, task, candidate index), so a candidate draws
the same masks alone or in any population, like its initial weights. A slot filled by
:meth:`load_candidate` keeps its slot key (derived from the slot index) and the step counter
restarts only at :meth:`init_candidates`, so TRAIN's fresh single network is deterministic on
every executor (with the same dropout stream in every task's TRAIN unless the worker keys the
winner's slot with :meth:`key_dropout`).

Speed: on CPU, K× larger activations fall out of cache, and a conv population is slower than
its candidates one after another: ``bench/population.py`` (16 candidates, 2-core CPU, see
``bench/results/population-cpu.json``) measured sequential/population time ratios of 0.49-0.81
over the four conv backbones, against 2.9 for the MLP. So on CPU set
``executor.candidates_per_worker=1`` (and ``net.channels_last=true``, faster for all but
ResNet-18 there); the population is meant for GPUs, where a step is launch-bound (DESIGN.md §7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qpacknet.layerspec import LayerSpec
from qpacknet.nets.population import PopulationNet
from qpacknet.seeding import derive_seed

NORM_MOMENTUM = 0.1
NORM_EPS = 1e-5


def scaled(width: float, channels: int) -> int:
    """``channels`` scaled by the config's width multiplier (at least 1)."""
    return max(1, round(width * channels))


def image_shape(input_shape: tuple[int, ...], backbone: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of one input; conv backbones need image-shaped inputs."""
    if len(input_shape) != 3:
        raise ValueError(
            f"backbone {backbone!r} needs image inputs shaped (channels, height, width), "
            f"got input_shape {tuple(input_shape)}"
        )
    c, h, w = (int(d) for d in input_shape)
    return c, h, w


class ConvPopulationNet(PopulationNet):
    """Base of the conv backbones: grouped-conv population layout, per-task batch norm and
    per-candidate dropout (module docstring). Forward maps ``[B, C, H, W]`` (or flat
    ``[B, C*H*W]``) to logits ``[K, B, classes]``.

    ``channels_last`` only changes the memory layout of the activations (a speed setting,
    DESIGN.md §7); :meth:`describe` records it so that the packed model evaluates a task with
    the same kernels as the QUANTIZE probe did (the pipeline compares the two accuracies
    exactly)."""

    backbone = ""

    def __init__(
        self,
        k: int,
        input_shape: tuple[int, ...],
        num_classes: int,
        backbone: str,
        channels_last: bool = False,
    ) -> None:
        super().__init__(k)
        self.input_shape = image_shape(input_shape, backbone)
        self.num_classes = num_classes
        self.channels_last = channels_last
        self._specs: list[LayerSpec] = []
        self._task_names: list[str] = []
        self._norms: list[str] = []
        self._dropout_keys = [derive_seed(0, "dropout-slot", i) for i in range(k)]
        self._dropout_step = 0

    # construction ---------------------------------------------------------------------------

    def _prunable(self, name: str, shape: tuple[int, ...]) -> None:
        spec = LayerSpec(name, shape)
        self._specs.append(spec)
        self._add_prunable(name, spec.shape)

    def _norm(self, name: str, channels: int) -> None:
        """A batch-norm layer whose affine parameters and running statistics are per task."""
        self._add_task_param(f"{name}.weight", (channels,))
        self._add_task_param(f"{name}.bias", (channels,))
        key = name.replace(".", "_")
        self.register_buffer(f"stat_{key}_running_mean", torch.zeros(self.k, channels))
        self.register_buffer(f"stat_{key}_running_var", torch.ones(self.k, channels))
        self._norms.append(name)
        stats = ("weight", "bias", "running_mean", "running_var")
        self._task_names += [f"{name}.{p}" for p in stats]

    def _head(self, features: int) -> None:
        self._add_task_param("head.weight", (self.num_classes, features))
        self._add_task_param("head.bias", (self.num_classes,))
        self._task_names = ["head.weight", "head.bias", *self._task_names]

    # PopulationNet interface ----------------------------------------------------------------

    @property
    def layer_specs(self) -> list[LayerSpec]:
        return self._specs

    @property
    def task_param_names(self) -> list[str]:
        return list(self._task_names)

    def task_param(self, name: str) -> torch.Tensor:
        """A per-task tensor: a parameter (head, norm affine) or a norm running statistic."""
        key = name.replace(".", "_")
        if key in self.task_params:
            return self.task_params[key]
        return getattr(self, f"stat_{key}")

    @torch.no_grad()
    def init_candidates(self, seed: int, task: int, candidates: list[int]) -> None:
        """Xavier weights and head as in :class:`PopulationNet`; batch norm starts as the
        identity (weight 1, bias 0, running mean 0, running variance 1); per-candidate dropout
        keys from (seed, task, candidate) and a fresh step counter."""
        super().init_candidates(seed, task, candidates)
        for name in self._norms:
            self.task_param(f"{name}.weight").fill_(1.0)
            self.task_param(f"{name}.running_var").fill_(1.0)
        self.key_dropout(seed, task, candidates)

    def key_dropout(self, seed: int, task: int, candidates: list[int]) -> None:
        """Key each slot's dropout masks by (seed, task, candidate) and restart the step count
        (also usable after :meth:`load_candidate`, e.g. for the winner in TRAIN)."""
        if len(candidates) != self.k:
            raise ValueError(f"need {self.k} candidate indices, got {len(candidates)}")
        self._dropout_keys = [derive_seed(seed, "dropout", task, c) for c in candidates]
        self._dropout_step = 0

    def describe(self) -> dict[str, object]:
        return {
            "backbone": self.backbone,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "channels_last": self.channels_last,
            **self.options(),
        }

    def options(self) -> dict[str, object]:
        """Constructor arguments besides k, input shape and classes (for :meth:`describe`)."""
        return {}

    # forward building blocks ----------------------------------------------------------------

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape the input to images and advance the dropout step (training only)."""
        if self.training:
            self._dropout_step += 1
        x = x.reshape(x.shape[0], *self.input_shape)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def conv(
        self, x: torch.Tensor, name: str, stride: int = 1, padding: int = 0, first: bool = False
    ) -> torch.Tensor:
        """Bias-free convolution of every candidate; ``first``: the input is shared."""
        w = self.weight(name)
        w = w.reshape(self.k * w.shape[1], *w.shape[2:])
        return F.conv2d(x, w, stride=stride, padding=padding, groups=1 if first else self.k)

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Per-task batch norm on ``[B, K*C, …]`` (running statistics updated in training)."""
        return F.batch_norm(
            x,
            self.task_param(f"{name}.running_mean").view(-1),
            self.task_param(f"{name}.running_var").view(-1),
            self.task_param(f"{name}.weight").view(-1),
            self.task_param(f"{name}.bias").view(-1),
            self.training,
            NORM_MOMENTUM,
            NORM_EPS,
        )

    def norm_fc(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """Per-task batch norm of fully connected activations ``[K, B, F]``, normalised as one
        ``[1, K*F, B]`` sequence (the same statistics over B; a view of :meth:`linear`'s
        output, so no copy)."""
        k, b, f = h.shape
        out = self.norm(h.transpose(1, 2).reshape(1, k * f, b), name)
        return out.reshape(k, f, b).transpose(1, 2)

    def dropout(self, x: torch.Tensor, p: float, site: int) -> torch.Tensor:
        """Inverted dropout with each candidate's own mask (module docstring); ``x`` is either
        the conv layout ``[B, K*C, H, W]`` or the fc layout ``[K, B, F]``."""
        if not self.training or p <= 0.0:
            return x
        conv = x.dim() == 4
        if conv:
            b, _, h, w = x.shape
            shape: tuple[int, ...] = (b, h, w, x.shape[1] // self.k)
        else:
            shape = tuple(x.shape[1:])
        keep = []
        for key in self._dropout_keys:
            g = torch.Generator(device=x.device)
            g.manual_seed(derive_seed(key, self._dropout_step, site))
            u = torch.rand(shape, generator=g, device=x.device, dtype=torch.float32)
            keep.append(u >= p)
        # conv masks are drawn channels-last, so the permuted mask is a view in either layout
        mask = torch.cat(keep, dim=3).permute(0, 3, 1, 2) if conv else torch.stack(keep)
        return x * mask.to(x.dtype).mul_(1.0 / (1.0 - p))

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, K*C, h, w]`` to ``[K, B, C*h*w]`` (each candidate's features in NCHW order)."""
        b = x.shape[0]
        return x.reshape(b, self.k, -1).transpose(0, 1)

    def linear(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """Bias-free fully connected layer of every candidate on ``[K, B, F]``. Computed as
        ``(W hᵀ)ᵀ`` so that the weight gradient comes out contiguous (``h Wᵀ`` gives a
        transposed one that autograd copies: 2-3× slower for AlexNet's fc layers on CPU)."""
        return torch.bmm(self.weight(name), h.transpose(1, 2)).transpose(1, 2)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The task's linear head (with bias) on ``[K, B, F]``: logits ``[K, B, classes]``."""
        hw = self.task_param("head.weight")
        hb = self.task_param("head.bias")
        return torch.baddbmm(hb.unsqueeze(1), h, hw.transpose(1, 2))
