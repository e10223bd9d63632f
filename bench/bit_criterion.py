"""Bit-width criteria compared on streams with few validation images per task (issue 11, point 4).

The paper's test (Algorithm 3: accept ψ when ``Q_q >= Q - δ``) counts right answers on the
validation split; with a few dozen validation images a 1-bit codebook can match the float
network's count by luck and lose test accuracy. This runs every ``quantize.criterion``
(``accuracy``, ``loss``, ``agreement``; the last two add their test to the paper's) and, as the
issue's reference, the paper's criterion with ``quantize.psi_min=4`` (``accuracy+psi4``: more
bits, not a criterion) on the same streams with the same seeds through the real entry point
(``qpacknet run --executor local --no-tracking``, in this process). It prints one side-by-side
table: per run the bits of every task, validation accuracy float/quantised, test accuracy
float/quantised (``float_test_acc`` / ``quant_test_acc`` of results.json), the mean test-accuracy
loss ``float_test - quant_test`` and the mean bits; then these two means per stream and
criterion and over all tasks, with the number of tasks whose quantised network lost test
accuracy. The bit choice sees validation data only; the test figures are measured for this
comparison and used for nothing else.

Streams (4 tasks each, so that every weight stays available whatever the widths and SEARCH and
TRAIN are identical across criteria; only QUANTIZE differs):

* ``digits``: the ``digits`` preset (10 classes, 216 validation images per task);
* ``digits-val5``: the same with ``scenario.val_fraction=0.05`` (70 validation images);
* ``pairs``: two-class tasks cut from the digits (3/8, 1/7, 4/9, 2/5; 40 validation, 120 test
  images, the rest, about 230, for training), written by ``bench/digit_pairs.py``;
* ``pairs-few``: the same pairs with 15 training images per class (a less confident network).

    python bench/bit_criterion.py [--seeds 0 1 2] [--json bench/results/bit_criterion-cpu.json]
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

CRITERIA = ("accuracy", "loss", "agreement")
# The reference: the paper's criterion, never below 4 bits (more bits, not a criterion).
REFERENCE = {"accuracy+psi4": ["quantize.criterion=accuracy", "quantize.psi_min=4"]}
CONFIGS = {**{c: [f"quantize.criterion={c}"] for c in CRITERIA}, **REFERENCE}


def streams(work: Path) -> dict[str, list[str]]:
    """Each stream's ``--set`` overrides on top of the ``digits`` preset."""
    from digit_pairs import HARD, write_pairs  # bench/digit_pairs.py

    pairs = write_pairs(work / "pairs", HARD, val_per_class=20, test_per_class=60)
    few = write_pairs(work / "pairs-few", HARD, 20, 60, train_per_class=15)
    npz = ["scenario.name=npz", "scenario.num_tasks=4"]
    return {
        "digits": [],
        "digits-val5": ["scenario.val_fraction=0.05"],
        "pairs": [*npz, f"scenario.path={pairs}"],
        "pairs-few": [*npz, f"scenario.path={few}"],
    }


def run_one(out: Path, overrides: list[str], seed: int) -> dict[str, Any]:
    """One run of the real entry point; its results.json."""
    from qpacknet.cli import main as qpacknet_main

    argv = ["run", "--preset", "digits", "--executor", "local", "--no-tracking", "--quiet"]
    argv += ["--seed", str(seed), "--out", str(out), "--set", "threads=1"]
    for item in overrides:
        argv += ["--set", item]
    with contextlib.redirect_stdout(io.StringIO()):
        code = qpacknet_main(argv)
    if code != 0:
        raise SystemExit(f"qpacknet {' '.join(argv)} exited {code}")
    return json.loads((out / "results.json").read_text())


def val_images(results: dict[str, Any]) -> list[int]:
    """Validation images per task of a finished run's stream (built again from its config)."""
    from qpacknet.config import validate
    from qpacknet.scenarios import build_stream

    cfg = validate(results["config"])
    stream = build_stream(cfg.scenario, cfg.seed, None, "cpu")
    return [len(stream.val_split(t)) for t in range(stream.num_tasks)]


