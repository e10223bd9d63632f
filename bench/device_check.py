"""GPU device check: the whole GPU path end to end in one short run, one JSON file.

Why: a GPU machine is lent to this project only now and then, for minutes (issue 10, point 7).
This script is ready for that day: one command that, in under 8 minutes on one NVIDIA H200,
exercises every GPU code path a user's run takes and writes everything it saw into ONE JSON
file, so that the one lease answers "does it work on a GPU, and how fast?" without a second try.

It runs, in order, each part timed, each with its figures in the JSON:

1. **population** -- the population bench (``bench/population.py``, imported): 16 candidates as
   one population vs one after another, for the p-MNIST MLP (preset ``pmnist``) and the reduced
   AlexNet (preset ``cifar100``, contiguous and channels-last): seq/pop ratio per backbone and
   the accuracy/loss agreement of the two arms.
2. **pmnist** -- p-MNIST with the paper settings (preset ``pmnist``: P_S 16, E_short 5, E_full 50,
   ...) for as many tasks as fit ``--pmnist-seconds``. The task count grows one task at a time
   (``scenario.num_tasks`` = 1, 2, ...), each step a :class:`qpacknet.pipeline.Pipeline` with the
   in-process :class:`qpacknet.executor.LocalExecutor` that resumes the same output folder. Why
   this and not an observer that raises to stop: every step ends with a complete, valid
   ``results.json`` written by the pipeline itself (nothing is read back from a half-finished
   run), the decision to start another task is taken before it starts (the next task is
   predicted to take as long as the slowest step so far), and resuming -- a user-facing feature
   -- is exercised on the GPU on the way. Per task: seconds by stage, bit width, accuracy-matrix
   row, ACC and BWT after it, capacity, candidate-epochs/s, the commit digest when the pipeline
   records one, and the device actually used.
3. **cifar100** -- 2 tasks of preset ``cifar100-quick`` on synthetic data of the real shape and
   size written in the official CIFAR-100 python format (``bench/stages.py``'s writer).

Checks (``"checks"`` in the JSON, each ``{"passed": bool, "detail": str}``): each part ran; BWT
is exactly 0 and no accuracy-matrix entry of an earlier task ever changed; every COMMIT passed
(the pipeline raises when one fails) and every task report holds what the pipeline records;
the saved model file, loaded again, reproduces the last matrix row bit for bit; the device the
pipeline used is the one asked for; population and one-by-one training agree to float rounding
(tolerance below); neither ``ray`` nor ``mlflow`` was imported (the GPU machine has neither).
The JSON is rewritten atomically (temporary file, then ``os.replace``) after every part, so a
run killed at its time limit still leaves what it had; it also holds the hardware
(``qpacknet.pipeline.hardware``), torch/CUDA/cuDNN versions, device name, wall seconds per part
and in total, the mode and whether real MNIST was used. The exit code is 1 when any check
failed or any part raised (the message and traceback are in ``"errors"``), else 0.

Data. p-MNIST reads ``<data-dir>/MNIST/raw`` (torchvision layout). When any of the four files is
missing there, synthetic MNIST-shaped data (learnable class patterns plus noise, 28x28 uint8,
60 000 + 10 000 rows) are written in the same idx format into the work folder and used instead;
the JSON says which (``"mnist": {"real": ...}``). Nothing is downloaded.

Time. ``--budget-seconds`` (default 450) bounds the whole run: the p-MNIST part gets
``min(--pmnist-seconds, what is left minus a reserve for part 3)``, and a hard deadline
(``SIGALRM`` at the budget plus 30 s: 8 minutes with the defaults) stops a part that is still
running, records it as out of time, skips the parts after it and still writes the JSON.
Population agreement tolerance: per-candidate validation accuracy within
``max(2 points, 3 validation rows)`` and mean training loss within 5 % relative -- the arms run
different kernels (grouped vs plain convolutions, batched vs plain matrix products, TF32 where
allowed), so they agree to rounding, not bit for bit; mixing candidates (the bug this guards
against) gives far larger differences.

Here (CPU), a smoke run in well under a minute (``tests/test_device_check.py`` runs it)::

    .venv/bin/python bench/device_check.py --device cpu --smoke --json /tmp/device-check.json

On the GPU machine (no ray, mlflow, pydantic, ... and no internet there; it has Python 3.12,
torch 2.11, torchvision 0.26, numpy, scikit-learn). Once, here, in the repository root, fetch
the missing wheels (and, optionally, real MNIST, 11 MiB; without it the check uses synthetic
MNIST-shaped data)::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        --platform manylinux1_x86_64 -d .whl pydantic==2.14.3 pydantic-core==2.50.4 \\
        annotated-types==0.8.0 typing-extensions==4.16.0 typing-inspection==0.4.5 \\
        pyyaml==6.0.3 safetensors==0.8.0
    echo /.mnist/ >> .git/info/exclude
    mkdir -p .mnist/MNIST/raw && cp ../shared/data/MNIST/raw/*.gz .mnist/MNIST/raw/

(qpacknet.config needs pydantic -- with pydantic-core, annotated-types, typing-extensions >= 4.16
and typing-inspection -- and pyyaml; qpacknet.pipeline needs pyyaml; qpacknet.store needs
safetensors. The machine's image lists pyyaml, safetensors and typing-extensions already, but
pydantic 2.14 needs typing-extensions >= 4.16, and carrying the pinned pyyaml and safetensors
costs 1.3 MiB and removes the guess.) Then one device call, ``carry`` = ``[".whl", ".mnist"]``,
``timeout_s`` = 600 (the run itself stays under 8 minutes)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/device_check.py --device cuda \\
        --data-dir .mnist --json $OUT/device_check.json 2>&1 | tee $OUT/device_check.log

(the same as one line in ``bench/DEVICE.md``; ``$OUT/device_check.json`` is the one result, the
log beside it the printed lines).

    python bench/device_check.py [--device auto|cpu|cuda] [--smoke] [--json PATH]
        [--data-dir DIR] [--budget-seconds S] [--pmnist-seconds S] [--pmnist-max-tasks N]
        [--threads N] [--work-dir DIR] [--verbose]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

START = time.perf_counter()
# What qpacknet.devices.configure sets before a run's first CUDA call; cuBLAS reads it when its
# handle is created, which here is in part 1, before any pipeline has configured anything.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (str(ROOT), str(BENCH)):  # qpacknet from the source tree; the bench modules beside us
    if _p not in sys.path:
        sys.path.insert(0, _p)

PARTS = ("population", "pmnist", "cifar100")
FORBIDDEN = ("ray", "mlflow")
HARD_GRACE_S = 30.0  # the hard deadline is the budget plus this (450 + 30 s: 8 minutes)
CIFAR_RESERVE_S = {"full": 90.0, "smoke": 10.0}  # kept back from the p-MNIST budget for part 3
TASK_KEYS = (
    "task",
    "bit_width",
    "density",
    "candidates",
    "winner",
    "float_acc",
    "quant_acc",
    "capacity_pct",
    "seconds",
    "candidate_epochs",
    "training_seconds",
)
SYNTH_MNIST = {"full": (60000, 10000), "smoke": (3000, 1000)}  # train, test rows


@dataclass(frozen=True)
class Mode:
    """Sizes of one mode: ``full`` (the paper settings, for the GPU) or ``smoke`` (CPU, tiny)."""

    name: str
    candidates: dict[str, int]  # population bench: K per backbone
    repeats: int
    rows: dict[str, float]  # population bench: multiplier of each backbone's default rows
    channels_last: str
    pmnist_overrides: tuple[str, ...]
    pmnist_max_tasks: int | None  # None: the preset's task count
    cifar_overrides: tuple[str, ...]
    cifar_per_class: tuple[int, int] | None  # synthetic CIFAR-100 train/test images per class
    budget_seconds: float
    pmnist_seconds: float
    threads: int | None  # torch CPU threads; None: torch's default


MODES = {
    "full": Mode(
        name="full",
        candidates={"mlp": 16, "alexnet": 16},
        repeats=2,
        rows={"mlp": 0.25, "alexnet": 4.0},  # 13 500 MNIST rows; 2 048 CIFAR-shaped rows
        channels_last="both",
        pmnist_overrides=(),
        pmnist_max_tasks=None,
        cifar_overrides=(),
        cifar_per_class=None,  # the real size: 500 + 100 per class
        budget_seconds=450.0,
        pmnist_seconds=240.0,
        threads=None,
    ),
    "smoke": Mode(
        name="smoke",
        candidates={"mlp": 4, "alexnet": 2},  # a 2-core CPU under load: keep it short
        repeats=1,
        rows={"mlp": 0.005, "alexnet": 0.125},  # 270 and 64 rows
        channels_last="off",
        pmnist_overrides=(
            "search.population=4",
            "search.epochs=1",
            "train.epochs=2",
            "scenario.train_limit=500",
            "quantize.kmeans_iters=10",
            "quantize.delta=5.0",  # fewer bit widths tried
        ),
        pmnist_max_tasks=2,
        cifar_overrides=(
            "search.population=2",
            "train.epochs=3",
            "train.lr=0.05",  # tiny tasks still learn well above chance (10 %)
            "scenario.train_limit=300",
            "net.width=0.25",
            "quantize.kmeans_iters=10",
            "quantize.delta=5.0",
        ),
        cifar_per_class=(40, 10),
        budget_seconds=120.0,
        pmnist_seconds=60.0,
        # A correctness run, not a timing: on a shared 2-core machine one thread avoids
        # oversubscription (measured under load: 22 s with 1 thread, 75 s with 2).
        threads=1,
    ),
}


class OutOfTime(Exception):
    """The hard deadline passed while a part was running."""


@dataclass
class Report:
    """The JSON document, rewritten atomically after every part."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, passed: bool, detail: str = "") -> bool:
        self.data.setdefault("checks", {})[name] = {"passed": bool(passed), "detail": detail}
        return bool(passed)

    def error(self, part: str, exc: BaseException) -> None:
        self.data.setdefault("errors", {})[part] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc)),
        }

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.data.get("checks", {}).items() if not v["passed"]]

    def write(self) -> None:
        self.data["passed"] = not self.failed and not self.data.get("errors")
        self.data["seconds"]["total"] = time.perf_counter() - START
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.data, fh, indent=2, default=str)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass
class Context:
    """What the parts share."""

    args: argparse.Namespace
    mode: Mode
    device: str
    work: Path
    report: Report
    deadline: float  # perf_counter value of the soft budget's end
    mnist_root: Path | None = None
    log_lines: list[str] = field(default_factory=list)

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.log_lines.append(line)

    def left(self) -> float:
        return self.deadline - time.perf_counter()


