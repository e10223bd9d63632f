"""The per-task state machine refuses illegal transitions."""

from __future__ import annotations

import pytest

from qpacknet.errors import IllegalTransition
from qpacknet.stages import Stage, TaskStages


def test_legal_order() -> None:
    s = TaskStages(0)
    for stage in (
        Stage.SEARCH,
        Stage.TRAIN,
        Stage.QUANTIZE,
        Stage.COMMIT,
        Stage.EVALUATE,
        Stage.DONE,
    ):
        s.advance(stage)
        assert s.stage is stage


@pytest.mark.parametrize(
    ("done", "bad"),
    [
        ([], Stage.TRAIN),
        ([], Stage.COMMIT),
        ([Stage.SEARCH], Stage.QUANTIZE),
        ([Stage.SEARCH], Stage.SEARCH),
        ([Stage.SEARCH, Stage.TRAIN], Stage.COMMIT),
        ([Stage.SEARCH, Stage.TRAIN, Stage.QUANTIZE, Stage.COMMIT], Stage.DONE),
        (
            [Stage.SEARCH, Stage.TRAIN, Stage.QUANTIZE, Stage.COMMIT, Stage.EVALUATE, Stage.DONE],
            Stage.SEARCH,
        ),
    ],
)
def test_illegal_transitions_raise(done: list[Stage], bad: Stage) -> None:
    s = TaskStages(2)
    for stage in done:
        s.advance(stage)
    before = s.stage
    with pytest.raises(IllegalTransition, match=f"task 2: cannot go from {before.value}"):
        s.advance(bad)
    assert s.stage is before
