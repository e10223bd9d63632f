"""Task recognition: which committed task an input belongs to when no task id comes with it
(class-incremental use, DESIGN.md §2 Inference), for ``qpacknet predict`` and the served model.

A recogniser takes the model and the inputs and returns, per input, the task, the class under
that task's head and a confidence. Recognisers are chosen by name so that a stronger one whose
parameters live in the model file can later be selected the same way; today there is one,
``"entropy"``: every sub-network runs and the task whose prediction has the lowest entropy
wins, ties to the lower task index, the rule the run's reported task-inference figures use
(:class:`qpacknet.metrics.TaskInference`).

Confidence is the winning task's softmax probability of its predicted class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from qpacknet.metrics import prediction_entropy
from qpacknet.model import PackedModel

# Network inputs: one tensor for every task, or ``task -> tensor`` where each task prepares the
# same raw inputs its own way (per-task standardisation, qpacknet.preparation.task_inputs).
Inputs = torch.Tensor | Callable[[int], torch.Tensor]


class Recognition(NamedTuple):
    """Per input: the inferred task, its predicted class, and the confidence (all ``[N]``)."""

    task: torch.Tensor
    prediction: torch.Tensor
    confidence: torch.Tensor


def under_task(model: PackedModel, task: int, x: torch.Tensor) -> Recognition:
    """Class and confidence under a given task's head, as a :class:`Recognition`."""
    logits = model.logits(task, x).float().cpu()
    prediction = logits.argmax(-1)
    return Recognition(
        torch.full_like(prediction, task), prediction, _confidence(logits, prediction)
    )


def _confidence(logits: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, prediction.unsqueeze(-1)).squeeze(-1).exp()


def lowest_entropy(model: PackedModel, inputs: Callable[[int], torch.Tensor]) -> Recognition:
    """Every sub-network on its inputs; the task whose softmax has the lowest entropy."""
    entropies, predictions, confidences = [], [], []
    for t in range(model.num_tasks):
        logits = model.logits(t, inputs(t)).float().cpu()
        entropies.append(prediction_entropy(logits))
        predictions.append(logits.argmax(-1))
        confidences.append(_confidence(logits, predictions[-1]))
    task = torch.stack(entropies).argmin(0)

    def chosen(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values).gather(0, task.unsqueeze(0)).squeeze(0)

    return Recognition(task, chosen(predictions), chosen(confidences))


RECOGNISERS: dict[str, Callable[[PackedModel, Callable[[int], torch.Tensor]], Recognition]] = {
    "entropy": lowest_entropy,
}
DEFAULT = "entropy"


def infer_tasks(model: PackedModel, x: Inputs, method: str = DEFAULT) -> Recognition:
    """The task of every input of ``x`` (network inputs, or ``task -> network inputs``), with
    its class and confidence, by the recogniser ``method``."""
    if model.num_tasks == 0:
        raise ValueError("the model holds no committed task")
    if method not in RECOGNISERS:
        raise ValueError(f"unknown task recogniser {method!r} (known: {', '.join(RECOGNISERS)})")
    inputs = x if callable(x) else (lambda task: x)
    return RECOGNISERS[method](model, inputs)
