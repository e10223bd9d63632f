"""Cost of MLflow tracking on one preset: off vs the embedded sqlite store vs a tracking server.

Each repeat runs ``qpacknet run --preset P`` three ways as separate processes, in an order that
rotates between repeats (a shared machine's drifting load then hits every variant), and
compares whole-command wall times. The server is a real ``mlflow server`` on 127.0.0.1 started
by this script. Prints the runs, the medians and the ratios to "off", and checks that every
variant wrote the same model bytes (tracking must not change what is learned).

    python bench/tracking.py --data-dir ../shared/data --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qpacknet.pipeline import hardware
from qpacknet.tracking.server import mlflow_server

VARIANTS = ("off", "local-store", "server")


def run_once(variant: str, args: argparse.Namespace, out: Path, server: str) -> dict:
    cmd = [sys.executable, "-m", "qpacknet", "run", "--preset", args.preset, "--quiet"]
    cmd += ["--executor", args.executor, "--out", str(out)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if variant == "off":
        cmd.append("--no-tracking")
    elif variant == "server":
        cmd += ["--tracking-uri", server]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or "WARNING" in proc.stderr:
        raise SystemExit(f"{' '.join(cmd)}:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    return {
        "variant": variant,
        "wall_seconds": wall,
        "pipeline_seconds": res["seconds_total"],
        "acc": res["acc"],
        "model": (out / "model.safetensors").read_bytes(),
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
                    f"pipeline {r['pipeline_seconds']:6.1f}s  ACC {r['acc']:.2f}",
                    flush=True,
                )
    same = len({r.pop("model") for r in runs}) == 1
    med = {
        v: statistics.median(r["wall_seconds"] for r in runs if r["variant"] == v) for v in VARIANTS
    }
    print()
    print(f"{'median wall s':14s} " + " ".join(f"{v:>12s}" for v in VARIANTS))
    print(f"{'':14s} " + " ".join(f"{med[v]:12.1f}" for v in VARIANTS))
    print(f"{'ratio to off':14s} " + " ".join(f"{med[v] / med['off']:12.3f}" for v in VARIANTS))
    print(f"same model bytes from every run: {same}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "preset": args.preset,
                "executor": args.executor,
                "runs": runs,
                "median_wall_seconds": med,
                "ratio_to_off": {v: med[v] / med["off"] for v in VARIANTS},
                "same_model_bytes": same,
                "hardware": hardware("cpu"),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
