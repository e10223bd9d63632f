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
