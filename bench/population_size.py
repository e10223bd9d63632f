"""What a bigger population buys: ACC, capacity and the chosen sparsity per population size.

The service's promise is that a cluster can search more candidates per task (Algorithm 1's
P_S). This runs the same settings (default: the ``pmnist-quick`` preset on real MNIST) with
``search.population`` = each of ``--sizes``, for each of ``--seeds``, and prints per size the
mean and range over seeds of: test ACC, validation ACC (what a choice may look at), capacity
(eq. 10), the winners' sparsity Υ (eqs. 6-7) and bits per task, and the run's time. Selection
inside each run is on validation only; test ACC is reported, never used.

    python bench/population_size.py --data-dir ../shared/data [--sizes 4 16 64] [--seeds 0 1 2]
        [--tasks 10] [--executor local] [--json bench/results/population_size-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def one_run(args: argparse.Namespace, size: int, seed: int, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "qpacknet", "run", "--preset", args.preset,
        "--set", f"search.population={size}", "--set", f"scenario.num_tasks={args.tasks}",
        "--seed", str(seed), "--executor", args.executor, "--no-tracking", "--quiet",
        "--out", str(out),
    ]  # fmt: skip
    for item in args.set:
        cmd += ["--set", item]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"P_S={size} seed {seed} failed:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    winners = [t["candidates"][t["winner"]] for t in res["tasks"]]
    return {
        "size": size,
        "seed": seed,
        "acc": res["acc"],
        "val_acc": res["val_acc"],
        "capacity_pct": res["capacity_pct"],
        "sparsity": statistics.mean(w["sparsity"] for w in winners),
        "bits": statistics.mean(t["bit_width"] for t in res["tasks"]),
        "winner_val_acc": statistics.mean(w["acc"] for w in winners),
        "best_val_acc": statistics.mean(
            max(c["acc"] for c in t["candidates"]) for t in res["tasks"]
        ),
        "seconds": time.monotonic() - started,
    }


def summary(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows]
    mean = statistics.mean(values)
    return (
        f"{mean:7.2f} [{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else f"{mean:7.2f}"
    )


COLUMNS = (
    ("acc", "test ACC %"),
    ("val_acc", "val ACC %"),
    ("capacity_pct", "capacity %"),
    ("sparsity", "sparsity Υ"),
    ("bits", "bits/task"),
    ("winner_val_acc", "winner A_i %"),
    ("best_val_acc", "best A_i %"),
    ("seconds", "seconds"),
)


def table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Per population size, the mean [min-max] over seeds of every column. ``winner A_i`` is
    the winners' validation accuracy after SEARCH's short training (mean over tasks), ``best
    A_i`` the best candidate's: how much better a candidate the population held than the one
    the α/β score (eq. 8) kept."""
    seeds = sorted({r["seed"] for r in rows})
    print()
    print(f"{args.preset}, {args.tasks} tasks, seeds {seeds}: mean [min-max] over seeds")
    print("  P_S   " + "  ".join(f"{title:<20}" for _, title in COLUMNS))
    for size in args.sizes:
        mine = [r for r in rows if r["size"] == size]
        if mine:
            cols = [summary(mine, key) if key in mine[0] else "-" for key, _ in COLUMNS]
            print(f"  {size:4d}  " + "  ".join(f"{c:<20}" for c in cols) + f" ({len(mine)} runs)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pmnist-quick")
    ap.add_argument("--data-dir", default=os.environ.get("QPACKNET_DATA"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--executor", choices=["local", "ray"], default="local")
    ap.add_argument("--json", help="write every run's figures here (after each run)")
    ap.add_argument("--set", action="append", default=[], help="more overrides, e.g. threads=1")
    ap.add_argument("--report", help="only print the table of a JSON this bench wrote")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        table(argparse.Namespace(**saved["args"]), saved["runs"])
        return 0
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # sizes inside seeds: machine drift hits every size alike
            for size in args.sizes:
                row = one_run(args, size, seed, Path(tmp) / f"p{size}-s{seed}")
                rows.append(row)
                print(
                    f"P_S={size:4d} seed {seed}: ACC {row['acc']:.2f} (val {row['val_acc']:.2f})"
                    f" capacity {row['capacity_pct']:.2f}% sparsity {row['sparsity']:.3f}"
                    f" bits {row['bits']:.1f} {row['seconds']:.0f}s",
                    flush=True,
                )
                if args.json:
                    Path(args.json).write_text(
                        json.dumps({"args": vars(args), "runs": rows}, indent=2) + "\n"
                    )
    table(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
