"""Cost of MLflow tracking on one preset: off vs the embedded sqlite store vs a tracking server.

Each repeat runs ``qpacknet run --preset P`` three ways as separate processes, in an order that
rotates between repeats (a shared machine's drifting load then hits every variant), and
compares whole-command wall times and the machine's busy CPU seconds. The server is a real
``mlflow server`` on 127.0.0.1 started by this script. Prints the runs, the medians and the
ratios to "off", and checks that every variant wrote the same model bytes (tracking must not
change what is learned).

    python bench/tracking.py --data-dir ../shared/data --repeats 3
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

from qpacknet.pipeline import hardware
from qpacknet.tracking.server import mlflow_server

VARIANTS = ("off", "local-store", "server")


def busy_cpu_seconds() -> float:
    """CPU time this machine spent busy (user, nice, system, irq), from ``/proc/stat``.

    Ray's actors are not the command's children, so ``getrusage`` misses them; the machine-wide
    count has them all. Time stolen by other tenants of a shared VM is not in it, which makes
    it far steadier than wall time (the server and Ray's idle daemons add a little)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run_once(variant: str, args: argparse.Namespace, out: Path, server: str) -> dict:
    cmd = [sys.executable, "-m", "qpacknet", "run", "--preset", args.preset, "--quiet"]
    cmd += ["--executor", args.executor, "--out", str(out)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if variant == "off":
        cmd.append("--no-tracking")
    elif variant == "server":
        cmd += ["--tracking-uri", server]
    before = busy_cpu_seconds()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu = busy_cpu_seconds() - before
    if proc.returncode != 0 or "WARNING" in proc.stderr:
        raise SystemExit(f"{' '.join(cmd)}:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    return {
        "variant": variant,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "training_seconds": res["throughput"]["worker_training_seconds"],
        "pipeline_seconds": res["seconds_total"],
        "acc": res["acc"],
        "model": (out / "model.safetensors").read_bytes(),
    }


def summarize(runs: list[dict]) -> dict:
    """Medians, per-repeat ratios to "off" (each repeat's runs were back to back), and CPU
    seconds, which a shared machine's drifting speed disturbs far less than wall time."""
    by = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    med = {v: statistics.median(r["wall_seconds"] for r in by[v]) for v in VARIANTS}
    cpu = {v: statistics.median(r["cpu_seconds"] for r in by[v]) for v in VARIANTS}
    pairs = {
        v: [a["wall_seconds"] / b["wall_seconds"] for a, b in zip(by[v], by["off"], strict=True)]
        for v in VARIANTS
    }
    print()
    print(f"{'':26s} " + " ".join(f"{v:>12s}" for v in VARIANTS))
    print(f"{'median wall s':26s} " + " ".join(f"{med[v]:12.1f}" for v in VARIANTS))
    print(f"{'median cpu s':26s} " + " ".join(f"{cpu[v]:12.1f}" for v in VARIANTS))
    print(
        f"{'median wall / off':26s} " + " ".join(f"{med[v] / med['off']:12.3f}" for v in VARIANTS)
    )
    print(f"{'median cpu / off':26s} " + " ".join(f"{cpu[v] / cpu['off']:12.3f}" for v in VARIANTS))
    print(
        f"{'median per-repeat wall/off':26s} "
        + " ".join(f"{statistics.median(pairs[v]):12.3f}" for v in VARIANTS)
    )
    return {
        "median_wall_seconds": med,
        "median_cpu_seconds": cpu,
        "ratio_to_off": {v: med[v] / med["off"] for v in VARIANTS},
        "cpu_ratio_to_off": {v: cpu[v] / cpu["off"] for v in VARIANTS},
        "median_ratio_per_repeat": {v: statistics.median(pairs[v]) for v in VARIANTS},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pmnist-quick")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--executor", default="ray", choices=["ray", "local"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="bench/out/tracking.json")
    args = ap.parse_args()

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, mlflow_server(Path(tmp)) as server:
        for rep in range(args.repeats):
            order = VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]
            for variant in order:
                r = run_once(variant, args, Path(tmp) / f"{variant}-{rep}", server)
                runs.append(r)
                print(
                    f"repeat {rep} {variant:11s} wall {r['wall_seconds']:6.1f}s  "
                    f"cpu {r['cpu_seconds']:6.1f}s  pipeline {r['pipeline_seconds']:6.1f}s  "
                    f"ACC {r['acc']:.2f}",
                    flush=True,
                )
    same = len({r.pop("model") for r in runs}) == 1
    summary = summarize(runs)
    print(f"same model bytes from every run: {same}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "preset": args.preset,
                "executor": args.executor,
                "runs": runs,
                **summary,
                "same_model_bytes": same,
                "hardware": hardware("cpu"),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
