"""One Tune trial: a whole scenario run with the sampled settings, reported after every task.

Each committed task is reported to Tune with ACC (mean test accuracy over the tasks so far),
BWT and capacity, together with the run directory (packed model + ``checkpoint.json``) as
the trial's checkpoint. ``training_iteration`` therefore counts committed tasks, which is what
ASHA's rungs compare. A retried trial (``FailureConfig``) restores its last Tune checkpoint and
the pipeline resumes after the last committed task, exactly as ``qpacknet run`` resumes.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from qpacknet.observers import RunObserver, TaskCommitted

FAIL_MARKER_ENV = "QPACKNET_TEST_TRIAL_FAIL_ONCE"
RUN_DIR = "qpacknet-run"
PROGRESS_LOG = "progress.log"


class TuneReporter(RunObserver):
    """Reports each committed task to Tune, with the run directory as checkpoint."""

    def task_committed(self, event: TaskCommitted) -> None:
        from ray import tune

        metrics = {
            "val_acc": event.val_acc,
            "acc": event.acc,  # test accuracy: reported beside, never used to choose
            "bwt": event.bwt,
            "capacity_pct": event.capacity_pct,
            "task": event.task + 1,
            "num_tasks": event.num_tasks,
            "bit_width": event.report["bit_width"],
        }
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(event.out_dir)))
        _maybe_fail(event)


def _maybe_fail(event: TaskCommitted) -> None:
    """Fault injection for tests: if the file ``$QPACKNET_TEST_TRIAL_FAIL_ONCE`` exists after the
    first task was reported, remove it and fail this trial (Tune must retry it)."""
    marker = os.environ.get(FAIL_MARKER_ENV)
    if marker and event.task == 0 and event.num_tasks > 1:
        try:
            os.unlink(marker)
        except FileNotFoundError:
            return
        raise RuntimeError("injected trial failure (test)")


def _prepare_run_dir(out: Path) -> None:
    """Start from Tune's last checkpoint of this trial, or from nothing: a local directory
    left by a failed attempt may be one task ahead of what Tune recorded."""
    from ray import tune

    shutil.rmtree(out, ignore_errors=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        out.mkdir(parents=True)
        return
    with checkpoint.as_directory() as saved:
        shutil.copytree(saved, out)


def run_trial(
    sample: dict[str, Any], *, base: dict[str, Any], data_dir: str | None, threads: int
) -> None:
    """Tune's function trainable (bound with ``tune.with_parameters``)."""
    import torch

    from qpacknet.executor import LocalExecutor
    from qpacknet.pipeline import Pipeline, resolve_device
    from qpacknet.progress import Progress
    from qpacknet.scenarios import build_stream
    from qpacknet.tuning.space import trial_config

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # a line per checkpoint is noise
    cfg = trial_config(base, sample)
    torch.set_num_threads(threads)
    out = Path.cwd() / RUN_DIR
    _prepare_run_dir(out)
    device = resolve_device(cfg.device)
    stream = build_stream(cfg.scenario, cfg.seed, data_dir, device)
    with (out.parent / PROGRESS_LOG).open("a") as log:
        progress = Progress(stream=log, verbose=False)
        Pipeline(cfg, stream, LocalExecutor(), out, progress, observers=[TuneReporter()]).run()
