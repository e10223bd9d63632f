"""Task inference without task ids, recogniser by recogniser (issue 13 point 2).

Without a task id (class-incremental use) the task of an input is inferred by a recogniser
(:mod:`qpacknet.recognise`): ``entropy`` (DESIGN.md §2: lowest prediction entropy), ``input``
(a per-task diagonal Gaussian over the network input), ``feature`` (Mahalanobis distance to the
task's class means of its penultimate features) and ``combined`` (their sum). Their statistics
are computed at COMMIT from each task's training split and kept in the model file. This runs
the real entry point (``qpacknet run --executor local --no-tracking --set threads=1``, in this
process) on three streams and prints one table: per stream and recogniser the share of test
inputs whose task is inferred right and the class-incremental accuracy (task and class right),
as results.json's ``task_inference`` reports them, next to the task-incremental ACC, and the
model file's size with and without the statistics (the same file saved again without them).

Streams:

* ``digits``: the ``digits`` preset (scikit-learn's 8x8 digits, 4 pixel-permuted tasks);
* ``pmnist-quick``: the ``pmnist-quick`` preset (10 permuted MNIST tasks; ``--data-dir``);
* ``pairs``: five two-class tasks cut from the digits (0/1, 2/3, 4/5, 6/7, 8/9; written by
  ``bench/digit_pairs.py``) on the ``digits`` preset's settings: the tasks share the input
  distribution and differ by their classes.

    python bench/task_inference.py [--streams digits pairs pmnist-quick]
        [--data-dir ../shared/data] [--json bench/results/task_inference-cpu.json]
        [--set inference.feature_covariance=diagonal ...]   # more overrides, every stream
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
for _p in (str(BENCH.parent), str(BENCH)):  # qpacknet from the source tree; digit_pairs beside us
    if _p not in sys.path:
        sys.path.insert(0, _p)

PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
STREAMS = ("digits", "pmnist-quick", "pairs")


def stream_args(name: str, work: Path, data_dir: str) -> list[str]:
    """The ``qpacknet run`` arguments of one stream."""
    if name == "digits":
        return ["--preset", "digits"]
    if name == "pmnist-quick":
        return ["--preset", "pmnist-quick", "--data-dir", data_dir]
    from digit_pairs import write_pairs  # bench/digit_pairs.py

    root = write_pairs(work / "pairs-data", PAIRS, val_per_class=20, test_per_class=60)
    return ["--preset", "digits", "--set", "scenario.name=npz", "--set", f"scenario.path={root}"]


def run_one(name: str, out: Path, args: list[str], sets: list[str]) -> dict[str, Any]:
    """One run of the real entry point with the overrides ``sets``; its results.json."""
    from qpacknet.cli import main as qpacknet_main

    argv = ["run", *args, "--executor", "local", "--no-tracking", "--quiet"]
    argv += ["--out", str(out), "--set", "threads=1"]
    for item in sets:
        argv += ["--set", item]
    if name == "pairs":
        argv += ["--set", f"scenario.num_tasks={len(PAIRS)}"]
    with contextlib.redirect_stdout(io.StringIO()):
        code = qpacknet_main(argv)
    if code != 0:
        raise SystemExit(f"qpacknet {' '.join(argv)} exited {code}")
    return json.loads((out / "results.json").read_text())


def sizes(out: Path) -> dict[str, int]:
    """The model file's bytes with its recognition statistics, and saved again without."""
    from qpacknet.store import load_store, save_store

    path = out / "model.safetensors"
    store = load_store(path)
    store._recognise.clear()  # the same store as before the statistics existed
    bare = out / "bare.safetensors"
    save_store(store, bare)
    with_stats, without = path.stat().st_size, bare.stat().st_size
    tasks = store.num_tasks
    return {
        "with_stats": with_stats,
        "without_stats": without,
        "growth_per_task": (with_stats - without) // tasks,
        "tasks": tasks,
    }


def summarise(name: str, results: dict[str, Any], size: dict[str, int]) -> dict[str, Any]:
    return {
        "stream": name,
        "tasks": len(results["tasks"]),
        "acc": results["acc"],
        "task_inference": results["task_inference"],
        "headline": results["task_inference_recogniser"],
        "bytes": size,
        "seconds_total": results["seconds_total"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    names = list(rows[0]["task_inference"])
    head = f"{'stream':14s}{'tasks':>6s}{'TIL ACC':>9s}"
    head += "".join(f"{n + ' TI/CI %':>22s}" for n in names)
    head += f"{'file bytes (no stats)':>26s}{'+/task':>8s}"
    lines = [head]
    for r in rows:
        cells = "".join(
            f"{r['task_inference'][n]['task_inference_acc']:>14.2f}/"
            f"{r['task_inference'][n]['class_incremental_acc']:<7.2f}"
            for n in names
        )
        b = r["bytes"]
        lines.append(
            f"{r['stream']:14s}{r['tasks']:>6d}{r['acc']:>9.2f}{cells}"
            f"{b['with_stats']:>14,d} ({b['without_stats']:,d}){b['growth_per_task']:>8,d}"
        )
    lines.append(
        "TI: task inferred right; CI: class-incremental accuracy (task and class right); "
        "TIL ACC: task-incremental accuracy (task id given)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", nargs="+", choices=STREAMS, default=list(STREAMS))
    parser.add_argument("--data-dir", default=str(BENCH.parent.parent / "shared" / "data"))
    parser.add_argument("--json", type=Path, default=BENCH / "results" / "task_inference-cpu.json")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="more overrides, every stream"
    )
    args = parser.parse_args()
    from qpacknet.pipeline import hardware

    started = time.perf_counter()
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qpacknet-taskinf-") as tmp:
        work = Path(tmp)
        for name in args.streams:
            out = work / name
            results = run_one(name, out, stream_args(name, work, args.data_dir), args.sets)
            rows.append(summarise(name, results, sizes(out)))
            print(f"{name}: done in {results['seconds_total']:.0f} s", file=sys.stderr)
    text = table(rows)
    print(text)
    seconds = time.perf_counter() - started
    print(f"\n{len(rows)} runs in {seconds:.0f} s (load average before: {load[0]:.2f})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "task_inference",
        "overrides": args.sets,
        "streams": rows,
        "table": text,
        "seconds": seconds,
        "hardware": hardware("cpu"),
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
    }
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
