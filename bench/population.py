"""Population vs one-after-another: 16 p-MNIST MLP candidates × 1 epoch, same data, same process.

Both arms run the same training code (:func:`qpacknet.train.fit`) on the same batches; the only
difference is K = 16 candidates in one forward/backward pass versus 16 runs with K = 1. Prints
both times and the ratio, and writes JSON. Uses the real MNIST when ``--data-dir`` has it,
else random data of the same shape (the timing does not depend on the pixel values).

    python bench/population.py [--data-dir ../shared/data] [--candidates 16] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qpacknet.config import load_config
from qpacknet.nets import build
from qpacknet.pipeline import hardware, resolve_device
from qpacknet.scenarios.base import Split
from qpacknet.train import fit
from qpacknet.worker import init_population


def data(data_dir: str | None, device: str, limit: int | None) -> tuple[Split, Split, str]:
    if data_dir is not None:
        from qpacknet.scenarios import PermutedMNIST

        task = PermutedMNIST(
            Path(data_dir), num_tasks=1, train_limit=limit, device=device, download=False
        ).task(0)
        return task.train, task.val, "mnist"
    g = torch.Generator().manual_seed(0)
    n = limit or 54000
    train = Split(torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g))
    val = Split(torch.randn(6000, 784, generator=g), torch.randint(0, 10, (6000,), generator=g))
    return train.to(device), val.to(device), "synthetic"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default="bench/out/population.json")
    args = ap.parse_args()

    cfg = load_config(preset="pmnist")
    device = resolve_device(args.device)
    train, val, source = data(args.data_dir, device, args.train_limit)
    k = args.candidates

    def make(cands: list[int]) -> torch.nn.Module:
        net = build(cfg.net, (784,), 10, len(cands)).to(device)
        avail = {s.name: torch.ones(s.shape, dtype=torch.bool) for s in net.layer_specs}
        init_population(net, avail, cfg, 0, cands)
        return net

    def run(nets: list[torch.nn.Module]) -> tuple[float, list[float]]:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        accs: list[float] = []
        for net in nets:
            accs += fit(
                net,
                train,
                val,
                cfg.train,
                seed=cfg.seed,
                task=0,
                stage="bench",
                epochs=args.epochs,
                schedule=False,
                keep_best=False,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, accs

    fit(
        make([0]),
        Split(train.x[:640], train.y[:640]),
        val,
        cfg.train,
        seed=0,
        task=0,
        stage="warmup",
        epochs=1,
        schedule=False,
        keep_best=False,
    )
    t_pop, acc_pop = run([make(list(range(k)))])
    t_seq, acc_seq = run([make([c]) for c in range(k)])
    ratio = t_seq / t_pop
    print(
        f"data: {source}, {len(train)} training rows, {args.epochs} epoch(s), device {device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"{k} candidates as one population : {t_pop:8.2f}s "
        f"({k * args.epochs / t_pop:.2f} candidate-epochs/s)"
    )
    print(
        f"{k} candidates one after another : {t_seq:8.2f}s "
        f"({k * args.epochs / t_seq:.2f} candidate-epochs/s)"
    )
    print(f"speed-up of the population: {ratio:.2f}x")
    print(
        f"max |val acc difference| population vs separate: "
        f"{max(abs(a - b) for a, b in zip(acc_pop, acc_seq, strict=True)):.4f} points"
    )
    out = {
        "benchmark": "population",
        "backbone": "mlp",
        "data": source,
        "candidates": k,
        "epochs": args.epochs,
        "train_rows": len(train),
        "population_seconds": t_pop,
        "sequential_seconds": t_seq,
        "speedup": ratio,
        "hardware": hardware(device),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
