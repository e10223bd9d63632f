"""Wall time per pipeline stage of a split CIFAR-100 run on synthetic data of the real size.

Writes a synthetic CIFAR-100 in the official on-disk format (``cifar-100-python/{train,test,
meta}``: python pickles with ``data`` uint8 ``[N, 3072]`` and ``fine_labels``, as
:mod:`qpacknet.scenarios.cifar` reads them) at the real size (50 000 training and 10 000 test
images, 100 classes, 32×32×3) into a temporary folder, then runs the real entry point

    python -m qpacknet run --preset cifar100-quick --data-dir <tmp> \\
        --set scenario.num_tasks=3 --out <tmp>/run --no-tracking --executor local

as a subprocess and reads its ``results.json``: prints the seconds of every stage (data,
search, train, quantize, commit, evaluate, task inference) per task and in total, ACC, BWT,
capacity, the chosen bit widths and candidate-epochs per second, and writes them as JSON (by
default ``bench/results/stages-<device>.json``).

The images are learnable but not trivially: every class has a random 4×4×3 colour pattern
(blown up to 32×32); an image is its class's pattern plus per-image noise in the same 4×4×3
grid plus per-pixel noise, so accuracy is well above chance (10 % per task) and below 100 %,
and the quantisation's bit-width search meets realistic accuracy drops.

Stage times depend strongly on other load on the machine, TRAIN (one small network, many small
kernels) most: the load averages before and after the run are printed and saved, so that a run
on a busy machine can be told apart from one on an idle machine.

Works without Ray and MLflow installed (neither is imported here; ``--executor local`` is the
default and ``--no-tracking`` is always passed), e.g. on a GPU machine:

    python bench/stages.py [--tasks 3] [--preset cifar100-quick] [--executor local|ray]
        [--device auto|cpu|cuda] [--set scenario.train_limit=500 ...] [--quiet]
        [--work-dir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("data", "search", "train", "quantize", "commit", "evaluate", "task_inference")
LABELS = {"task_inference": "infer"}  # the stage without task ids (class-incremental)
CLASSES = 100
TRAIN_PER_CLASS = 500
TEST_PER_CLASS = 100
GRID = 4  # the class pattern's resolution (GRID × GRID × 3, blown up to 32 × 32)
PATTERN_SCALE = 40.0  # pixel units per unit of the pattern
IMAGE_NOISE = 2.5  # per-image noise in the pattern grid, in pattern units
PIXEL_NOISE = 30.0  # per-pixel noise, in pixel units


def _pickle(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(entry, protocol=2))


def _images(labels: np.ndarray, patterns: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[N, 3072]`` (red, green, blue planes of 32×32) for the class ``labels``."""
    out = np.empty((len(labels), 3 * 32 * 32), dtype=np.uint8)
    block = 32 // GRID
    for i in range(0, len(labels), 5000):
        y = labels[i : i + 5000]
        grid = patterns[y] + IMAGE_NOISE * rng.standard_normal(patterns[y].shape, np.float32)
        img = np.repeat(np.repeat(grid, block, axis=2), block, axis=3)  # [n, 3, 32, 32]
        img = 128.0 + PATTERN_SCALE * img
        img += PIXEL_NOISE * rng.standard_normal(img.shape, np.float32)
        out[i : i + 5000] = np.clip(np.rint(img), 0, 255).astype(np.uint8).reshape(len(y), -1)
    return out