# --------------------------------------------------------------------------------------------
# data


def _write_idx(path: Path, arr: Any) -> None:
    """One uint8 idx file (the MNIST release format: magic 0x0000080N, big-endian dims)."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.tobytes())


def write_synthetic_mnist(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """MNIST-shaped synthetic data in ``root/MNIST/raw`` (plain idx files): every class has a
    random 7x7 pattern blown up to 28x28; an image is its class's pattern plus per-image noise
    in the pattern grid plus per-pixel noise, so an MLP learns it well but not perfectly."""
    import numpy as np

    from qpacknet.scenarios.mnist_files import (
        TEST_IMAGES,
        TEST_LABELS,
        TRAIN_IMAGES,
        TRAIN_LABELS,
        raw_dir,
    )

    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((10, 7, 7)).astype(np.float32)
    folder = raw_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    for images, labels, n in (
        (TRAIN_IMAGES, TRAIN_LABELS, train),
        (TEST_IMAGES, TEST_LABELS, test),
    ):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = np.empty((n, 28, 28), dtype=np.uint8)
        for i in range(0, n, 10000):
            yy = y[i : i + 10000]
            grid = patterns[yy] + 1.8 * rng.standard_normal((len(yy), 7, 7), np.float32)
            img = np.repeat(np.repeat(grid, 4, axis=1), 4, axis=2)
            img = 80.0 + 40.0 * img + 40.0 * rng.standard_normal(img.shape, np.float32)
            x[i : i + 10000] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        _write_idx(folder / images, x)
        _write_idx(folder / labels, y)
    return root


def mnist_source(ctx: Context) -> dict[str, Any]:
    """Real MNIST under ``--data-dir`` (else ``$QPACKNET_DATA``, else ``./data``) when all four
    files are there; otherwise synthetic MNIST-shaped files written into the work folder."""
    from qpacknet.scenarios.datadir import resolve_data_dir
    from qpacknet.scenarios.mnist_files import missing_files

    root = resolve_data_dir(ctx.args.data_dir)
    missing = missing_files(root)
    if not missing:
        ctx.mnist_root = root
        return {"real": True, "dir": str(root)}
    t0 = time.perf_counter()
    train, test = SYNTH_MNIST[ctx.mode.name]
    ctx.mnist_root = write_synthetic_mnist(ctx.work / "synthetic-mnist", train, test)
    return {
        "real": False,
        "dir": str(ctx.mnist_root),
        "note": (
            f"real MNIST not found in {root}/MNIST/raw (missing {', '.join(missing)}); "
            f"synthetic MNIST-shaped data used ({train} train + {test} test rows, 28x28 uint8)"
        ),
        "write_seconds": time.perf_counter() - t0,
    }


@contextlib.contextmanager
def cifar_size(module: ModuleType, per_class: tuple[int, int] | None) -> Iterator[None]:
    """Temporarily shrink ``bench/stages.py``'s synthetic CIFAR-100 (its size is two module
    constants, read when :func:`write_cifar100` runs); ``None`` keeps the real size."""
    if per_class is None:
        yield
        return
    saved = module.TRAIN_PER_CLASS, module.TEST_PER_CLASS
    module.TRAIN_PER_CLASS, module.TEST_PER_CLASS = per_class
    try:
        yield
    finally:
        module.TRAIN_PER_CLASS, module.TEST_PER_CLASS = saved


# --------------------------------------------------------------------------------------------
# checks shared by the pipeline parts


def run_pipeline(
    ctx: Context, preset: str, overrides: list[str], stream: Any, out: Path
) -> dict[str, Any]:
    """One :class:`Pipeline` run (in-process executor, no tracking); its results.json content."""
    from qpacknet.config import load_config
    from qpacknet.executor import LocalExecutor
    from qpacknet.pipeline import Pipeline
    from qpacknet.progress import Progress

    cfg = load_config(preset, None, overrides)
    progress = Progress(verbose=ctx.args.verbose)
    return Pipeline(cfg, stream, LocalExecutor(), out, progress, preset=preset).run()


def base_overrides(device: str) -> list[str]:
    return ["tracking.enabled=false", "executor.kind=local", f"device={device}"]


def task_figures(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task: what the device check reports of ``results.json``'s ``tasks`` entries."""
    out = []
    for t, rep in enumerate(res["tasks"]):
        tr = rep.get("training_seconds") or 0.0
        fig = {
            "task": rep.get("task"),
            "seconds": rep.get("seconds"),
            "bit_width": rep.get("bit_width"),
            "accuracy_row": res["accuracy_matrix"][t],
            "capacity_pct": rep.get("capacity_pct"),
            "float_acc": rep.get("float_acc"),
            "quant_acc": rep.get("quant_acc"),
            "winner": rep.get("winner"),
            "candidate_epochs": rep.get("candidate_epochs"),
            "candidate_epochs_per_second": rep.get("candidate_epochs", 0) / tr if tr else None,
        }
        if "commit_digest" in rep:
            fig["commit_digest"] = rep["commit_digest"]
        out.append(fig)
    return out


