"""``qpacknet tune``: a Ray Tune search whose trials are whole scenario runs.

ASHA stops trials whose ACC trails at a rung (rungs are counted in committed tasks), failed
trials are retried from their last checkpoint (``FailureConfig``), and the experiment lives in
``storage/name`` so that a killed driver resumes it with ``--resume``. The base settings and
the space are saved next to it, so resuming needs nothing but the name.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from ray import tune

from qpacknet.config import RunConfig
from qpacknet.errors import UsageError
from qpacknet.fileio import atomic_write_json
from qpacknet.tuning.pareto import TrialPoint, pareto_table
from qpacknet.tuning.space import TuneSpec, check_spec

SPEC_FILE = "qpacknet-tune.json"


class LineReporter(tune.Callback):
    """One line per trial result, completion and failure (Tune's own tables are turned off).
    Module-level and stream-free because Tune pickles callbacks with the experiment."""

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks

    def _say(self, text: str) -> None:
        print(text, flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict) -> None:
        self._say(
            f"trial {trial.trial_id} task {result.get('task')}/{self.num_tasks}: "
            f"val ACC {result.get('val_acc', float('nan')):.2f}  "
            f"(test {result.get('acc', float('nan')):.2f})  "
            f"capacity {result.get('capacity_pct', float('nan')):.2f}%"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        done = (trial.last_result or {}).get("task", 0)
        how = "finished" if done == self.num_tasks else f"stopped by ASHA after {done} tasks"
        self._say(f"trial {trial.trial_id} {how}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(
            f"trial {trial.trial_id} failed ({_last_error(trial)}); retrying from its last "
            f"checkpoint; traceback in {trial.error_file}"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(
            f"trial {trial.trial_id} failed for good ({_last_error(trial)}); "
            f"traceback in {trial.error_file}"
        )


def _last_error(trial: Any) -> str:
    """The exception line of a failed trial's traceback file."""
    try:
        lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
    except (OSError, TypeError):
        return "no error file"
    return lines[-1].strip() if lines else "empty error file"


class _DropRestoreNoise(logging.Filter):
    """A trial restored from its checkpoint has no result log in storage yet; Tune warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Remote file not found")


def _quiet_tune() -> None:
    """Our one line per trial event replaces Tune's tables and hints: its legacy reporter at
    verbosity 0 prints nothing, failures get one line naming the traceback file, and the
    "frequent experiment snapshots" warning is expected here (every task is a checkpoint)."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tune_log = logging.getLogger("ray.tune.logger.logger")
    if not any(isinstance(f, _DropRestoreNoise) for f in tune_log.filters):
        tune_log.addFilter(_DropRestoreNoise())


def _trainable(base: dict[str, Any], spec: TuneSpec, data_dir: str | None) -> Any:
    from qpacknet.tuning.trial import run_trial

    bound = tune.with_parameters(
        run_trial, base=base, data_dir=data_dir, threads=max(1, int(spec.cpus_per_trial))
    )
    return tune.with_resources(bound, {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})


def _new_tuner(trainable: Any, spec: TuneSpec, base: RunConfig, name: str, storage: Path) -> Any:
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    num_tasks = base.scenario.num_tasks
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=num_tasks,
        grace_period=min(spec.grace_period, num_tasks),
        reduction_factor=spec.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode="max",
            scheduler=scheduler,
            num_samples=spec.num_samples,
            search_alg=BasicVariantGenerator(
                random_state=spec.seed, max_concurrent=spec.max_concurrent or 0
            ),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[LineReporter(num_tasks)],
            verbose=0,
        ),
    )


def points(grid: Any, num_tasks: int) -> tuple[list[TrialPoint], int, int]:
    """Finished trials as points, plus the counts of early-stopped and failed trials."""
    finished: list[TrialPoint] = []
    stopped = failed = 0
    for result in grid:
        m = result.metrics or {}
        if result.error is not None:
            failed += 1
        elif m.get("task") == num_tasks:
            params = {k: v for k, v in (result.config or {}).items()}
            finished.append(
                TrialPoint(
                    trial_id=str(m.get("trial_id")),
                    val_acc=float(m["val_acc"]),
                    test_acc=float(m.get("acc", float("nan"))),
                    capacity_pct=float(m["capacity_pct"]),
                    tasks=int(m["task"]),
                    params=params,
                    path=result.checkpoint.path if result.checkpoint else "",
                )
            )
        else:
            stopped += 1
    return finished, stopped, failed


def run_tune(
    base: RunConfig | None,
    spec: TuneSpec | None,
    *,
    name: str,
    storage: str | Path,
    data_dir: str | None,
    resume: bool,
    out: TextIO | None = None,
) -> list[TrialPoint]:
    """Run (or with ``resume`` continue) the experiment ``storage/name``; print and return the
    Pareto front of finished trials."""
    from qpacknet.cluster.connect import connect

    out = out or sys.stdout
    storage = Path(storage).resolve()
    path = storage / name
    if resume:
        if not (path / SPEC_FILE).is_file() or not tune.Tuner.can_restore(str(path)):
            raise UsageError(
                f"no qpacknet Tune experiment to resume at {path}; check --name/--storage, "
                "or start one without --resume"
            )
        saved = json.loads((path / SPEC_FILE).read_text())
        base = RunConfig.model_validate(saved["base"])
        spec = TuneSpec.model_validate(saved["spec"])
        data_dir = saved["data_dir"]
    else:
        if base is None or spec is None:
            raise UsageError("a new Tune experiment needs base settings and a space")
        if path.exists():
            raise UsageError(
                f"{path} already exists; pass --resume to continue that experiment, "
                "or choose another --name"
            )
    assert base is not None and spec is not None
    base = base.model_copy(update={"executor": base.executor.model_copy(update={"kind": "local"})})
    base_data = base.model_dump(mode="json")
    check_spec(spec, base_data)
    data_dir = str(Path(data_dir).resolve()) if data_dir else None
    _quiet_tune()
    started = connect()
    try:
        trainable = _trainable(base_data, spec, data_dir)
        if resume:
            out.write(f"resuming Tune experiment {path}\n")
            tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
        else:
            tuner = _new_tuner(trainable, spec, base, name, storage)
            path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                path / SPEC_FILE,
                {"base": base_data, "spec": spec.model_dump(mode="json"), "data_dir": data_dir},
            )
        out.write(
            f"tuning {len(spec.space)} settings over {spec.num_samples} trials of "
            f"{base.scenario.name} ({base.scenario.num_tasks} tasks); experiment {path}\n"
        )
        out.flush()
        grid = tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    finished, stopped, failed = points(grid, base.scenario.num_tasks)
    out.write(
        f"\n{len(finished)} trials finished, {stopped} stopped early by ASHA, {failed} failed.\n"
        "Pareto front on validation data (no other finished trial has both higher validation "
        "ACC and lower capacity; test ACC is shown, never used):\n"
    )
    out.write(pareto_table(finished) + "\n")
    return finished
