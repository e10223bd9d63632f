"""Per-task stages as an explicit state machine (like Avalanche's PackNet phases).

``PENDING → SEARCH → TRAIN → QUANTIZE → COMMIT → EVALUATE → DONE``; anything else raises
:class:`~qpacknet.errors.IllegalTransition`, so a stage can never run on the output of a stage
that did not finish (the reference code stored masks from a different step than weights).
"""

from __future__ import annotations

from enum import Enum

from qpacknet.errors import IllegalTransition


class Stage(Enum):
    PENDING = "pending"
    SEARCH = "search"
    TRAIN = "train"
    QUANTIZE = "quantize"
    COMMIT = "commit"
    EVALUATE = "evaluate"
    DONE = "done"


_NEXT = {
    Stage.PENDING: Stage.SEARCH,
    Stage.SEARCH: Stage.TRAIN,
    Stage.TRAIN: Stage.QUANTIZE,
    Stage.QUANTIZE: Stage.COMMIT,
    Stage.COMMIT: Stage.EVALUATE,
    Stage.EVALUATE: Stage.DONE,
}


class TaskStages:
    """The stage of one task; :meth:`advance` is the only way to move."""

    def __init__(self, task: int) -> None:
        self.task = task
        self.stage = Stage.PENDING

    def advance(self, to: Stage) -> None:
        expected = _NEXT.get(self.stage)
        if to is not expected:
            allowed = expected.value if expected else "nothing (the task is done)"
            raise IllegalTransition(
                f"task {self.task}: cannot go from {self.stage.value} to {to.value}; "
                f"next allowed: {allowed}"
            )
        self.stage = to
