"""Entrypoint for ``ray job submit``: add the next task of a run's stream to its packed model.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/add_task.py --out /outputs/pmnist [--data-dir /data] [--executor ray]

Reads ``<out>/config.yaml`` and ``<out>/checkpoint.json``, learns task T+1 on top of the T
committed tasks (which stay bit-identical) and rewrites the model, checkpoint and results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qpacknet.checkpoint import CHECKPOINT_FILE
from qpacknet.cli import main
from qpacknet.pipeline import CONFIG_FILE
from qpacknet.rundir_lock import RunDirBusy, hold_run_dir


def add_task(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="add_task.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the run dir holding the packed model")
    ap.add_argument("--data-dir")
    ap.add_argument("--executor", choices=["local", "ray"], default="ray")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        print(
            f"add_task: error: {out} holds no qpacknet run (no such directory); pass the --out "
            "of a run, or run jobs/run_scenario.py first",
            file=sys.stderr,
        )
        return 2
    try:
        # held across reading the task count and the run, so no writer slips in between
        with hold_run_dir(out, " ".join(["add_task.py", *argv])):
            return _add_task(out, args)
    except RunDirBusy as exc:
        print(f"add_task: error: {exc}", file=sys.stderr)
        return 2


def _add_task(out: Path, args: argparse.Namespace) -> int:
    if not (out / CHECKPOINT_FILE).is_file() or not (out / CONFIG_FILE).is_file():
        print(
            f"add_task: error: {out} holds no qpacknet run ({CHECKPOINT_FILE} and "
            f"{CONFIG_FILE} are needed); run jobs/run_scenario.py first",
            file=sys.stderr,
        )
        return 2
    try:
        done = len(json.loads((out / CHECKPOINT_FILE).read_text())["tasks"])
    except (ValueError, KeyError, TypeError) as exc:
        print(f"add_task: error: {out / CHECKPOINT_FILE} is damaged ({exc})", file=sys.stderr)
        return 2
    cmd = [
        "run",
        "--config",
        str(out / CONFIG_FILE),
        "--set",
        f"scenario.num_tasks={done + 1}",
        "--out",
        str(out),
        "--executor",
        args.executor,
    ]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return main(cmd)


if __name__ == "__main__":
    raise SystemExit(add_task(sys.argv[1:]))