def check_run(
    ctx: Context, label: str, res: dict[str, Any], tasks: int, out: Path, stream: Any
) -> None:
    """BWT exactly 0, frozen earlier entries, complete task reports, right device, and the saved
    model file reproducing the last matrix row bit for bit."""
    rep = ctx.report
    matrix = res["accuracy_matrix"]
    rep.check(f"{label}_bwt_zero", res["bwt"] == 0.0, f"BWT {res['bwt']!r}")
    changed = [(i, j) for i in range(len(matrix)) for j in range(i) if matrix[i][j] != matrix[j][j]]
    shape_ok = [len(r) for r in matrix] == list(range(1, tasks + 1))
    rep.check(
        f"{label}_matrix_frozen",
        shape_ok and not changed,
        f"rows {[len(r) for r in matrix]}, entries that changed after their task: {changed}",
    )
    problems = []
    cfg = res["config"]["quantize"]
    if len(res["tasks"]) != tasks:
        problems.append(f"{len(res['tasks'])} task reports for {tasks} tasks")
    for t, task in enumerate(res["tasks"]):
        missing = [k for k in TASK_KEYS if k not in task]
        if missing:
            problems.append(f"task {t} lacks {missing}")
            continue
        if task["task"] != t:
            problems.append(f"report {t} is for task {task['task']}")
        if not cfg["psi_min"] <= task["bit_width"] <= cfg["b_max"]:
            problems.append(f"task {t} bit width {task['bit_width']}")
        if not (math.isfinite(task["float_acc"]) and math.isfinite(task["quant_acc"])):
            problems.append(f"task {t} accuracies {task['float_acc']}, {task['quant_acc']}")
    digests = sum("commit_digest" in t for t in res["tasks"])
    rep.check(
        f"{label}_commits",
        not problems,
        "; ".join(problems)
        or f"{tasks} tasks committed (the pipeline checks every COMMIT and raises on a "
        f"mismatch), each report complete; commit_digest recorded for {digests} of {tasks}",
    )
    used = res.get("hardware", {}).get("device")
    rep.check(
        f"{label}_device", used == ctx.device, f"pipeline device {used!r}, asked {ctx.device!r}"
    )

    from qpacknet.layout import MODEL_FILE
    from qpacknet.model import PackedModel
    from qpacknet.store import load_store

    model_file = out / MODEL_FILE
    batch = res["config"]["train"]["eval_batch_size"]
    model = PackedModel(load_store(model_file), ctx.device, batch)
    again = [model.accuracy(j, stream.test_split(j)) for j in range(model.num_tasks)]
    rep.check(
        f"{label}_model_reload",
        model.num_tasks == tasks and again == matrix[-1],
        f"{model_file.name} reloaded on {ctx.device}: {again} vs last row {matrix[-1]}",
    )


