"""Candidate throughput of the Ray executor: 1 vs 2 actors, 1 vs 16 candidates per actor.

Runs only the SEARCH stage (the part that scales with the population) of one p-MNIST-shaped
task on a local Ray instance, for each layout, in one process, and prints candidate-epochs per
second and the ratios side by side. Uses the real MNIST when ``--data-dir`` has it, else random
data of the same shape.

    python bench/scaling.py [--data-dir ../shared/data] [--train-limit 6000] [--population 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray
import torch

from qpacknet.cluster import RayExecutor
from qpacknet.cluster.connect import keep_loopback
from qpacknet.config import load_config
from qpacknet.pipeline import hardware
from qpacknet.scenarios.base import InMemoryStream, Split, TaskData
from qpacknet.worker import TaskContext


def task_data(data_dir: str | None, limit: int) -> TaskData:
    if data_dir:
        from qpacknet.scenarios import PermutedMNIST

        return PermutedMNIST(Path(data_dir), num_tasks=1, train_limit=limit, download=False).task(0)
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g))

    return TaskData(0, "synthetic", 10, split(limit), split(2000), split(2000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--train-limit", type=int, default=6000)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--json", default="bench/out/scaling.json")
    args = ap.parse_args()

    data = task_data(args.data_dir, args.train_limit)
    keep_loopback()
    ray.init(
        num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR"
    )
    p = args.population
    layouts = [(1, p), (2, p // 2), (1, 1), (2, 1)]
    rows = []
    for workers, per in layouts:
        cfg = load_config(
            preset="pmnist",
            overrides=[
                f"search.population={p}",
                f"search.epochs={args.epochs}",
                f"executor.workers={workers}",
                f"executor.candidates_per_worker={per}",
                "executor.gpus_per_worker=0",
                "executor.cpus_per_worker=1",
            ],
        )
        ex = RayExecutor(cfg)
        avail = {
            "fc0": torch.ones(100, 784, dtype=torch.bool),
            "fc1": torch.ones(100, 100, dtype=torch.bool),
        }
        ctx = TaskContext(cfg, 0, (784,), 10, avail)
        stream = InMemoryStream("bench", [data])
        ex.begin_run(stream, cfg)  # actors start and report here: not timed
        ex.begin_task(ctx, stream)
        start = time.perf_counter()
        results = sorted(ex.search(), key=lambda r: r.index)
        seconds = time.perf_counter() - start
        ex.end_task()
        ex.close()
        rate = p * args.epochs / seconds
        rows.append(
            {
                "actors": workers,
                "candidates_per_actor": per,
                "seconds": seconds,
                "candidate_epochs_per_second": rate,
                "accs": [r.acc for r in results],
            }
        )
        print(
            f"{workers} actor(s) x {per:2d} candidates/actor: {seconds:7.2f}s "
            f"{rate:6.2f} candidate-epochs/s",
            flush=True,
        )
    ray.shutdown()
    base = rows[0]["candidate_epochs_per_second"]
    by = {(r["actors"], r["candidates_per_actor"]): r["candidate_epochs_per_second"] for r in rows}
    print(f"2 actors vs 1 (population chunks of {p // 2} vs {p}): {by[(2, p // 2)] / base:.2f}x")
    print(f"2 actors vs 1 (1 candidate per chunk): {by[(2, 1)] / by[(1, 1)]:.2f}x")
    print(f"{p} candidates per actor vs 1 (1 actor): {base / by[(1, 1)]:.2f}x")
    same = all(r["accs"] == rows[0]["accs"] for r in rows)
    print(f"same candidate accuracies in every layout: {same}")
    out = {
        "benchmark": "scaling",
        "train_rows": len(data.train),
        "population": p,
        "epochs": args.epochs,
        "rows": rows,
        "hardware": hardware("cpu"),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
