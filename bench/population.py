"""Population vs one-after-another: K candidates of each backbone × 1 epoch, same batches.

For every backbone (the p-MNIST MLP and the conv nets of split CIFAR-100, 5-datasets,
TinyImagenet and Imagenet100, each configured by its shipped preset), two arms run the same
training code (:func:`qpacknet.train.fit` after :func:`qpacknet.method.draw_candidates`) on the
same batches: K candidates as one population (one forward/backward pass, ``K = --candidates``)
versus K networks with K = 1 trained one after another. For the conv nets both arms run with
contiguous (NCHW) activations and with ``net.channels_last``. The arms alternate (their order is
reversed on every other repeat) so that the drifting load of a shared machine hits all of them.

Ratio convention: ``ratio = sequential seconds / population seconds``; above 1 the population
is faster, below 1 it is slower. Printed per repeat with the median over repeats, together with
the largest difference between the arms' per-candidate validation accuracies (points) and
per-candidate mean training losses (relative): both arms compute the same thing, so these
differences are float rounding only.

Data has each scenario's real shape: MNIST-like ``[784]`` (the real MNIST when ``--data-dir``
holds it), CIFAR-like ``[3, 32, 32]`` with 10 classes (alexnet, resnet18_reduced), ``[3, 64, 64]``
with 5 classes (tinynet) and with 10 classes (resnet18: the default ``image_size`` of
:mod:`qpacknet.scenarios.imagefolder`); synthetic random data otherwise (the timing does not
depend on pixel values). Each backbone trains on its own number of rows (``BACKBONES``, scaled
by ``--rows``) with a tenth as many validation rows (at least 64): the whole MNIST training set
for the MLP, but only 2-8 batches for the conv nets, because a 16-candidate step of the ResNets
takes seconds on a 2-core CPU (several times that under load); with the defaults a full run
took 17 minutes there on an otherwise quiet machine. Timing excludes building and initialising
the nets. Float32 rounding differences between the arms' kernels grow during training: up to
~1e-3 relative in the conv nets' losses and now and then one flipped validation prediction (1 of
64 rows: 1.5625 points); in float64 they agree to 1e-10 (``tests/test_conv_backbones.py``).

    python bench/population.py [--backbone all|mlp|alexnet|resnet18_reduced|resnet18|tinynet]
        [--data-dir ../shared/data] [--candidates 16] [--repeats 3] [--rows 1.0]
        [--channels-last both|on|off] [--json bench/out/population.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qpacknet.config import RunConfig, load_config
from qpacknet.method import draw_candidates
from qpacknet.nets import PopulationNet, build
from qpacknet.pipeline import hardware, resolve_device
from qpacknet.scenarios.base import Split
from qpacknet.train import EpochReport, fit

RATIO = "sequential seconds / population seconds (>1: the population is faster)"


@dataclass(frozen=True)
class Backbone:
    """A backbone as its scenario uses it: preset, input shape, classes, default rows."""

    name: str
    preset: str
    input_shape: tuple[int, ...]
    classes: int
    rows: int


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("mlp", "pmnist", (784,), 10, 54000),
        Backbone("alexnet", "cifar100", (3, 32, 32), 10, 512),
        Backbone("tinynet", "tinyimagenet", (3, 64, 64), 5, 192),
        Backbone("resnet18_reduced", "five_datasets", (3, 32, 32), 10, 192),
        Backbone("resnet18", "imagenet100", (3, 64, 64), 10, 128),
    )
}
LAYOUTS = {
    "off": ("contiguous",),
    "on": ("channels_last",),
    "both": ("contiguous", "channels_last"),
}


@dataclass
class Arm:
    """One arm's timings and per-candidate results over the repeats."""

    seconds: list[float] = field(default_factory=list)
    accs: list[list[float]] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)