# --------------------------------------------------------------------------------------------
# the three parts


def part_population(ctx: Context) -> dict[str, Any]:
    import population as bench  # bench/population.py

    mode = ctx.mode
    out: dict[str, Any] = {
        "ratio": bench.RATIO,
        "candidates": dict(mode.candidates),
        "repeats": mode.repeats,
        "epochs": 1,
        "backbones": {},
    }
    for name, rows in mode.rows.items():
        b = bench.BACKBONES[name]
        args = argparse.Namespace(
            candidates=mode.candidates[name],
            epochs=1,
            repeats=mode.repeats,
            rows=rows,
            channels_last=mode.channels_last if name != "mlp" else "off",
            data_dir=str(ctx.mnist_root) if name == "mlp" and ctx.mnist_root else None,
            device=ctx.device,
        )
        t0 = time.perf_counter()
        res = bench.bench_backbone(b, args, ctx.device, ctx.log)
        res["seconds"] = time.perf_counter() - t0
        out["backbones"][name] = res
        val_rows = res["val_rows"]
        acc_tol = max(2.0, 300.0 / val_rows)
        for lay, fig in res["layouts"].items():
            acc_d = fig["max_val_acc_difference_points"]
            loss_d = fig["max_relative_loss_difference"]
            ctx.report.check(
                f"population_agreement_{name}_{lay}",
                acc_d <= acc_tol and loss_d <= 0.05,
                f"val acc difference {acc_d:.4f} points (<= {acc_tol:.2f}), relative loss "
                f"difference {loss_d:.2e} (<= 5e-2), seq/pop ratio {fig['median_ratio']:.3f}",
            )
    out["summary"] = {
        name: {lay: fig["median_ratio"] for lay, fig in res["layouts"].items()}
        for name, res in out["backbones"].items()
    }
    return out


