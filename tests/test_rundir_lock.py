"""One live writer per run directory: a second ``run``/``add_task``/``learn`` on a directory a
live process writes is refused at once (exit 2, naming the process); a killed writer's
directory is taken over and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.add_task import add_task
from qpacknet.cli import main
from qpacknet.rundir_lock import LOCK_FILE, hold_run_dir

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--preset", "digits", "--executor", "local", "--no-tracking", "--quiet"]
TINY = ["--set", "scenario.num_tasks=2", "--set", "search.population=2", "--set", "threads=1"]


def _wait_for_holder(out: Path, pid: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if json.loads((out / LOCK_FILE).read_text()).get("pid") == pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError("the first run never took the run directory's lock")


def test_a_live_writer_refuses_run_add_task_and_learn_and_a_killed_one_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    slow = ["--set", "train.epochs=400", "--set", "search.epochs=50"]
    first = subprocess.Popen(
        [sys.executable, "-m", "qpacknet", "run", *RUN, *TINY, *slow, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_holder(out, first.pid, first)
        capsys.readouterr()
        started = time.monotonic()
        assert main(["run", *RUN, *TINY, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert time.monotonic() - started < 5
        assert f"{out} is being written by qpacknet run --preset digits" in err
        assert f"(pid {first.pid} on host " in err and f"kill {first.pid}" in err
        assert add_task(["--out", str(out), "--executor", "local"]) == 2
        assert f"pid {first.pid}" in capsys.readouterr().err
        # learn refuses the busy work dir before it contacts the (here absent) registry
        learn = ["learn", "--model", "models:/nothing/1", "--out", str(out)]
        assert main([*learn, "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
        assert f"pid {first.pid}" in capsys.readouterr().err
        assert not (tmp_path / "none.db").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert main(["run", *RUN, *TINY, "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["accuracy_matrix"]
    with hold_run_dir(out, "test"):  # released after the run: free again
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_lock_is_reentrant_in_one_process_and_released_after(tmp_path: Path) -> None:
    out = tmp_path / "d"
    with hold_run_dir(out, "outer"), hold_run_dir(out, "inner"):
        assert json.loads((out / LOCK_FILE).read_text())["command"] == "outer"
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from qpacknet.rundir_lock import "
                "hold_run_dir, RunDirBusy\ntry:\n    with hold_run_dir(Path(sys.argv[1])): pass\n"
                "except RunDirBusy as e:\n    print(e); sys.exit(2)",
                str(out),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.returncode == 2 and "is being written by outer" in probe.stdout
    assert (out / LOCK_FILE).read_text() == ""
