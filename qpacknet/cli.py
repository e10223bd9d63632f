"""``qpacknet`` command line: ``qpacknet run --preset NAME | --config FILE [--set k=v …]``.

Usage errors (bad config, missing data, an output dir that already holds a model) print one
message that names the problem and the fix, and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from qpacknet.config import RunConfig, load_config, preset_names
from qpacknet.errors import QpacknetError, UsageError


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
    run.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in --out)",
    )
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    tune = sub.add_parser(
        "tune",
        help="tune the method's settings with Ray Tune (ASHA and Pareto table on validation ACC)",
        description="Each trial is a whole run of the base settings with sampled values; "
        "the finished trials' validation ACC vs capacity trade-off is printed as a Pareto table "
        "(test ACC beside it, never used to choose).",
    )
    base = tune.add_mutually_exclusive_group(required=True)
    base.add_argument("--preset", help="base settings: a shipped preset")
    base.add_argument("--config", help="base settings: a YAML file")
    base.add_argument(
        "--resume", action="store_true", help="continue the experiment --name in --storage"
    )
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tune.add_argument("--space", help="a tune space YAML (default: the shipped 'method' space)")
    tune.add_argument("--samples", type=int, help="number of trials (overrides the space's)")
    tune.add_argument("--name", default="qpacknet-tune", help="experiment name")
    tune.add_argument("--storage", default="runs/tune", help="where experiments live")
    tune.add_argument("--data-dir", help="data root (else $QPACKNET_DATA, else ./data)")
    tune.add_argument("--seed", type=int, help="run seed of every trial")
    learn = sub.add_parser(
        "learn",
        help="add one task to a registered model version and register the next version",
        description="Loads --model from the MLflow registry, learns the next task of its "
        "stream (with its own settings, or a compatible --preset/--config and --set), and "
        "registers the result as the next version of the same registered model.",
    )
    learn.add_argument("--model", required=True, help="models:/NAME/VERSION or models:/NAME/latest")
    lsrc = learn.add_mutually_exclusive_group()
    lsrc.add_argument("--preset", help="settings for the new task (default: the model's)")
    lsrc.add_argument("--config", help="a YAML file of settings for the new task")
    learn.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    learn.add_argument("--out", help="work dir (default: runs/learn-<name>-v<version>-<time>)")
    learn.add_argument("--data-dir", help="data root (else $QPACKNET_DATA, else ./data)")
    learn.add_argument("--executor", choices=["local", "ray"], help="overrides executor.kind")
    learn.add_argument(
        "--tracking-uri", help="the registry's tracking URI (default: $MLFLOW_TRACKING_URI)"
    )
    learn.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    learn.add_argument(
        "--no-wait",
        action="store_true",
        help="exit 2 instead of waiting when another learn is extending the same model",
    )
    pred = sub.add_parser(
        "predict",
        help="predict classes (and, without --task, tasks) for new inputs",
        description="Reads a packed model and raw inputs, prepares them as the model's "
        "scenario did (recorded in the model file), and writes one row per input: input, "
        "class, task, confidence. Task ids are 0-based, as in the served model's params.task.",
    )
    pred.add_argument("--model", required=True, help="FILE.safetensors, a run dir, or models:/N/V")
    pred.add_argument("--input", required=True, help=".npz (key x) or .npy, an image, or a folder")
    pred.add_argument("--task", type=int, help="the inputs' task (0-based); default: inferred")
    pred.add_argument(
        "--recogniser",
        metavar="NAME",
        help=f"how a task is inferred without --task: {', '.join(_recognisers())} (default: "
        "the strongest the model file has statistics for: combined, else entropy)",
    )
    pred.add_argument("--out", help="FILE.csv or FILE.json (default: CSV on stdout)")
    pred.add_argument("--prepared", action="store_true", help="inputs are network inputs already")
    pred.add_argument("--tracking-uri", help="registry of models:/ (default: $MLFLOW_TRACKING_URI)")
    sync = sub.add_parser(
        "sync",
        help="bring the MLflow record of a run directory up to date",
        description="Adds to MLflow whatever of the run in --out is missing there (the parent "
        "run, task and candidate runs, metrics, files, model versions), e.g. after the "
        "tracking server failed mid-run; running it twice adds nothing the second time.",
    )
    sync.add_argument("--out", required=True, help="the run directory")
    sync.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: the run's own, else $MLFLOW_TRACKING_URI, else "
        "sqlite in --out)",
    )
    show = sub.add_parser("config", help="print the resolved config as YAML")
    src2 = show.add_mutually_exclusive_group(required=True)
    src2.add_argument("--preset")
    src2.add_argument("--config")
    show.add_argument("--set", dest="overrides", action="append", default=[])
    sub.add_parser("presets", help="list the shipped presets")
    return p


def _recognisers() -> tuple[str, ...]:
    """The task recognisers' names (:mod:`qpacknet.recognise`), from the config's setting so
    that parsing the command line imports no torch."""
    from typing import get_args

    from qpacknet.config import InferenceConfig

    return get_args(InferenceConfig.model_fields["recogniser"].annotation)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.command_line = " ".join(["qpacknet", *(sys.argv[1:] if argv is None else argv)])
    try:
        if args.command == "presets":
            print("\n".join(preset_names()))
            return 0
        if args.command == "tune":
            return _tune(args)
        if args.command == "learn":
            return _learn(args)
        if args.command == "sync":
            return _sync(args)
        if args.command == "predict":
            from qpacknet.predict import run as predict

            return predict(args)
        overrides = list(args.overrides)
        if getattr(args, "executor", None):
            overrides.append(f"executor.kind={args.executor}")
        if getattr(args, "no_tracking", False):
            overrides.append("tracking.enabled=false")
        if getattr(args, "tracking_uri", None):
            overrides.append(f"tracking.uri={args.tracking_uri}")
        cfg = load_config(args.preset, args.config, overrides, getattr(args, "seed", None))
        if args.command == "config":
            import yaml

            print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")
            return 0
        return _run(cfg, args)
    except UsageError as exc:
        print(f"qpacknet: error: {exc}", file=sys.stderr)
        return 2
    except QpacknetError as exc:
        print(f"qpacknet: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qpacknet: interrupted", file=sys.stderr)
        return 130


def _out_dir(cfg: RunConfig, args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    return Path("runs") / f"{args.preset or cfg.scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_out_dir(out: Path) -> None:
    from qpacknet.layout import CHECKPOINT_FILE, MODEL_FILE

    if (out / MODEL_FILE).exists() and not (out / CHECKPOINT_FILE).exists():
        raise UsageError(
            f"{out} already holds a model ({MODEL_FILE}) that no run checkpoint describes; "
            "pass a new --out, or move that file away first"
        )


def _load(cfg: RunConfig, data_dir: str | None, train_here: bool) -> tuple[Any, str]:
    """Import torch, set its threads, and build the task stream: ``(stream, device)``. The
    stream lives on the training device when this process trains (local executor), else on
    the CPU: with Ray the driver only prepares data for the workers."""
    import torch

    from qpacknet.devices import resolve_device
    from qpacknet.scenarios import build_stream

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, where="the driver") if train_here else "cpu"
    return build_stream(cfg.scenario, cfg.seed, data_dir, device), device


def _ray_executor(cfg: RunConfig, data_dir: str | None) -> tuple[Any, Any]:
    """Start (or join) Ray on this thread while another imports torch and loads the data;
    then start the candidate actors. Returns ``(executor, stream)``."""
    try:
        from qpacknet.cluster.connect import connect
    except ImportError as exc:
        raise UsageError(
            f"the Ray executor needs Ray ({exc}); install it with "
            "pip install 'ray[default,tune]==2.60.0', or pass --executor local"
        ) from None

    with ThreadPoolExecutor(1, thread_name_prefix="qpacknet-load") as pool:
        loading = pool.submit(_load, cfg, data_dir, False)
        owns_ray = connect()
        try:
            stream, _ = loading.result()
            from qpacknet.cluster import RayExecutor

            executor = RayExecutor(cfg, owns_ray=owns_ray)
        except BaseException:
            if owns_ray:
                import ray

                ray.shutdown()
            raise
    return executor, stream


def _run(cfg: RunConfig, args: argparse.Namespace) -> int:
    from qpacknet.rundir_lock import hold_run_dir

    out = _out_dir(cfg, args)
    with hold_run_dir(out, getattr(args, "command_line", None)):
        _check_out_dir(out)
        return _run_held(cfg, args, out)


def _run_held(cfg: RunConfig, args: argparse.Namespace, out: Path) -> int:
    """``_run`` once this process is the run directory's only writer."""
    tracker = None
    if cfg.tracking.enabled:
        from qpacknet.tracking.tracker import MlflowTracker

        # opens the store in the background
        tracker = MlflowTracker(
            cfg.tracking,
            out,
            getattr(args, "lineage", None),
            getattr(args, "command_line", "qpacknet run"),
        )
    if cfg.executor.kind == "ray":
        executor, stream = _ray_executor(cfg, args.data_dir)
    else:
        from qpacknet.executor import LocalExecutor

        stream, _ = _load(cfg, args.data_dir, True)
        executor = LocalExecutor()

    from qpacknet.pipeline import Pipeline
    from qpacknet.progress import Progress

    progress = Progress(verbose=not args.quiet)
    try:
        observers = [tracker] if tracker is not None else []
        pipeline = Pipeline(
            cfg, stream, executor, out, progress, preset=args.preset, observers=observers
        )
        results = pipeline.run()
    finally:
        executor.close()
    _summary(results, pipeline, out)
    if tracker is not None:
        print(tracker.summary())
        if tracker.conflict is not None:
            raise tracker.conflict
    return 0