def part_pmnist(ctx: Context) -> dict[str, Any]:
    from qpacknet.config import load_config
    from qpacknet.scenarios import build_stream

    mode = ctx.mode
    budget = min(
        ctx.args.pmnist_seconds if ctx.args.pmnist_seconds is not None else mode.pmnist_seconds,
        ctx.left() - CIFAR_RESERVE_S[mode.name],
    )
    overrides = [*base_overrides(ctx.device), *mode.pmnist_overrides]
    cfg = load_config("pmnist", None, overrides)
    max_tasks = ctx.args.pmnist_max_tasks or mode.pmnist_max_tasks or cfg.scenario.num_tasks
    stream_cfg = cfg.scenario.model_copy(update={"num_tasks": max_tasks})
    t0 = time.perf_counter()
    stream = build_stream(stream_cfg, cfg.seed, str(ctx.mnist_root), ctx.device)
    data_seconds = time.perf_counter() - t0
    out_dir = ctx.work / "pmnist-run"
    start = time.perf_counter()
    steps: list[dict[str, Any]] = []
    res: dict[str, Any] | None = None
    stop = f"all {max_tasks} tasks learned"
    for k in range(1, max_tasks + 1):
        spent = time.perf_counter() - start
        if steps:
            predicted = 1.05 * max(s["wall_seconds"] for s in steps)
            if spent + predicted > budget:
                stop = (
                    f"budget: {spent:.0f}s spent + {predicted:.0f}s predicted for task {k} "
                    f"> {budget:.0f}s"
                )
                break
        t1 = time.perf_counter()
        res = run_pipeline(ctx, "pmnist", [*overrides, f"scenario.num_tasks={k}"], stream, out_dir)
        wall = time.perf_counter() - t1
        task = res["tasks"][-1]
        steps.append(
            {
                "tasks": k,
                "wall_seconds": wall,
                "acc": res["acc"],
                "bwt": res["bwt"],
                "capacity_pct": res["capacity_pct"],
            }
        )
        ctx.log(
            f"  p-MNIST task {k}: {wall:.1f}s ("
            + ", ".join(f"{s} {v:.1f}" for s, v in task["seconds"].items())
            + f"), {task['bit_width']} bits, ACC {res['acc']:.2f}, BWT {res['bwt']}, "
            f"capacity {res['capacity_pct']:.2f} %"
        )
    assert res is not None
    tasks = len(res["tasks"])
    check_run(ctx, "pmnist", res, tasks, out_dir, stream)
    need = 2 if mode.name == "smoke" else 1
    ctx.report.check(
        "pmnist_tasks",
        tasks >= need,
        f"{tasks} tasks learned in a budget of {budget:.0f}s (at least {need} expected); {stop}",
    )
    return {
        "preset": "pmnist",
        "overrides": overrides,
        "config": res["config"],
        "budget_seconds": budget,
        "stream_seconds": data_seconds,
        "tasks_learned": tasks,
        "stopped": stop,
        "steps": steps,
        "per_task": task_figures(res),
        "accuracy_matrix": res["accuracy_matrix"],
        "acc": res["acc"],
        "bwt": res["bwt"],
        "capacity_pct": res["capacity_pct"],
        "heads_pct": res["heads_pct"],
        "packed_bytes": res["packed_bytes"],
        "task_inference_acc": res.get("task_inference_acc"),
        "class_incremental_acc": res.get("class_incremental_acc"),
        "seconds_total": res["seconds_total"],
        "seconds_by_stage": res["seconds_by_stage"],
        "throughput": res["throughput"],
        "device_used": res["hardware"].get("device"),
        "results": res,  # the last step's whole results.json
    }


