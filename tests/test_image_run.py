"""The image scenarios are wired into the config and run end to end through the CLI (on tiny
files in the official formats, with the MLP until the conv backbones land)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpacknet.cli import main
from qpacknet.config import load_config
from qpacknet.errors import DataError
from qpacknet.scenarios import build_stream
from qpacknet.scenarios.cifar import SplitCIFAR100
from tests.test_image_scenarios import _make_cifar100


def test_config_names_map_to_the_image_streams(tmp_path: Path) -> None:
    _make_cifar100(tmp_path)
    cfg = load_config(overrides=["scenario.name=cifar100", "scenario.num_tasks=2"])
    stream = build_stream(cfg.scenario, 0, str(tmp_path), "cpu")
    assert isinstance(stream, SplitCIFAR100) and stream.num_tasks == 2
    for name, missing in (("tinyimagenet", "tiny-imagenet-200"), ("imagenet100", "imagenet100")):
        cfg = load_config(overrides=[f"scenario.name={name}"])
        with pytest.raises(DataError, match=missing):
            build_stream(cfg.scenario, 0, str(tmp_path / "empty"), "cpu")


def test_split_cifar100_runs_through_the_cli(tmp_path: Path, capsys) -> None:
    _make_cifar100(tmp_path / "data")
    out = tmp_path / "run"
    sets = ["scenario.name=cifar100", "scenario.num_tasks=2", "search.population=2"]
    sets += ["search.epochs=1", "train.epochs=2", "capacity.quality_gate=warn"]  # random pixels
    args = ["run", "--preset", "digits", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    args += [f"--set={s}" for s in sets] + ["--executor", "local", "--no-tracking", "--quiet"]
    rc = main(args)
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["scenario"] == "cifar100" and len(res["tasks"]) == 2
    assert res["bwt"] == 0.0