def synthetic(shape: tuple[int, ...], classes: int, rows: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(
        torch.randn(rows, *shape, generator=g), torch.randint(0, classes, (rows,), generator=g)
    )


def data(b: Backbone, rows: int, data_dir: str | None, device: str) -> tuple[Split, Split, str]:
    """Training and validation rows of the backbone's scenario shape (real MNIST for the MLP
    when ``data_dir`` is given)."""
    if b.name == "mlp" and data_dir is not None:
        from qpacknet.scenarios import PermutedMNIST

        task = PermutedMNIST(
            Path(data_dir), num_tasks=1, train_limit=rows, device=device, download=False
        ).task(0)
        return task.train, task.val, "mnist"
    train = synthetic(b.input_shape, b.classes, rows, 0)
    val = synthetic(b.input_shape, b.classes, max(rows // 10, 64), 1)
    return train.to(device), val.to(device), "synthetic"


def config(b: Backbone, channels_last: bool) -> RunConfig:
    overrides = [f"net.channels_last={str(channels_last).lower()}"] if b.name != "mlp" else []
    cfg = load_config(preset=b.preset, overrides=overrides)
    if cfg.net.backbone != b.name:
        raise SystemExit(f"preset {b.preset} has backbone {cfg.net.backbone}, expected {b.name}")
    return cfg


def make(cfg: RunConfig, b: Backbone, cands: list[int], device: str) -> PopulationNet:
    net = build(cfg.net, b.input_shape, b.classes, len(cands)).to(device)
    avail = {s.name: torch.ones(s.shape, dtype=torch.bool) for s in net.layer_specs}
    draw_candidates(net, avail, cfg, 0, cands)
    return net


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train(
    cfg: RunConfig,
    b: Backbone,
    chunks: list[list[int]],
    tr: Split,
    val: Split,
    epochs: int,
    device: str,
) -> tuple[float, list[float], list[float]]:
    """Train one net per chunk of candidates, one after another; returns the seconds spent in
    training (construction and initialisation excluded), per-candidate validation accuracies
    and per-candidate mean training losses of the last epoch."""
    losses: list[float] = []

    def keep(rep: EpochReport) -> None:
        if rep.epoch == rep.epochs:
            losses.extend(rep.loss)

    seconds = 0.0
    accs: list[float] = []
    for cands in chunks:
        net = make(cfg, b, cands, device)
        sync(device)
        start = time.perf_counter()
        accs += fit(
            net,
            tr,
            val,
            cfg.train,
            seed=cfg.seed,
            task=0,
            stage="bench",
            epochs=epochs,
            schedule=False,
            keep_best=False,
            on_epoch=keep,
        )
        sync(device)
        seconds += time.perf_counter() - start
        del net
    return seconds, accs, losses


def bench_backbone(
    b: Backbone, args: argparse.Namespace, device: str, log: Callable[[str], None]
) -> dict[str, Any]:
    rows = max(round(b.rows * args.rows), 64)
    tr, val, source = data(b, rows, args.data_dir, device)
    k = args.candidates
    layouts = LAYOUTS[args.channels_last] if b.name != "mlp" else ("contiguous",)
    cfgs = {lay: config(b, lay == "channels_last") for lay in layouts}
    batch = cfgs[layouts[0]].train.batch_size
    log(
        f"\n== {b.name} (preset {b.preset}): input {list(b.input_shape)}, {b.classes} classes, "
        f"{source} data, {len(tr)} training rows ({-(-len(tr) // batch)} batches of {batch}), "
        f"{len(val)} validation rows, {k} candidates × {args.epochs} epoch(s)"
    )
    # warm-up: each (layout, K) once on one batch, so that no arm pays for first-call set-up
    few = Split(tr.x[:batch], tr.y[:batch])
    for lay in layouts:
        for cands in ([0], list(range(k))):
            train(cfgs[lay], b, [cands], few, val, 1, device)

    arms = {(lay, kind): Arm() for lay in layouts for kind in ("population", "sequential")}
    order = list(arms)
    log(
        f"{'repeat':>6s} {'layout':14s} {'population s':>12s} {'sequential s':>12s} {'seq/pop':>8s}"
    )
    for rep in range(args.repeats):
        for lay, kind in order if rep % 2 == 0 else order[::-1]:
            chunks = [list(range(k))] if kind == "population" else [[c] for c in range(k)]
            sec, accs, losses = train(cfgs[lay], b, chunks, tr, val, args.epochs, device)
            arm = arms[(lay, kind)]
            arm.seconds.append(sec)
            arm.accs.append(accs)
            arm.losses.append(losses)
        for lay in layouts:
            pop, seq = arms[(lay, "population")], arms[(lay, "sequential")]
            log(
                f"{rep:6d} {lay:14s} {pop.seconds[-1]:12.2f} {seq.seconds[-1]:12.2f} "
                f"{seq.seconds[-1] / pop.seconds[-1]:8.3f}"
            )

    out: dict[str, Any] = {
        "preset": b.preset,
        "input_shape": list(b.input_shape),
        "classes": b.classes,
        "data": source,
        "train_rows": len(tr),
        "val_rows": len(val),
        "batch_size": batch,
        "layouts": {},
    }
    for lay in layouts:
        pop, seq = arms[(lay, "population")], arms[(lay, "sequential")]
        ratios = [s / p for s, p in zip(seq.seconds, pop.seconds, strict=True)]
        acc_diff = max(
            abs(a - c)
            for ra, rc in zip(pop.accs, seq.accs, strict=True)
            for a, c in zip(ra, rc, strict=True)
        )
        loss_diff = max(
            abs(a - c) / max(abs(c), 1e-12)
            for ra, rc in zip(pop.losses, seq.losses, strict=True)
            for a, c in zip(ra, rc, strict=True)
        )
        med = statistics.median(ratios)
        log(
            f"{'median':>6s} {lay:14s} {statistics.median(pop.seconds):12.2f} "
            f"{statistics.median(seq.seconds):12.2f} {med:8.3f}   "
            f"(median of per-repeat ratios {statistics.median(ratios):.3f})"
        )
        log(
            f"       {lay}: max |val acc difference| population vs sequential "
            f"{acc_diff:.4f} points, max relative training-loss difference {loss_diff:.2e}"
        )
        out["layouts"][lay] = {
            "population_seconds": pop.seconds,
            "sequential_seconds": seq.seconds,
            "ratio_per_repeat": ratios,
            "median_ratio": med,
            "population_candidate_epochs_per_second": k * args.epochs / min(pop.seconds),
            "sequential_candidate_epochs_per_second": k * args.epochs / min(seq.seconds),
            "max_val_acc_difference_points": acc_diff,
            "max_relative_loss_difference": loss_diff,
        }
    if len(layouts) == 2:
        for kind in ("population", "sequential"):
            cl = [
                c / n
                for c, n in zip(
                    arms[("channels_last", kind)].seconds,
                    arms[("contiguous", kind)].seconds,
                    strict=True,
                )
            ]
            log(
                f"       {kind}: channels_last / contiguous seconds per repeat "
                + " ".join(f"{r:.3f}" for r in cl)
                + f", median {statistics.median(cl):.3f}"
            )
            out[f"{kind}_channels_last_over_contiguous_seconds"] = cl
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", choices=["all", *BACKBONES], default="all")
    ap.add_argument("--data-dir", default=None, help="real MNIST for the MLP (else synthetic)")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--rows", type=float, default=1.0, help="multiplier of every backbone's training rows"
    )
    ap.add_argument(
        "--channels-last",
        choices=list(LAYOUTS),
        default="both",
        help="conv nets: run the arms without (off), with (on) or both ways",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default="bench/out/population.json")
    args = ap.parse_args()

    device = resolve_device(args.device)
    names = list(BACKBONES) if args.backbone == "all" else [args.backbone]
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log(
        f"device {device}, torch threads {torch.get_num_threads()}; ratio = {RATIO}; "
        f"arms alternate, reversed order on odd repeats"
    )
    start = time.perf_counter()
    results = {name: bench_backbone(BACKBONES[name], args, device, log) for name in names}
    log("\nsummary: median ratio " + RATIO)
    for name, res in results.items():
        figs = ", ".join(f"{lay} {v['median_ratio']:.3f}" for lay, v in res["layouts"].items())
        log(f"  {name:18s} {figs}")
    wall = time.perf_counter() - start
    log(f"total wall {wall:.0f}s")
    out = {
        "benchmark": "population",
        "ratio": RATIO,
        "candidates": args.candidates,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "rows_multiplier": args.rows,
        "backbones": results,
        "wall_seconds": wall,
        "output": lines,
        "hardware": hardware(device),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