def _learn(args: argparse.Namespace) -> int:
    import contextlib
    import dataclasses
    import os
    import tempfile

    from qpacknet.rundir_lock import hold_run_dir
    from qpacknet.tracking.learn import fetch, next_task_config, prepare_run_dir
    from qpacknet.tracking.registry import Lineage, hold_registered_model, say_stderr

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UsageError(
            "learn needs the registry that holds --model: pass --tracking-uri URI or set "
            "MLFLOW_TRACKING_URI (a local run's store is sqlite:///<out>/mlflow.db)"
        )
    if not args.model.startswith(("models:/", "runs:/")):
        raise UsageError(f"--model {args.model!r} must look like models:/NAME/VERSION")
    name = _registered_name(args.model)
    with contextlib.ExitStack() as held:
        if args.out:  # refuse a busy work dir before anything is downloaded or waited for
            held.enter_context(hold_run_dir(Path(args.out), args.command_line))
        if name:
            held.enter_context(
                hold_registered_model(
                    uri, name, args.command_line, wait=not args.no_wait, say=say_stderr
                )
            )
        with tempfile.TemporaryDirectory(prefix="qpacknet-learn-") as tmp:
            model = fetch(args.model, uri, Path(tmp))
            lineage = None
            if model.name and model.version:
                lineage = Lineage(
                    model.version, args.model.endswith("/latest"), "", model.num_tasks
                )
                if not lineage.from_latest:
                    _refuse_second_child(uri, model.name, lineage)
            new = None
            if args.preset or args.config:
                new = load_config(args.preset, args.config, args.overrides)
            elif args.overrides:
                new = _with_overrides(yaml_dump(model.config), args.overrides)
            overrides = [f"tracking.uri={uri}"]
            if model.name:
                overrides.append(f"tracking.registered_model={model.name}")
            if args.executor:
                overrides.append(f"executor.kind={args.executor}")
            cfg = next_task_config(model, new)
            cfg = _with_overrides(yaml_dump(cfg), overrides)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = Path(args.out or f"runs/learn-{model.name or 'model'}-v{model.version}-{stamp}")
            held.enter_context(hold_run_dir(out, args.command_line))
            prepare_run_dir(model, cfg, out, args.model.endswith("/latest"))
        if lineage is not None:
            lineage = dataclasses.replace(lineage, work_dir=str(out))
        print(
            f"learning task {model.num_tasks + 1} on top of {args.model} "
            f"({model.name} version {model.version}, {model.num_tasks} tasks); work dir {out}"
        )
        # the model's own settings: the preset it was built with still describes them
        same = not (args.preset or args.config or args.overrides)
        run_args = argparse.Namespace(
            out=str(out),
            preset=args.preset or (model.checkpoint.get("preset") if same else None),
            data_dir=args.data_dir,
            quiet=args.quiet,
            command_line=args.command_line,
            lineage=lineage,
        )
        return _run(cfg, run_args)


