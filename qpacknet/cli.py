"""``qpacknet`` command line: ``qpacknet run --preset NAME | --config FILE [--set k=v …]``.

Usage errors (bad config, missing data, an output dir that already holds a model) print one
message that names the problem and the fix, and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from qpacknet.config import RunConfig, load_config, preset_names
from qpacknet.errors import UsageError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qpacknet", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="learn a task stream and write the packed model")
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=f"one of: {', '.join(preset_names())}")
    src.add_argument("--config", help="a YAML file of settings")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. search.population=8",
    )
    run.add_argument("--out", help="output dir (default: runs/<scenario>-<time>)")
    run.add_argument("--data-dir", help="data root (else $QPACKNET_DATA, else ./data)")
    run.add_argument("--seed", type=int, help="run seed (overrides the config's)")
    run.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    run.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="where candidates train (overrides executor.kind)",
    )
    show = sub.add_parser("config", help="print the resolved config as YAML")
    src2 = show.add_mutually_exclusive_group(required=True)
    src2.add_argument("--preset")
    src2.add_argument("--config")
    show.add_argument("--set", dest="overrides", action="append", default=[])
    sub.add_parser("presets", help="list the shipped presets")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "presets":
            print("\n".join(preset_names()))
            return 0
        overrides = list(args.overrides)
        if getattr(args, "executor", None):
            overrides.append(f"executor.kind={args.executor}")
        cfg = load_config(args.preset, args.config, overrides, getattr(args, "seed", None))
        if args.command == "config":
            import yaml

            print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")
            return 0
        return _run(cfg, args)
    except UsageError as exc:
        print(f"qpacknet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qpacknet: interrupted", file=sys.stderr)
        return 130


def _run(cfg: RunConfig, args: argparse.Namespace) -> int:
    import torch

    from qpacknet.checkpoint import CHECKPOINT_FILE
    from qpacknet.executor import Executor, LocalExecutor
    from qpacknet.pipeline import MODEL_FILE, Pipeline, resolve_device
    from qpacknet.progress import Progress
    from qpacknet.scenarios import build_stream

    out = (
        Path(args.out)
        if args.out
        else Path("runs") / (f"{args.preset or cfg.scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    if (out / MODEL_FILE).exists() and not (out / CHECKPOINT_FILE).exists():
        raise UsageError(
            f"{out} already holds a model ({MODEL_FILE}) that no run checkpoint describes; "
            "pass a new --out, or move that file away first"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    stream = build_stream(cfg.scenario, cfg.seed, args.data_dir, device)
    progress = Progress(verbose=not args.quiet)
    if cfg.executor.kind == "ray":
        from qpacknet.cluster import RayExecutor

        executor: Executor = RayExecutor(cfg.executor)
    else:
        executor = LocalExecutor()
    pipeline = Pipeline(cfg, stream, executor, out, progress, preset=args.preset)
    results = pipeline.run()
    _summary(results, pipeline, out)
    return 0


def _summary(results: dict[str, Any], pipeline: Any, out: Path) -> None:
    print()
    print("accuracy matrix R[i][j] (test %, row i = after task i):")
    print(pipeline.matrix.table())
    print()
    bits = " ".join(str(t["bit_width"]) for t in results["tasks"])
    tp = results["throughput"]
    print(
        f"ACC {results['acc']:.2f}%  BWT {results['bwt']:.2f}  "
        f"capacity {results['capacity_pct']:.2f}% (+ heads {results['heads_pct']:.2f}%)  "
        f"bits per task: {bits}"
    )
    print(
        f"packed model {results['packed_bytes']:,} bytes "
        f"(dense float32 backbone: {results['dense_float32_bytes']:,} bytes)"
    )
    print(
        f"{results['seconds_total']:.1f}s total, "
        f"{tp['candidate_epochs_per_second']:.2f} candidate-epochs/s, "
        f"{100 * tp['non_training_fraction']:.1f}% of wall time outside candidate training"
    )
    print(f"wrote {out / 'results.json'} and {pipeline.model_path}")


if __name__ == "__main__":
    raise SystemExit(main())