def part_cifar100(ctx: Context) -> dict[str, Any]:
    import stages as bench  # bench/stages.py

    from qpacknet.config import load_config
    from qpacknet.scenarios import build_stream

    mode = ctx.mode
    root = ctx.work / "synthetic-cifar100"
    t0 = time.perf_counter()
    with cifar_size(bench, mode.cifar_per_class):
        bench.write_cifar100(root)
        per_class = (bench.TRAIN_PER_CLASS, bench.TEST_PER_CLASS)
    write_seconds = time.perf_counter() - t0
    ctx.log(
        f"  synthetic CIFAR-100 ({per_class[0]} train + {per_class[1]} test images per class, "
        f"official python format) written in {write_seconds:.1f}s"
    )
    tasks = 2
    overrides = [*base_overrides(ctx.device), *mode.cifar_overrides, f"scenario.num_tasks={tasks}"]
    overrides.append("capacity.quality_gate=warn")  # synthetic images: learning is not checked
    cfg = load_config("cifar100-quick", None, overrides)
    t0 = time.perf_counter()
    stream = build_stream(cfg.scenario, cfg.seed, str(root), ctx.device)
    stream_seconds = time.perf_counter() - t0
    out_dir = ctx.work / "cifar100-run"
    res = run_pipeline(ctx, "cifar100-quick", overrides, stream, out_dir)
    for fig in task_figures(res):
        ctx.log(
            f"  CIFAR-100 task {fig['task'] + 1}: "
            + ", ".join(f"{s} {v:.1f}" for s, v in fig["seconds"].items())
            + f"; {fig['bit_width']} bits, row {fig['accuracy_row']}"
        )
    check_run(ctx, "cifar100", res, tasks, out_dir, stream)
    return {
        "preset": "cifar100-quick",
        "overrides": overrides,
        "config": res["config"],
        "data": {
            "kind": "synthetic CIFAR-100, official python format (bench/stages.py writer)",
            "train_per_class": per_class[0],
            "test_per_class": per_class[1],
            "write_seconds": write_seconds,
            "stream_seconds": stream_seconds,
        },
        "per_task": task_figures(res),
        "accuracy_matrix": res["accuracy_matrix"],
        "acc": res["acc"],
        "bwt": res["bwt"],
        "capacity_pct": res["capacity_pct"],
        "heads_pct": res["heads_pct"],
        "packed_bytes": res["packed_bytes"],
        "seconds_total": res["seconds_total"],
        "seconds_by_stage": res["seconds_by_stage"],
        "throughput": res["throughput"],
        "device_used": res["hardware"].get("device"),
        "results": res,  # the whole results.json
    }