def _registered_name(model_uri: str) -> str:
    """``NAME`` of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` ('' for runs:/)."""
    if not model_uri.startswith("models:/"):
        return ""
    rest = model_uri[len("models:/") :]
    return rest.split("@", 1)[0] if "@" in rest else rest.rsplit("/", 1)[0]


def _refuse_second_child(uri: str, name: str, lineage: Any) -> None:
    """An explicit older version that already has a child would fork the registry: refuse
    before training (the same check runs again right before registering)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from qpacknet.tracking.registry import RegistryConflict, check_before_register

    try:
        check_before_register(MlflowClient(uri, uri), name, lineage, before_training=True)
    except RegistryConflict:
        raise
    except MlflowException as exc:
        raise UsageError(
            f"cannot read the versions of {name!r} at {uri}: {exc.message.splitlines()[0]}; "
            "nothing was learned; check --tracking-uri and that the server is up"
        ) from None


def _sync(args: argparse.Namespace) -> int:
    from qpacknet.rundir_lock import hold_run_dir
    from qpacknet.tracking.sync import sync_run_dir

    out = Path(args.out)
    if not out.is_dir():
        raise UsageError(f"{out} is not a directory; pass the --out of a run")
    with hold_run_dir(out, args.command_line):  # not while a live run writes its own record
        report = sync_run_dir(out, args.tracking_uri)
    for conflict in report.conflicts:
        print(f"not registered: {conflict}", file=sys.stderr)
    print(
        f"MLflow record of {out}: {report.summary()} in {report.seconds:.1f}s "
        f"(run {report.run_id}; {len(report.task_runs)} task runs, "
        f"{len(report.versions)} model versions)"
    )
    return 2 if report.conflicts else 0


def yaml_dump(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"))


def _with_overrides(config_yaml: str, overrides: list[str]) -> RunConfig:
    """A config from YAML text plus ``--set`` style overrides (validated)."""
    import yaml

    from qpacknet.config import apply_override, validate

    data = yaml.safe_load(config_yaml)
    for assignment in overrides:
        apply_override(data, assignment)
    return validate(data)


def _tune(args: argparse.Namespace) -> int:
    from qpacknet.tuning.runner import run_tune
    from qpacknet.tuning.space import load_spec

    if args.resume:
        if args.overrides or args.space or args.samples or args.seed is not None:
            raise UsageError(
                "--resume continues a saved experiment as it was; drop the other "
                "settings (--set, --space, --samples, --seed)"
            )
        run_tune(None, None, name=args.name, storage=args.storage, data_dir=None, resume=True)
        return 0
    base = load_config(args.preset, args.config, args.overrides, args.seed)
    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {args.samples}")
    spec = load_spec(args.space, {"num_samples": args.samples})
    run_tune(base, spec, name=args.name, storage=args.storage, data_dir=args.data_dir, resume=False)
    return 0


def _summary(results: dict[str, Any], pipeline: Any, out: Path) -> None:
    print()
    print("accuracy matrix R[i][j] (test %, row i = after task i):")
    print(pipeline.matrix.table())
    print()
    from qpacknet.quantize import report_widths

    bits = " ".join(report_widths(t) for t in results["tasks"])
    tp = results["throughput"]
    print(
        f"ACC {results['acc']:.2f}% (validation {results['val_acc']:.2f}%)  "
        f"BWT {results['bwt']:.2f}  "
        f"capacity {results['capacity_pct']:.2f}% (+ heads {results['heads_pct']:.2f}%)  "
        f"bits per task: {bits}"
    )
    by = results.get("task_inference", {})
    head = results.get("task_inference_recogniser", "entropy")
    print(
        f"without task ids ({head}): task inferred right {results['task_inference_acc']:.2f}%, "
        f"class-incremental ACC {results['class_incremental_acc']:.2f}% "
        f"(task-incremental ACC {results['acc']:.2f}%)"
    )
    if len(by) > 1:
        print(
            "  task inferred right / class-incremental ACC by recogniser: "
            + ", ".join(
                f"{name} {f['task_inference_acc']:.2f}/{f['class_incremental_acc']:.2f}%"
                for name, f in by.items()
            )
        )
    if results.get("shared_pct"):
        later = max(1, len(results["tasks"]) - 1)
        print(
            f"weight sharing: each later task reads {results['shared_pct'] / later:.2f}% of the "
            "prunable weights from earlier tasks on average, at no cost in bits"
        )
    nets = results.get("networks", [])
    if len(nets) > 1:
        print(
            f"{len(nets)} networks (capacity.when_full=grow): "
            + ", ".join(
                f"tasks {n['tasks'][0] + 1}-{n['tasks'][-1] + 1} ({n['capacity_pct']:.1f}%)"
                for n in nets
            )
        )
    gated = results.get("quality_gate_failed", [])
    if gated:
        print(
            "WARNING: committed near chance (capacity.quality_gate=warn): tasks "
            + " ".join(str(t + 1) for t in gated)
        )
    print(
        f"packed model {results['packed_bytes']:,} bytes "
        f"(dense float32 backbone: {results['dense_float32_bytes']:,} bytes)"
    )
    print(
        f"{results['seconds_total']:.1f}s total, "
        f"{tp['candidate_epochs_per_second']:.2f} candidate-epochs/s in SEARCH+TRAIN, "
        f"{100 * tp['non_training_fraction']:.1f}% of wall time outside SEARCH+TRAIN"
    )
    ev = results["evaluation"]
    lat = results["event_latency_s"]
    workers = sorted({(w.get("device"), w.get("device_name")) for w in results["workers"].values()})
    print(
        f"trained on {len(results['workers'])} worker(s): "
        + ", ".join(f"{d} ({n})" for d, n in workers)
        + f"; accuracies measured on {ev.get('device')} ({ev.get('device_name')})"
        + (
            f"; epoch events reached this log {1000 * lat['median']:.0f} ms (median) after "
            "the epoch ended"
            if lat["median"] is not None
            else ""
        )
    )
    print(f"wrote {out / 'results.json'} and {pipeline.model_path}")


if __name__ == "__main__":
    raise SystemExit(main())