def summarise(stream: str, criterion: str, seed: int, results: dict[str, Any]) -> dict[str, Any]:
    """The figures this comparison reports, per task, from one run's results.json."""
    tasks = [
        {
            "bits": t["bit_width"],
            "val_float": t["float_acc"],
            "val_quant": t["quant_acc"],
            "val_loss_float": t["float_loss"],
            "val_loss_quant": t["quant_loss"],
            "agreement": t["agreement"],
            "test_float": t["float_test_acc"],
            "test_quant": t["quant_test_acc"],
            "accepted": t["within_delta"],
        }
        for t in results["tasks"]
    ]
    return {
        "stream": stream,
        "criterion": criterion,
        "seed": seed,
        "val_images": val_images(results),
        "tasks": tasks,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _loss(tasks: list[dict[str, Any]]) -> float:
    return _mean([t["test_float"] - t["test_quant"] for t in tasks])


def _bits(tasks: list[dict[str, Any]]) -> float:
    return _mean([float(t["bits"]) for t in tasks])


def _cells(values: list[float], fmt: str) -> str:
    return " ".join(format(v, fmt) for v in values)


def table(runs: list[dict[str, Any]]) -> str:
    """Per run, then per stream and criterion, then per criterion over all tasks."""
    head = (
        f"{'stream':<12} {'criterion':<13} {'seed':>4}  {'bits':<8}  {'val acc float':<24}  "
        f"{'val acc quant':<24}  {'test acc float':<24}  {'test acc quant':<24}  "
        f"{'loss':>5} {'bits':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        ts = r["tasks"]
        lines.append(
            f"{r['stream']:<12} {r['criterion']:<13} {r['seed']:>4}  "
            f"{_cells([t['bits'] for t in ts], 'd'):<8}  "
            f"{_cells([t['val_float'] for t in ts], '5.1f'):<24}  "
            f"{_cells([t['val_quant'] for t in ts], '5.1f'):<24}  "
            f"{_cells([t['test_float'] for t in ts], '5.1f'):<24}  "
            f"{_cells([t['test_quant'] for t in ts], '5.1f'):<24}  "
            f"{_loss(ts):5.2f} {_bits(ts):5.2f}"
        )
    lines += [
        "",
        "mean test-acc loss (float - quant, points) / mean bits / tasks that lost test accuracy",
        "",
    ]
    names = list(dict.fromkeys(r["stream"] for r in runs))
    lines.append(f"{'stream':<12} " + " ".join(f"{c:>19}" for c in CONFIGS))
    for name in [*names, "all"]:
        cells = []
        for c in CONFIGS:
            ts = [
                t
                for r in runs
                if r["criterion"] == c and name in (r["stream"], "all")
                for t in r["tasks"]
            ]
            worse = sum(t["test_quant"] < t["test_float"] for t in ts)
            cells.append(f"{_loss(ts):5.2f} / {_bits(ts):4.2f} / {worse:2d}")
        lines.append(f"{name:<12} " + " ".join(f"{x:>19}" for x in cells))
    return "\n".join(lines)


def totals(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for c in CONFIGS:
        ts = [t for r in runs if r["criterion"] == c for t in r["tasks"]]
        worse = sum(t["test_quant"] < t["test_float"] for t in ts)
        out[c] = {"tasks": len(ts), "test_acc_loss": _loss(ts), "bits": _bits(ts)}
        out[c]["tasks_losing_test_acc"] = worse
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--json",
        type=Path,
        default=BENCH / "results" / "bit_criterion-cpu.json",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    load = os.getloadavg()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qpacknet-bitcrit-") as tmp:
        work = Path(tmp)
        for stream, overrides in streams(work).items():
            for seed in args.seeds:
                for c, settings in CONFIGS.items():
                    out = work / f"{stream}-{seed}-{c}"
                    results = run_one(out, [*overrides, *settings], seed)
                    runs.append(summarise(stream, c, seed, results))
    text = table(runs)
    print(text)
    seconds = time.perf_counter() - started
    print(f"\n{len(runs)} runs in {seconds:.0f} s (load average before: {load[0]:.2f})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "seeds": args.seeds,
        "configs": CONFIGS,
        "runs": runs,
        "totals": totals(runs),
        "table": text,
        "seconds": seconds,
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
    }
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
