"""Config: presets validate; bad input exits 2 with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpacknet.cli import main
from qpacknet.config import RunConfig, load_config, preset_names
from qpacknet.errors import ConfigError


def test_presets_ship_and_validate() -> None:
    assert {"pmnist", "pmnist-quick", "digits"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_config(preset=name), RunConfig)


def test_pmnist_preset_is_the_paper_config() -> None:
    cfg = load_config(preset="pmnist")
    assert (cfg.search.population, cfg.search.v_min, cfg.search.v_max) == (16, 0.45, 0.85)
    assert (cfg.search.alpha, cfg.search.beta, cfg.search.epochs) == (0.9, 0.1, 5)
    assert (cfg.train.epochs, cfg.train.lr_min) == (50, 0.0001)
    assert cfg.train.lr == 0.05  # the paper's 0.01 with its unknown optimiser; see the header
    assert cfg.net.hidden == [100, 100] and cfg.scenario.num_tasks == 10


SCENARIO_PRESETS = {
    "cifar100": ("cifar100", "alexnet", 10),
    "five_datasets": ("five_datasets", "resnet18_reduced", 5),
    "tinyimagenet": ("tinyimagenet", "tinynet", 40),
    "imagenet100": ("imagenet100", "resnet18", 10),
}


@pytest.mark.parametrize("name", sorted(SCENARIO_PRESETS))
def test_scenario_presets_carry_the_paper_settings_and_a_quick_variant(name: str) -> None:
    scenario, backbone, tasks = SCENARIO_PRESETS[name]
    paper, quick = load_config(preset=name), load_config(preset=f"{name}-quick")
    assert (paper.scenario.name, paper.net.backbone, paper.scenario.num_tasks) == (
        scenario,
        backbone,
        tasks,
    )
    s = paper.search
    assert (s.population, s.v_min, s.v_max, s.alpha, s.beta, s.epochs) == (
        16,
        0.45,
        0.85,
        0.9,
        0.1,
        5,
    )
    assert (paper.train.epochs, paper.train.lr, paper.train.lr_min) == (50, 0.01, 0.0001)
    assert paper.scenario.train_limit is None
    assert (quick.scenario.name, quick.net.backbone) == (scenario, backbone)
    assert quick.search.population < s.population and quick.train.epochs < paper.train.epochs
    same = ("alpha", "beta", "v_min", "v_max")
    assert [getattr(quick.search, k) for k in same] == [getattr(s, k) for k in same]
    assert quick.quantize == paper.quantize


def test_overrides_parse_yaml_values_and_seed_wins() -> None:
    cfg = load_config(
        preset="digits",
        overrides=["search.population=3", "net.hidden=[8, 4]", "train.optimizer=adam"],
        seed=11,
    )
    assert cfg.search.population == 3 and cfg.net.hidden == [8, 4]
    assert cfg.train.optimizer == "adam" and cfg.seed == 11


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "search.populaton=4"], "search.populaton"),
        (["--set", "nosuch=1"], "nosuch"),
        (["--set", "search.population.x=1"], "search.population"),
        (["--set", "search.population=many"], "search.population"),
        (["--set", "search.population=0"], "search.population"),
        (["--set", "search.v_min=0.9", "--set", "search.v_max=0.5"], "v_min"),
        (["--set", "quantize.b_max=33"], "quantize.b_max"),
        (["--set", "quantize.psi_min=9"], "psi_min"),
        (["--set", "train.lr=-1"], "train.lr"),
        (["--set", "scenario.name=cifar"], "scenario.name"),
        (["--set", "search.population"], "key.path=value"),
    ],
)
def test_bad_settings_exit_2_and_name_the_key(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["run", "--preset", "digits", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert not (tmp_path / "o").exists()


def test_bad_config_file_and_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("search:\n  population: 4\n  alhpa: 0.5\n")
    assert main(["run", "--config", str(f)]) == 2
    assert "search.alhpa" in capsys.readouterr().err
    f.write_text("search: [1, 2\n")
    assert main(["run", "--config", str(f)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--preset", "nope"]) == 2
    assert "digits" in capsys.readouterr().err


def test_argparse_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run"])
    assert exc.value.code == 2


def test_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(preset="digits", overrides=["train.batch_size=0"])
