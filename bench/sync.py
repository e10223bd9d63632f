"""Time ``qpacknet sync`` on a run whose record is missing entirely, against a real server.

Runs the digits preset for ``--tasks`` tasks with tracking off (as if the server had been down
from the start), then starts ``mlflow server`` on 127.0.0.1 and times ``qpacknet sync`` (which
then writes the whole record: parent, task and candidate runs, metrics, files, plots, one model
version per task) and a second ``sync`` (which finds nothing missing). Side by side, the same
run with live tracking, so the cost of syncing later reads against the cost of tracking live.

    python bench/sync.py --tasks 10 [--json bench/results/sync-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qpacknet.tracking.server import mlflow_server  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(cmd: list[str]) -> tuple[float, str]:
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - started, proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    py = [sys.executable, "-m", "qpacknet"]
    run = [
        *py, "run", "--preset", "digits", "--set", f"scenario.num_tasks={args.tasks}",
        "--executor", "local", "--quiet",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        offline, _ = timed([*run, "--no-tracking", "--out", str(root / "offline")])
        with mlflow_server(root) as uri:
            live, _ = timed([*run, "--tracking-uri", uri, "--out", str(root / "live")])
            sync = [*py, "sync", "--out", str(root / "offline"), "--tracking-uri", uri]
            first, said = timed(sync)
            second, again = timed(sync)
    figures = {
        "tasks": args.tasks,
        "run_without_tracking_s": round(offline, 1),
        "run_with_live_tracking_s": round(live, 1),
        "sync_whole_record_s": round(first, 1),
        "sync_again_s": round(second, 1),
        "first_sync_said": said.strip().splitlines()[-1],
        "second_sync_said": again.strip().splitlines()[-1],
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
    }
    print(f"digits, {args.tasks} tasks, local executor, mlflow server on 127.0.0.1")
    print(f"  run, tracking off            {offline:7.1f} s")
    print(f"  run, live tracking           {live:7.1f} s   ({live / offline:.2f}x)")
    print(f"  sync of the whole record     {first:7.1f} s   ({first / offline:.2f}x the run)")
    print(f"  sync again (nothing missing) {second:7.1f} s")
    print(f"  {figures['first_sync_said']}")
    print(f"  {figures['second_sync_said']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