# --------------------------------------------------------------------------------------------
# driver


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "device_name": (
            torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or None
        ),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        from qpacknet.pipeline import hardware

        env["hardware"] = hardware(device)
        if device != "cuda":
            env["device_name"] = env["hardware"].get("processor")
    except Exception as exc:  # a refactor in flight must not cost the whole report
        env["hardware"] = {"error": f"{type(exc).__name__}: {exc}"}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
        }
    return env


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return setting


def figures_line(part: str, data: dict[str, Any]) -> str:
    """The summary table's figures for one part."""
    if part == "population":
        return "; ".join(
            f"{name} seq/pop " + ", ".join(f"{lay} {r:.2f}" for lay, r in ratios.items())
            for name, ratios in data.get("summary", {}).items()
        )
    if "acc" not in data:
        return ""
    cep = data["throughput"].get("candidate_epochs_per_second", 0.0)
    return (
        f"{len(data['per_task'])} tasks, ACC {data['acc']:.2f}, BWT {data['bwt']}, "
        f"capacity {data['capacity_pct']:.2f} %, bits {[t['bit_width'] for t in data['per_task']]}"
        f", {cep:.1f} candidate-epochs/s"
    )


def summary(ctx: Context) -> None:
    rep = ctx.report.data
    ctx.log("")
    name = rep["environment"].get("device_name")
    ctx.log(f"device check ({ctx.mode.name}, device {ctx.device}, {name})")
    ctx.log(f"{'part':12s} {'seconds':>8s} {'status':8s} figures")
    for part in PARTS:
        sec = rep["seconds"].get(part)
        failed = [k for k in ctx.report.failed if k.startswith(part)]
        status = "skipped" if sec is None else "FAILED" if failed else "ok"
        if part in rep.get("errors", {}):
            status = "error"
        secs = f"{sec:8.1f}" if sec is not None else f"{'-':>8s}"
        ctx.log(f"{part:12s} {secs} {status:8s} {figures_line(part, rep['parts'].get(part, {}))}")
    checks = rep["checks"]
    failed = ctx.report.failed
    ctx.log(
        f"checks: {len(checks) - len(failed)}/{len(checks)} passed"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    for part, err in rep.get("errors", {}).items():
        ctx.log(f"error in {part}: {err['type']}: {err['message']}")
    ctx.log(f"total {time.perf_counter() - START:.1f}s; JSON {ctx.report.path}")


class Deadline:
    """The hard deadline as ``SIGALRM``: it interrupts a part only while one runs (``armed``);
    between parts it only marks the time as spent, so the JSON is always written whole."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.armed = False
        self.passed = False

    def __enter__(self) -> Deadline:
        self._previous = signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, max(self.at - time.perf_counter(), 0.1))
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        self.passed = True
        if self.armed:
            self.armed = False
            raise OutOfTime(f"hard deadline passed ({HARD_GRACE_S:.0f}s after the budget's end)")


def run_parts(ctx: Context, hard: float) -> None:
    """Run the three parts in order; each one's failure is recorded and the next still runs."""
    import torch

    report = ctx.report
    parts: dict[str, Callable[[Context], dict[str, Any]]] = {
        "population": part_population,
        "pmnist": part_pmnist,
        "cifar100": part_cifar100,
    }
    with Deadline(hard) as deadline:
        for i, (name, fn) in enumerate(parts.items(), 1):
            if deadline.passed or time.perf_counter() > hard:
                report.check(f"{name}_ran", False, "skipped: the hard deadline had passed")
                ctx.log(f"[{i}/{len(parts)}] {name} SKIPPED: no time left")
                continue
            ctx.log(f"[{i}/{len(parts)}] {name} ({ctx.left():.0f}s of the budget left)")
            t0 = time.perf_counter()
            try:
                if ctx.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                deadline.armed = True
                try:
                    data = fn(ctx)
                finally:
                    deadline.armed = False
                if ctx.device == "cuda":
                    peak = torch.cuda.max_memory_allocated()
                    data["max_memory_allocated_gib"] = peak / 2**30
                    report.check(
                        f"{name}_on_gpu", peak > 0, f"peak GPU memory {peak / 2**20:.1f} MiB"
                    )
                report.data["parts"][name] = data
                report.check(f"{name}_ran", True, "completed")
            except Exception as exc:
                report.error(name, exc)
                report.check(f"{name}_ran", False, f"{type(exc).__name__}: {exc}")
                print(report.data["errors"][name]["traceback"], file=sys.stderr, flush=True)
            sec = time.perf_counter() - t0
            report.data["seconds"][name] = sec
            ok = "ok" if name not in report.data["errors"] else "ERROR"
            ctx.log(f"[{i}/{len(parts)}] {name} done in {sec:.1f}s: {ok}")
            report.write()


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, under a minute)")
    ap.add_argument("--json", help="default: bench/results/device-check-<device>.json")
    ap.add_argument("--data-dir", help="folder with MNIST/raw (else synthetic MNIST-shaped data)")
    ap.add_argument("--budget-seconds", type=float, help="whole run (default 450; smoke 120)")
    ap.add_argument("--pmnist-seconds", type=float, help="p-MNIST part (default 240; smoke 60)")
    ap.add_argument("--pmnist-max-tasks", type=int, help="default: the preset's 10 (smoke 2)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; smoke 1)")
    ap.add_argument("--work-dir", help="keep data and runs here (default: a temporary folder)")
    ap.add_argument("--verbose", action="store_true", help="per-epoch lines from the pipeline")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    mode = MODES["smoke" if args.smoke else "full"]
    budget = args.budget_seconds if args.budget_seconds is not None else mode.budget_seconds
    device = args.device
    report = Report(
        Path(args.json or ROOT / f"bench/results/device-check-{device}.json"),
        {
            "benchmark": "device_check",
            "mode": mode.name,
            "requested_device": args.device,
            "device": None,
            "complete": False,
            "passed": False,
            "argv": sys.argv,
            "budget_seconds": budget,
            "checks": {},
            "errors": {},
            "seconds": {},
            "parts": {},
        },
    )
    try:
        device = resolve_device(args.device)  # imports torch
        threads = args.threads if args.threads is not None else mode.threads
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        if args.json is None:
            report.path = ROOT / f"bench/results/device-check-{device}.json"
        report.data["device"] = device
        report.data["environment"] = environment(device)
        report.data["seconds"]["imports"] = time.perf_counter() - START
    except Exception as exc:
        report.error("setup", exc)
        report.check("setup", False, f"{type(exc).__name__}: {exc}")
        report.write()
        print(report.data["errors"]["setup"]["traceback"], file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="qpacknet-device-check-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(args, mode, device, work, report, START + budget)
        ctx.log(
            f"device check: mode {mode.name}, device {device} "
            f"({report.data['environment'].get('device_name')}), torch "
            f"{report.data['environment']['torch']}, budget {budget:.0f}s, work dir {work}"
        )
        try:
            report.data["mnist"] = mnist_source(ctx)
        except Exception as exc:
            report.error("mnist", exc)
            report.data["mnist"] = {"real": False, "error": str(exc)}
        ctx.log(
            "MNIST: "
            + ("real files in " if report.data["mnist"].get("real") else "SYNTHETIC, ")
            + str(report.data["mnist"].get("note", report.data["mnist"].get("dir")))
        )
        run_parts(ctx, START + budget + HARD_GRACE_S)

        imported = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
        report.data["imports"] = {
            **{name: name in sys.modules for name in FORBIDDEN},
            "forbidden_modules_loaded": imported,
        }
        report.check(
            "no_ray_mlflow",
            not imported,
            "neither ray nor mlflow imported" if not imported else f"imported: {imported}",
        )
        report.data["complete"] = True
        report.data["output"] = ctx.log_lines
        summary(ctx)
        report.data["output"] = ctx.log_lines
        report.write()
    return 0 if report.data["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
