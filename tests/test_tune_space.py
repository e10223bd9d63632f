"""The tune space is checked before any trial runs; the Pareto front is computed right."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpacknet.cli import main
from qpacknet.config import load_config, preset_names
from qpacknet.errors import ConfigError
from qpacknet.tuning.pareto import TrialPoint, dominates, pareto_front, pareto_table
from qpacknet.tuning.space import check_spec, load_spec, trial_config


def _base() -> dict:
    return load_config(preset="digits").model_dump(mode="json")


def _spec_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def test_shipped_space_is_valid_for_every_preset() -> None:
    spec = load_spec()
    assert {"search.alpha", "search.beta", "search.v_min", "search.v_max", "train.lr"} <= set(
        spec.space
    )
    assert "quantize.delta" in spec.space
    for preset in preset_names():
        check_spec(spec, load_config(preset=preset).model_dump(mode="json"))


def test_trial_config_puts_sampled_values_in_place() -> None:
    cfg = trial_config(_base(), {"search.alpha": 0.7, "quantize.delta": 0.5, "train.lr": 0.02})
    assert (cfg.search.alpha, cfg.quantize.delta, cfg.train.lr) == (0.7, 0.5, 0.02)
    assert cfg.scenario.name == "digits"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path, "space:\n  search.alpah: {uniform: [0.1, 0.9]}\n"))
    with pytest.raises(ConfigError, match=r"search.alpah.*no key 'alpah'"):
        check_spec(spec, _base())


def test_range_corners_that_break_the_config_are_refused(tmp_path: Path) -> None:
    text = "space:\n  search.v_min: {uniform: [0.3, 0.8]}\n  search.v_max: {uniform: [0.5, 0.9]}\n"
    spec = load_spec(_spec_file(tmp_path, text))
    with pytest.raises(ConfigError, match=r"search.v_min=0.8, search.v_max=0.5.*narrow"):
        check_spec(spec, _base())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("space:\n  train.lr: {uniform: [0.1, 0.01]}\n", "lower bound 0.1 must be below 0.01"),
        ("space:\n  train.lr: {loguniform: [0.0, 0.1]}\n", "bounds must be positive"),
        ("space:\n  train.lr: {uniform: [0, 1], choice: [1]}\n", "exactly one of"),
        ("space: {}\n", "space"),
        ("num_sample: 3\nspace:\n  train.lr: {choice: [0.1]}\n", "num_sample: unknown key"),
        ("space: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_space_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_spec(_spec_file(tmp_path, text))


def test_cli_refuses_a_bad_space_with_exit_code_2(tmp_path: Path, capsys) -> None:
    bad = _spec_file(tmp_path, "space:\n  net.depth: {choice: [8, 16]}\n")
    rc = main(["tune", "--preset", "digits", "--space", str(bad), "--storage", str(tmp_path)])
    assert rc == 2
    assert "net.depth" in capsys.readouterr().err


def test_cli_resume_without_an_experiment_is_a_usage_error(tmp_path: Path, capsys) -> None:
    rc = main(["tune", "--resume", "--name", "nothing", "--storage", str(tmp_path)])
    assert rc == 2
    assert "no qpacknet Tune experiment to resume" in capsys.readouterr().err


def _p(tid: str, acc: float, cap: float) -> TrialPoint:
    return TrialPoint(tid, acc, cap, 3, {"search.alpha": 0.5})


def test_pareto_front_keeps_only_undominated_trials() -> None:
    pts = [_p("a", 90, 10), _p("b", 95, 20), _p("c", 89, 12), _p("d", 95, 25), _p("e", 80, 5)]
    assert dominates(pts[0], pts[2]) and not dominates(pts[0], pts[1])
    assert [p.trial_id for p in pareto_front(pts)] == ["b", "a", "e"]
    table = pareto_table(pts)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["trial", "val", "ACC", "%"]
    assert [ln.split()[0] for ln in lines[2:]] == ["b", "a", "e"]
    assert pareto_table([]) == "(no finished trials)"


def test_test_accuracy_never_ranks_trials() -> None:
    """A trial with the better *test* accuracy but the worse validation accuracy at the same
    capacity is dominated: tuning chooses on validation data only."""
    val_best = TrialPoint("v", 92.0, 10.0, 3, {}, test_acc=80.0)
    test_best = TrialPoint("t", 90.0, 10.0, 3, {}, test_acc=99.0)
    assert [p.trial_id for p in pareto_front([test_best, val_best])] == ["v"]
    assert "80.00" in pareto_table([test_best, val_best])


def test_equal_points_are_both_on_the_front() -> None:
    assert len(pareto_front([_p("a", 90, 10), _p("b", 90, 10)])) == 2


def test_grid_values_are_all_checked(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path, "space:\n  train.lr: {grid: [0.05, 0.0002]}\n"))
    assert spec.space["train.lr"].corners() == [0.05, 0.0002]
    with pytest.raises(ConfigError, match=r"(?s)train.lr=0.0002.*lr_min \(0.001\) must not exceed"):
        check_spec(spec, _base())


def test_samples_override_replaces_the_file_value() -> None:
    assert load_spec(None, {"num_samples": 3}).num_samples == 3
    assert load_spec(None, {"num_samples": None}).num_samples == load_spec().num_samples
