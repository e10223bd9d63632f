"""Driver checkpoints: resume a run after the last committed task.

After every COMMIT the pipeline writes the packed model, then ``checkpoint.json`` (both
atomically). The checkpoint holds what cannot be recomputed from the model: the accuracy
matrix rows, the per-task reports and the run's config. Because every later draw derives from
(seed, task, candidate) and the committed store, a resumed run produces the same results as an
uninterrupted one (DESIGN.md §4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qpacknet.errors import ModelFileError, UsageError
from qpacknet.fileio import atomic_write_json
from qpacknet.layout import CHECKPOINT_FILE
from qpacknet.store import PackedStore

FORMAT = "qpacknet-checkpoint"
VERSION = 1


def save_checkpoint(out_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_json(out_dir / CHECKPOINT_FILE, {"format": FORMAT, "version": VERSION, **state})


def load_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    """The checkpoint in ``out_dir``, or None if there is none; a damaged one raises."""
    path = out_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(
            f"{path} is damaged ({exc}); to start over, use a new --out "
            f"(the packed model beside it is still intact)"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ModelFileError(
            f"{path} is not a qpacknet checkpoint (version {VERSION}); use a new --out"
        )
    for key in ("config", "matrix", "tasks", "seconds"):
        if key not in data:
            raise ModelFileError(f"{path} lacks {key!r}; use a new --out")
    if len(data["matrix"]) != len(data["tasks"]):
        raise ModelFileError(
            f"{path} is inconsistent (matrix and task lists differ); use a new --out"
        )
    return data


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that must match to continue a run: the task count may grow, and where the
    candidates train (executor) and where the run is logged (tracking) do not change what is
    learned; nor does the capacity policy, which decides only for tasks not learned yet."""
    ident = json.loads(json.dumps(config))
    quantize = ident.get("quantize")
    if isinstance(quantize, dict):  # written before the setting existed: the paper's test
        quantize.setdefault("criterion", "accuracy")
    try:  # settings added since the checkpoint was written take their defaults
        from qpacknet.config import RunConfig

        ident = RunConfig.model_validate(ident).model_dump(mode="json")
    except ValueError:
        pass
    ident.get("scenario", {}).pop("num_tasks", None)
    ident.pop("executor", None)
    ident.pop("tracking", None)
    ident.pop("capacity", None)
    ident.pop("inference", None)  # what is reported and kept for task inference, not learned
    return ident


def check_same_config(data: dict[str, Any], config: dict[str, Any], out_dir: Path) -> None:
    """Refuse to continue a run under other settings (a longer task stream is allowed)."""
    old, new = _identity(data["config"]), _identity(config)
    if old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise UsageError(
            f"{out_dir} holds a run with a different configuration (differs in: "
            f"{', '.join(changed)}); resume with the same settings or use a new --out"
        )


def truncate(store: PackedStore, num_tasks: int) -> PackedStore:
    """The store with only its first ``num_tasks`` tasks (a crash can land between saving the
    model and saving the checkpoint; the extra task is then learned again, identically)."""
    if store.num_tasks == num_tasks:
        return store
    if store.num_tasks < num_tasks:
        raise ModelFileError(
            f"the model has {store.num_tasks} tasks but the checkpoint records {num_tasks}; "
            "the run dir is inconsistent: use a new --out"
        )
    fresh = PackedStore(list(store.layers), b_max=store.b_max, meta=store.meta)
    for t in range(num_tasks):
        if store.network_of(t) == fresh.num_networks:
            fresh.grow()
        fresh.commit(
            store.mask(t),
            store.codes(t),
            store.codebooks(t),
            store.bit_widths(t),
            store.task_state(t),
            store.shared(t),
        )
        doc = store.input_preparation(t)
        if doc is not None:
            fresh.set_input_preparation(t, doc)
        stats = store.recognition_stats(t)
        if stats is not None:
            fresh.set_recognition_stats(t, stats)
    return fresh