def write_cifar100(root: Path, seed: int = 0) -> Path:
    """A synthetic CIFAR-100 of the real size under ``root/cifar-100-python``; rows interleave
    the classes in a random order, as in the release."""
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((CLASSES, 3, GRID, GRID), np.float32)
    folder = root / "cifar-100-python"
    for name, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        fine = rng.permutation(np.repeat(np.arange(CLASSES), per_class))
        entry = {
            "filenames": [f"synthetic_{name}_{i}.png" for i in range(len(fine))],
            "batch_label": f"synthetic {name} batch 1 of 1",
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "data": _images(fine, patterns, rng),
        }
        _pickle(folder / name, entry)
    meta = {
        "fine_label_names": [f"class{c}" for c in range(CLASSES)],
        "coarse_label_names": [f"superclass{c}" for c in range(CLASSES // 5)],
    }
    _pickle(folder / "meta", meta)
    return root


def resolve(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu`` (as the pipeline decides)."""
    from qpacknet.pipeline import resolve_device

    return str(resolve_device(device))


def table(res: dict[str, Any], log: Callable[[str], None]) -> None:
    """Seconds per stage per task and in total, plus per-task outcome."""
    head = f"{'task':>5s} " + " ".join(f"{LABELS.get(s, s):>9s}" for s in STAGES)
    log(head + f" {'total':>9s} {'bits':>4s} {'cap %':>6s} {'val acc':>8s} {'q acc':>7s}")
    for t in res["tasks"]:
        sec = t["seconds"]
        log(
            f"{t['task']:5d} "
            + " ".join(f"{sec.get(s, 0.0):9.1f}" for s in STAGES)
            + f" {sum(sec.values()):9.1f} {t['bit_width']:4d} {t['capacity_pct']:6.2f}"
            + f" {t['float_acc']:8.2f} {t['quant_acc']:7.2f}"
        )
    tot = res["seconds_by_stage"]
    log(
        f"{'all':>5s} "
        + " ".join(f"{tot.get(s, 0.0):9.1f}" for s in STAGES)
        + f" {sum(tot.values()):9.1f}"
    )
    total = sum(tot.values())
    log(f"{'share':>5s} " + " ".join(f"{100 * tot.get(s, 0.0) / total:8.1f}%" for s in STAGES))
    log("cap %: the task's own share of the capacity; val acc: float, q acc: quantised (val)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--preset", default="cifar100-quick")
    ap.add_argument("--executor", choices=["local", "ray"], default="local")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed on to qpacknet run (e.g. scenario.train_limit=500)",
    )
    ap.add_argument("--quiet", action="store_true", help="no per-epoch lines from the run")
    ap.add_argument("--work-dir", help="keep data and run here instead of a temporary folder")
    ap.add_argument("--json", help="default: bench/results/stages-<device>.json")
    args = ap.parse_args()

    device = resolve(args.device)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory(prefix="qpacknet-stages-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if not (work / "cifar-100-python" / "meta").is_file():
            write_cifar100(work)
        write_seconds = time.perf_counter() - t0
        log(f"synthetic CIFAR-100 in {work / 'cifar-100-python'} ({write_seconds:.1f}s)")
        out = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
        cmd = [sys.executable, "-m", "qpacknet", "run", "--preset", args.preset]
        cmd += ["--data-dir", str(work), "--out", str(out), "--no-tracking"]
        cmd += ["--executor", args.executor, "--set", f"scenario.num_tasks={args.tasks}"]
        cmd += ["--set", f"device={device}"]
        for o in args.overrides:
            cmd += ["--set", o]
        if args.quiet:
            cmd.append("--quiet")
        log("$ " + " ".join(cmd))
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(cmd)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
        if proc.returncode != 0:
            raise SystemExit(f"qpacknet run failed with exit code {proc.returncode}")
        res = json.loads((out / "results.json").read_text())

    cfg = res["config"]
    thr = res["throughput"]
    log(
        f"\npreset {args.preset}, {args.tasks} tasks, executor {res['executor']}, device "
        f"{device}, population {cfg['search']['population']}, epochs "
        f"{cfg['search']['epochs']} + {cfg['train']['epochs']}, train_limit "
        f"{cfg['scenario']['train_limit']}, overrides {args.overrides or 'none'}"
    )
    log("wall seconds per stage (results.json seconds_by_stage and tasks[i].seconds):")
    table(res, log)
    log(
        f"ACC {res['acc']:.2f} %, BWT {res['bwt']:.2f}, capacity {res['capacity_pct']:.2f} % "
        f"(heads {res['heads_pct']:.2f} %), bits {[t['bit_width'] for t in res['tasks']]}"
    )
    log(
        f"without task ids: task inferred right {res['task_inference_acc']:.2f} %, "
        f"class-incremental acc {res['class_incremental_acc']:.2f} %"
    )
    fitting = res["seconds_by_stage"]["search"] + res["seconds_by_stage"]["train"]
    log(
        f"{thr['candidate_epochs']} candidate-epochs in {thr['worker_training_seconds']:.1f}s "
        f"of training steps: {thr['candidate_epochs_per_worker_second']:.3f} candidate-epochs/s "
        f"per worker ({thr['candidate_epochs'] / fitting:.3f} per second of SEARCH + TRAIN "
        "wall time)"
    )
    log(
        f"pipeline {res['seconds_total']:.1f}s, whole command {wall:.1f}s "
        f"(process start, imports and data loading included)"
    )
    log(
        "load average (1, 5, 15 min) before the run "
        + " ".join(f"{v:.2f}" for v in load_before)
        + ", after "
        + " ".join(f"{v:.2f}" for v in load_after)
        + f" on {os.cpu_count()} CPUs (other processes slow every stage, K=1 TRAIN most)"
    )

    from qpacknet.pipeline import hardware

    path = Path(args.json or f"bench/results/stages-{device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "benchmark": "stages",
        "preset": args.preset,
        "tasks": args.tasks,
        "executor": res["executor"],
        "device": device,
        "overrides": args.overrides,
        "train_limit": cfg["scenario"]["train_limit"],
        "data": {
            "kind": "synthetic CIFAR-100, official format and size",
            "train_images": CLASSES * TRAIN_PER_CLASS,
            "test_images": CLASSES * TEST_PER_CLASS,
            "classes": CLASSES,
            "pattern_grid": GRID,
            "pattern_scale": PATTERN_SCALE,
            "image_noise": IMAGE_NOISE,
            "pixel_noise": PIXEL_NOISE,
            "write_seconds": write_seconds,
        },
        "command": cmd,
        "command_wall_seconds": wall,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "pipeline_seconds": res["seconds_total"],
        "seconds_by_stage": res["seconds_by_stage"],
        "per_task": [
            {
                k: t[k]
                for k in (
                    "task",
                    "seconds",
                    "bit_width",
                    "bits_tried",
                    "capacity_pct",
                    "float_acc",
                    "quant_acc",
                    "winner",
                    "candidate_epochs",
                    "training_seconds",
                )
            }
            for t in res["tasks"]
        ],
        "acc": res["acc"],
        "bwt": res["bwt"],
        "capacity_pct": res["capacity_pct"],
        "heads_pct": res["heads_pct"],
        "task_inference_acc": res["task_inference_acc"],
        "class_incremental_acc": res["class_incremental_acc"],
        "accuracy_matrix": res["accuracy_matrix"],
        "throughput": thr,
        "config": cfg,
        "output": lines,
        "run_hardware": res["hardware"],
        "hardware": hardware(device),
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
