"""Ray executor vs in-process executor on one preset, run alternately, compared side by side.

Each repeat runs ``qpacknet run --preset P --executor ray`` and ``--executor local`` as
separate processes (their order alternates between repeats so that drift in a shared
machine's load hits both), times the whole command (Ray start and shutdown included), and
reads the per-stage seconds from results.json. Prints the runs, the medians and the ratio
ray / local, the Ray runs' event latency (an epoch's end on an actor to its line in the
driver's log), and whether both executors wrote the same model bytes.

By default Ray spreads the population over its actors (2 on a 2-core machine) while the local
executor trains one chunk; a population's float rounding depends on its size, so pass
``--set executor.workers=2`` to make both executors train the same chunks (the local one
then trains them one after the other) and compare the same computation byte for byte.

    python bench/executors.py --data-dir ../shared/data --repeats 3 --set executor.workers=2
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

KINDS = ("ray", "local")


def run_once(kind: str, preset: str, data_dir: str | None, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "qpacknet", "run", "--preset", preset, "--quiet"]
    cmd += ["--executor", kind, "--out", str(out), "--no-tracking"]
    for item in overrides:
        cmd += ["--set", item]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    return {
        "executor": kind,
        "wall_seconds": wall,
        "pipeline_seconds": res["seconds_total"],
        "stages": res["seconds_by_stage"],
        "acc": res["acc"],
        "chunks": res["chunks"],
        "workers": len(res["workers"]),
        "event_latency_s": res["event_latency_s"],
        "model": (out / "model.safetensors").read_bytes(),
    }


def summarize(runs: list[dict]) -> dict:
    """Print and return the medians, the per-repeat ratios (each pair ran back to back, so
    the machine's drifting speed cancels) and the time outside SEARCH and TRAIN."""
    by = {k: [r for r in runs if r["executor"] == k] for k in KINDS}
    med = {k: statistics.median(r["wall_seconds"] for r in by[k]) for k in KINDS}
    pairs = [
        a["wall_seconds"] / b["wall_seconds"] for a, b in zip(by["ray"], by["local"], strict=True)
    ]
    fixed = {
        k: statistics.median(
            r["wall_seconds"] - r["stages"]["search"] - r["stages"]["train"] for r in by[k]
        )
        for k in KINDS
    }
    print()
    print(f"{'median seconds':20s} {'ray':>8s} {'local':>8s} {'ray/local':>10s}")
    print(f"{'wall':20s} {med['ray']:8.1f} {med['local']:8.1f} {med['ray'] / med['local']:10.3f}")
    for name in runs[0]["stages"]:
        m = {k: statistics.median(r["stages"][name] for r in by[k]) for k in KINDS}
        ratio = m["ray"] / m["local"] if m["local"] else float("nan")
        print(f"{name:20s} {m['ray']:8.1f} {m['local']:8.1f} {ratio:10.3f}")
    print(f"{'outside search+train':20s} {fixed['ray']:8.1f} {fixed['local']:8.1f}")
    print("ray/local per repeat: " + " ".join(f"{p:.3f}" for p in pairs))
    print(f"median of the per-repeat ratios: {statistics.median(pairs):.3f}")
    lat = [r["event_latency_s"] for r in by["ray"] if r.get("event_latency_s", {}).get("median")]
    if lat:
        print(
            "ray epoch event -> driver log, ms: median "
            + " ".join(f"{1000 * x['median']:.1f}" for x in lat)
            + "; p90 "
            + " ".join(f"{1000 * x['p90']:.1f}" for x in lat)
            + "; max "
            + " ".join(f"{1000 * x['max']:.1f}" for x in lat)
        )
    print("chunks: " + "; ".join(f"{k} {by[k][0].get('chunks')}" for k in KINDS))
    return {
        "median_wall_seconds": med,
        "ratio_ray_over_local": med["ray"] / med["local"],
        "ratio_per_repeat": pairs,
        "median_ratio_per_repeat": statistics.median(pairs),
        "median_seconds_outside_search_and_train": fixed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pmnist-quick")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="bench/out/executors.json")
    ap.add_argument("--summarize", help="only print the summary of a saved JSON")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    if args.summarize:
        summarize(json.loads(Path(args.summarize).read_text())["runs"])
        return

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = KINDS if rep % 2 == 0 else KINDS[::-1]
            for kind in order:
                r = run_once(
                    kind, args.preset, args.data_dir, Path(tmp) / f"{kind}-{rep}", args.overrides
                )
                runs.append(r)
                stages = " ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
                print(
                    f"repeat {rep} {kind:5s} wall {r['wall_seconds']:6.1f}s  "
                    f"pipeline {r['pipeline_seconds']:6.1f}s  ({stages})  ACC {r['acc']:.2f}",
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
                "overrides": args.overrides,
                "runs": runs,
                **summary,
                "same_model_bytes": same,
                "hardware": hardware("cpu"),
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
