"""p-MNIST benchmark: the paper configuration on the real MNIST files, beside the paper's row.

Prints ACC, BWT, capacity next to Ada-QPacknet's Table 1/2 figures (97.1 % / 81.25 %), the
throughput users care about (candidate-epochs per second) and how much of the wall time is
not candidate training. Writes the full results plus a summary to ``--json``.

    python bench/pmnist.py --data-dir ../shared/data [--preset pmnist] [--set key=value ...]
        [--sharing]   # a second run with TinySubNets weight sharing, side by side
        [--arm "LABEL=key=value;key=value" ...]   # more runs, side by side with the first
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from qpacknet.config import load_config
from qpacknet.executor import LocalExecutor
from qpacknet.fileio import atomic_write_json
from qpacknet.pipeline import Pipeline, resolve_device
from qpacknet.progress import Progress
from qpacknet.quantize import report_widths
from qpacknet.scenarios import build_stream

PAPER = {"acc": 97.1, "capacity_pct": 81.25, "bwt": 0.0}


def run_arm(
    preset: str, overrides: list[str], data_dir: str | None, out: Path, quiet: bool
) -> tuple[dict[str, Any], Pipeline]:
    """One whole run of ``preset`` with ``overrides`` (in-process executor, no tracking).
    ``threads`` is applied here as ``qpacknet run`` applies it; the hardware record then says
    how many torch threads the run had."""
    cfg = load_config(preset=preset, overrides=overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stream = build_stream(cfg.scenario, cfg.seed, data_dir, resolve_device(cfg.device))
    pipe = Pipeline(cfg, stream, LocalExecutor(), out, Progress(verbose=not quiet), preset=preset)
    return pipe.run(), pipe


def row(label: str, res: dict[str, Any]) -> str:
    return (
        f"{label:28s}{res['acc']:8.2f}{res['bwt']:8.2f}{res['capacity_pct']:12.2f}"
        f"{res.get('shared_pct', 0.0):10.2f}{res['heads_pct']:9.2f}{res['packed_bytes']:11,d}"
        f"{res['task_inference_acc']:8.2f}{res['class_incremental_acc']:8.2f}"
        f"{res['seconds_total']:9.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pmnist")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="run dir (default bench/out/<preset>-<time>)")
    ap.add_argument("--json", default=None, help="summary JSON (default bench/results/...)")
    ap.add_argument("--label", default="", help="tag for the summary")
    ap.add_argument(
        "--sharing",
        action="store_true",
        help="also run the same settings with TinySubNets weight sharing, for a side-by-side row",
    )
    ap.add_argument(
        "--arm",
        action="append",
        default=[],
        help="another run with more overrides, 'LABEL=key=value;key=value', side by side",
    )
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"bench/out/{args.preset}-{stamp}")
    arms: list[tuple[str, list[str]]] = [(f"qpacknet {args.preset}", args.overrides)]
    if args.sharing:
        arms.append(("  + weight sharing", [*args.overrides, "sharing.enabled=true"]))
    for arm in args.arm:
        label, _, sets = arm.partition("=")
        if not sets:
            ap.error(f"--arm {arm!r}: expected LABEL=key=value;key=value")
        arms.append((f"  + {label}", [*args.overrides, *sets.split(";")]))
    results: list[tuple[str, dict[str, Any]]] = []
    for i, (label, overrides) in enumerate(arms):
        res, pipe = run_arm(args.preset, overrides, args.data_dir, out / f"arm{i}", args.quiet)
        print()
        print(f"{label}:")
        print(pipe.matrix.table())
        results.append((label, res))

    print()
    print(
        f"{'':28s}{'ACC %':>8s}{'BWT':>8s}{'capacity %':>12s}{'shared %':>10s}{'heads %':>9s}"
        f"{'bytes':>11s}{'TI %':>8s}{'CIL %':>8s}{'wall s':>9s}"
    )
    print(
        f"{'Ada-QPacknet (paper)':28s}{PAPER['acc']:8.2f}{PAPER['bwt']:8.2f}"
        f"{PAPER['capacity_pct']:12.2f}"
    )
    for label, res in results:
        print(row(label, res))
    print("TI: task inferred right without a task id; CIL: class-incremental accuracy")
    base = results[0][1]
    print(
        f"ratio ours/paper: ACC {base['acc'] / PAPER['acc']:.4f}, "
        f"capacity {base['capacity_pct'] / PAPER['capacity_pct']:.4f}"
    )
    if args.sharing:
        shared = results[1][1]
        print(
            f"sharing on/off: ACC {shared['acc'] / base['acc']:.4f}, "
            f"capacity {shared['capacity_pct'] / base['capacity_pct']:.4f}, "
            f"bytes {shared['packed_bytes'] / base['packed_bytes']:.4f}"
        )
    for label, res in results[1:]:
        print(
            f"{label.strip()} / first: ACC {res['acc'] / base['acc']:.4f}, capacity "
            f"{res['capacity_pct'] / base['capacity_pct']:.4f}, bytes "
            f"{res['packed_bytes'] / base['packed_bytes']:.4f}"
        )
    print("validation only (what a setting may be chosen by):")
    for label, res in results:
        floats = [t["float_acc"] for t in res["tasks"]]
        print(
            f"  {label.strip()}: val ACC {res['val_acc']:.2f}, float networks' val acc mean "
            f"{sum(floats) / len(floats):.2f} (min {min(floats):.2f}, max {max(floats):.2f})"
        )
    for label, res in results:
        tp = res["throughput"]
        print(
            f"{label.strip()}: bits per task {[report_widths(t) for t in res['tasks']]}; "
            f"{tp['candidate_epochs_per_second']:.2f} candidate-epochs/s; "
            f"{100 * tp['non_training_fraction']:.1f}% of wall time outside SEARCH+TRAIN "
            "(stages: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in res["seconds_by_stage"].items())
            + ")"
        )

    def summarise(label: str, res: dict[str, Any]) -> dict[str, Any]:
        keys = ("acc", "val_acc", "bwt", "capacity_pct", "heads_pct", "shared_pct")
        keys += ("packed_bytes",)
        keys += ("task_inference_acc", "class_incremental_acc", "seconds_total", "throughput")
        return {
            "label": label.strip(),
            **{k: res[k] for k in keys},
            "bits": [t["bit_width"] for t in res["tasks"]],
            "bit_widths": [t.get("bit_widths") for t in res["tasks"]],
            "float_val_acc": [t["float_acc"] for t in res["tasks"]],
        }

    summary = {
        "benchmark": "pmnist",
        "label": args.label,
        "preset": args.preset,
        "overrides": args.overrides,
        "paper": PAPER,
        **summarise(*results[0]),
        "arms": [summarise(label, res) for label, res in results],
        "hardware": base["hardware"],
        "results": [res for _, res in results],
    }
    path = Path(args.json or f"bench/results/{args.preset}-{stamp}.json")
    atomic_write_json(path, summary)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
