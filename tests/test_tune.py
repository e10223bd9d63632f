"""``qpacknet tune`` end to end: a 2-trial Ray Tune search on digits, with one trial failing
on purpose after its first task (Tune must retry it from its checkpoint), then the finished
experiment restored with ``--resume``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from qpacknet.cli import main
from qpacknet.tuning.trial import FAIL_MARKER_ENV

SPACE = """
num_samples: 1
grace_period: 1
max_failures: 1
max_concurrent: 1
cpus_per_trial: 1
space:
  train.lr: {grid: [0.05, 0.0005]}
  search.alpha: {uniform: [0.6, 1.0]}
"""

TINY = [
    "--set", "scenario.num_tasks=2",
    "--set", "search.population=2",
    "--set", "search.epochs=1",
    "--set", "train.epochs=2",
    "--set", "net.hidden=[16]",
    "--set", "train.lr_min=0.0001",
]  # fmt: skip


def _trial_reports(exp: Path) -> list[list[dict]]:
    """Every result each trial reported, in trial order, from Tune's per-trial logs."""
    out = []
    for result in sorted(exp.glob("run_trial_*/result.json"), key=lambda p: p.parent.name):
        out.append([json.loads(line) for line in result.read_text().splitlines() if line.strip()])
    return out


def test_two_trial_search_retries_a_failed_trial_and_restores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trials run one at a time (``max_concurrent: 1``) over a 2-value lr grid, so the outcome
    is deterministic: the first trial (lr 0.05) fails once after task 1, is retried from its
    checkpoint and finishes; ASHA stops the second (lr 0.0005, far weaker) after task 1."""
    assert not ray.is_initialized()
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    marker = tmp_path / "fail-once"
    marker.write_text("fail one trial once, after its first task")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(marker))
    storage = tmp_path / "tune"
    args = ["tune", "--preset", "digits", *TINY, "--space", str(space)]
    rc = main([*args, "--name", "exp", "--storage", str(storage)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert not marker.exists(), "the trial failure was never injected"
    assert "failed (RuntimeError: injected trial failure (test)); retrying" in out
    assert "Traceback" not in out

    first, second = _trial_reports(storage / "exp")
    assert (first[0]["config"]["train.lr"], second[0]["config"]["train.lr"]) == (0.05, 0.0005)
    # the retried trial resumed from its checkpoint: task 2 follows task 1, none twice (Tune
    # may lose the report of task 1 from result.json when the trial dies right after it)
    assert [(r["training_iteration"], r["task"]) for r in first] in ([(1, 1), (2, 2)], [(2, 2)])
    assert [(r["training_iteration"], r["task"]) for r in second] == [(1, 1)]
    assert second[0]["val_acc"] < first[0]["val_acc"]
    assert "1 trials finished, 1 stopped early by ASHA, 0 failed." in out
    assert "stopped by ASHA after 1 tasks" in out
    table = out[out.index("Pareto front") :].splitlines()[1:]
    assert table[0].split()[:4] == ["trial", "val", "ACC", "%"]
    assert "test ACC %" in table[0]
    assert "search.alpha" in table[0] and "train.lr" in table[0]
    assert len(table) == 3, "one finished trial: header, rule, one row"
    row = table[2].split()
    assert row[1] == f"{first[-1]['val_acc']:.2f}" and row[3] == f"{first[-1]['acc']:.2f}"
    assert not ray.is_initialized(), "the embedded Ray instance must be shut down"

    rc = main(["tune", "--resume", "--name", "exp", "--storage", str(storage)])
    again = capsys.readouterr().out
    assert rc == 0, again
    assert "resuming Tune experiment" in again
    assert again[again.index("Pareto front") :] == out[out.index("Pareto front") :]
    assert _trial_reports(storage / "exp") == [first, second], "finished trials must not rerun"

    rc = main([*args, "--name", "exp", "--storage", str(storage)])
    assert rc == 2
    assert "pass --resume" in capsys.readouterr().err
