"""Memory capacity of a packed model, the paper's eq. 10 (DESIGN.md §2, "Metrics").

For task ``t`` with component width ``b_t`` and density ``d_tl = 1 - Υ_l`` (owned weights over
``|θ_l|``) in each of the ``|L|`` prunable layers::

    CAP_t = Σ_l d_tl·|θ_l|·b_t  +  |L|·2^b_t·(32 + b_t)  +  Σ_l d_tl·|θ_l|

i.e. the owned weights at ``b_t`` bits, the codebooks (a float32 centroid plus its code per
entry), and the mask term, which eq. 10 writes as ``(1-Υ_l)|M_l|`` with ``|M_l| = |θ_l|``.
``capacity_pct`` is ``Σ_t CAP_t`` as a percentage of the dense float32 model (``32·Σ_l|θ_l|``
bits), so that it compares with the paper's Table 2. The per-task heads and normalisation state
are not in eq. 10; they are reported beside it as ``heads_pct`` (32 bits per element).
All bit counts are exact integers: ``d_tl·|θ_l|`` is the task's owned-weight count.

Per-layer bit widths (issue 13, the paper's "hybrid quantisation"): with a width ``b_tl`` per
layer, eq. 10 is summed layer by layer with that layer's width,
``CAP_t = Σ_l [d_tl·|θ_l|·b_tl + 2^b_tl·(32 + b_tl) + d_tl·|θ_l|]``, which equals the line above
when every ``b_tl = b_t``.

Weight sharing (TinySubNets option): a task's shared weights are read from earlier tasks'
components, so they add nothing to ``CAP_t``; they are reported beside it, per task
(``shared``, a count, and ``shared_pct`` of the prunable weights) and for the model
(``shared_pct``, the sum over tasks), so the weights a task reads for free stay visible.

Several networks (``capacity.when_full: grow``): each network is one backbone's words, so
``capacity_pct`` stays a percentage of *one* dense float32 backbone and may exceed 100 % once
the model has grown; ``networks`` gives each network's own eq. 10 sum (of its own dense size)
and its tasks. A single-network model has one entry equal to the total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qpacknet.store.packed import WORD_BITS, PackedStore


@dataclass(frozen=True)
class TaskCapacity:
    """One task's share of eq. 10."""

    task: int
    bit_width: int
    bits: int
    pct: float
    density: dict[str, float]
    shared: int = 0
    shared_pct: float = 0.0
    network: int = 0
    bit_widths: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NetworkCapacity:
    """Eq. 10 summed over one network's tasks, in % of that network's dense size."""

    network: int
    tasks: list[int]
    capacity_pct: float


@dataclass(frozen=True)
class CapacityReport:
    """Eq. 10 summed over tasks, plus the heads/normalisation state reported beside it."""

    capacity_pct: float
    heads_pct: float
    per_task: list[TaskCapacity]
    dense_bits: int
    shared_pct: float = 0.0
    networks: list[NetworkCapacity] = field(default_factory=list)


def task_bits(owned: Sequence[int], bit_width: int | Sequence[int]) -> int:
    """``CAP_t`` in bits from the task's owned-weight count per prunable layer (eq. 10), at one
    width for every layer or a width per layer (in the order of ``owned``)."""
    widths = [bit_width] * len(owned) if isinstance(bit_width, int) else list(bit_width)
    return sum(n * b + (1 << b) * (WORD_BITS + b) + n for n, b in zip(owned, widths, strict=True))


def capacity(store: PackedStore) -> CapacityReport:
    """Eq. 10 capacity of every committed task of ``store`` and the total, in % of dense."""
    n_weights = sum(spec.numel for spec in store.layers)
    dense_bits = WORD_BITS * n_weights
    per_task = []
    head_elements = 0
    for t in range(store.num_tasks):
        widths = store.bit_widths(t)
        masks = store.mask(t)
        owned = [int(masks[spec.name].sum()) for spec in store.layers]
        bits = task_bits(owned, [widths[spec.name] for spec in store.layers])
        shared = sum(int(m.sum()) for m in store.shared(t).values())
        per_task.append(
            TaskCapacity(
                task=t,
                bit_width=store.bit_width(t),
                bits=bits,
                pct=100.0 * bits / dense_bits,
                density={s.name: n / s.numel for s, n in zip(store.layers, owned, strict=True)},
                shared=shared,
                shared_pct=100.0 * shared / n_weights,
                network=store.network_of(t),
                bit_widths=widths,
            )
        )
        head_elements += sum(v.numel() for v in store.task_state(t).values())
    total_bits = sum(entry.bits for entry in per_task)
    return CapacityReport(
        capacity_pct=100.0 * total_bits / dense_bits,
        heads_pct=100.0 * WORD_BITS * head_elements / dense_bits,
        per_task=per_task,
        dense_bits=dense_bits,
        shared_pct=sum(entry.shared_pct for entry in per_task),
        networks=[
            NetworkCapacity(
                n,
                store.tasks_of(n),
                100.0 * sum(per_task[t].bits for t in store.tasks_of(n)) / dense_bits,
            )
            for n in range(store.num_networks)
        ],
    )
