"""Resuming compares settings after filling in defaults, so a run directory written before a
setting was added still resumes, while a real change is still refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from qpacknet.checkpoint import check_same_config
from qpacknet.errors import UsageError
from tests.conftest import tiny_config


def test_settings_added_later_take_their_defaults(tmp_path: Path) -> None:
    now = tiny_config().model_dump(mode="json")
    older = copy.deepcopy(now)
    for key in ("width", "dropout", "channels_last"):
        del older["net"][key]
    del older["tracking"]
    check_same_config({"config": older}, now, tmp_path)


def test_a_changed_setting_is_still_refused(tmp_path: Path) -> None:
    now = tiny_config().model_dump(mode="json")
    changed = copy.deepcopy(now)
    changed["net"]["hidden"] = [8]
    with pytest.raises(UsageError, match=r"differs in: net"):
        check_same_config({"config": now}, changed, tmp_path)


def test_a_run_from_before_the_criterion_resumes_only_under_the_papers_test(
    tmp_path: Path,
) -> None:
    """A checkpoint written before ``quantize.criterion`` existed chose bit widths with the
    paper's test; today's default (loss) would learn its later tasks differently, so it is
    refused, and accepted with ``quantize.criterion=accuracy``."""
    now = tiny_config().model_dump(mode="json")
    older = copy.deepcopy(now)
    for key in ("criterion", "loss_tolerance", "min_agreement"):
        del older["quantize"][key]
    del older["capacity"]
    with pytest.raises(UsageError, match=r"differs in: quantize"):
        check_same_config({"config": older}, now, tmp_path)
    paper = tiny_config(quantize={"criterion": "accuracy"}).model_dump(mode="json")
    check_same_config({"config": older}, paper, tmp_path)
