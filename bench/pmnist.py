"""p-MNIST benchmark: the paper configuration on the real MNIST files, beside the paper's row.

Prints ACC, BWT, capacity next to Ada-QPacknet's Table 1/2 figures (97.1 % / 81.25 %), the
throughput users care about (candidate-epochs per second) and how much of the wall time is
not candidate training. Writes the full results plus a summary to ``--json``.

    python bench/pmnist.py --data-dir ../shared/data [--preset pmnist] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qpacknet.config import load_config
from qpacknet.executor import LocalExecutor
from qpacknet.fileio import atomic_write_json
from qpacknet.pipeline import Pipeline, resolve_device
from qpacknet.progress import Progress
from qpacknet.scenarios import build_stream

PAPER = {"acc": 97.1, "capacity_pct": 81.25, "bwt": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pmnist")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="run dir (default bench/out/<preset>-<time>)")
    ap.add_argument("--json", default=None, help="summary JSON (default bench/results/...)")
    ap.add_argument("--label", default="", help="tag for the summary (e.g. 'sharing on')")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    cfg = load_config(preset=args.preset, overrides=args.overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"bench/out/{args.preset}-{stamp}")
    stream = build_stream(cfg.scenario, cfg.seed, args.data_dir, resolve_device(cfg.device))
    pipe = Pipeline(
        cfg, stream, LocalExecutor(), out, Progress(verbose=not args.quiet), preset=args.preset
    )
    res = pipe.run()

    tp = res["throughput"]
    print()
    print(pipe.matrix.table())
    print()
    print(f"{'':24s}{'ACC %':>8s}{'BWT':>8s}{'capacity %':>12s}{'heads %':>9s}{'bytes':>11s}")
    print(
        f"{'Ada-QPacknet (paper)':24s}{PAPER['acc']:8.2f}{PAPER['bwt']:8.2f}"
        f"{PAPER['capacity_pct']:12.2f}{'':>9s}{'':>11s}"
    )
    print(
        f"{'qpacknet ' + args.preset:24s}{res['acc']:8.2f}{res['bwt']:8.2f}"
        f"{res['capacity_pct']:12.2f}{res['heads_pct']:9.2f}{res['packed_bytes']:11,d}"
    )
    print(
        f"ratio ours/paper: ACC {res['acc'] / PAPER['acc']:.4f}, "
        f"capacity {res['capacity_pct'] / PAPER['capacity_pct']:.4f}"
    )
    print(f"bits per task: {[t['bit_width'] for t in res['tasks']]}")
    print(
        f"candidate-epochs/s: {tp['candidate_epochs_per_second']:.2f} "
        f"({tp['candidate_epochs']} candidate-epochs in {tp['candidate_training_seconds']:.1f}s "
        f"of training steps)"
    )
    print(
        f"wall time {res['seconds_total']:.1f}s; not candidate training: "
        f"{100 * tp['non_training_fraction']:.1f}% (stages: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in res["seconds_by_stage"].items())
        + f"; per-epoch validation {tp['validation_seconds']:.1f}s)"
    )
    summary = {
        "benchmark": "pmnist",
        "label": args.label,
        "preset": args.preset,
        "overrides": args.overrides,
        "paper": PAPER,
        "acc": res["acc"],
        "bwt": res["bwt"],
        "capacity_pct": res["capacity_pct"],
        "heads_pct": res["heads_pct"],
        "packed_bytes": res["packed_bytes"],
        "bits": [t["bit_width"] for t in res["tasks"]],
        "seconds_total": res["seconds_total"],
        "throughput": tp,
        "hardware": res["hardware"],
        "results": res,
    }
    path = Path(args.json or f"bench/results/{args.preset}-{stamp}.json")
    atomic_write_json(path, summary)
    print(f"wrote {path}")
    print(json.dumps({k: summary[k] for k in ("acc", "bwt", "capacity_pct", "packed_bytes")}))


if __name__ == "__main__":
    main()
