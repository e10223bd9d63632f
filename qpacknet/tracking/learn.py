"""``qpacknet learn``: take a registered model version, learn one more task, register the next.

A logged qpacknet model carries the packed file, the run's ``checkpoint.json`` (accuracy
matrix, per-task reports) and ``config.yaml``. Those three files are exactly a run directory
after T committed tasks, so adding task T+1 is the pipeline's ordinary resume with
``scenario.num_tasks = T + 1``: the committed tasks' words are never rewritten, so their
logits stay bit-identical, and the new version is registered under the same name.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qpacknet.checkpoint import save_checkpoint
from qpacknet.config import RunConfig, validate
from qpacknet.errors import UsageError
from qpacknet.layout import CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE

MUST_MATCH = ("net", "quantize.b_max", "scenario.name")


@dataclass(frozen=True)
class FetchedModel:
    """A registered version, downloaded: its run files and where it came from."""

    name: str
    version: str
    model_file: Path
    checkpoint: dict[str, Any]
    config: RunConfig

    @property
    def num_tasks(self) -> int:
        return len(self.checkpoint["tasks"])


def _find(root: Path, name: str) -> Path:
    found = sorted(p for p in root.rglob(name) if "code" not in p.relative_to(root).parts)
    if not found:
        raise UsageError(
            f"the model at {root} has no {name}; it was not logged by qpacknet "
            "(qpacknet run logs one version per committed task)"
        )
    return found[0]


def fetch(model_uri: str, tracking_uri: str, dst: Path) -> FetchedModel:
    """Download ``model_uri`` (``models:/NAME/VERSION|latest`` or ``runs:/ID/model``)."""
    import mlflow
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    # models:/ URIs resolve through MLflow's global registry URI (the download's own
    # registry_uri argument is not used for them); restore it, and $MLFLOW_TRACKING_URI that
    # set_tracking_uri also sets, afterwards
    before = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        local = Path(download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise UsageError(
            f"cannot load {model_uri} from {tracking_uri}: {exc.message.splitlines()[0]}; "
            "check the name and version (qpacknet run registers 'qpacknet-<scenario>' by "
            "default) and --tracking-uri"
        ) from None
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1] if before[0] else None)
    meta_file = local / "registered_model_meta"
    meta = yaml.safe_load(meta_file.read_text()) if meta_file.exists() else {}
    name = str(meta.get("model_name") or "")
    version = str(meta.get("model_version") or "")
    try:
        checkpoint = json.loads(_find(local, CHECKPOINT_FILE).read_text())
        config = validate(yaml.safe_load(_find(local, CONFIG_FILE).read_text()))
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"the model at {model_uri} has a damaged run record: {exc}") from None
    return FetchedModel(name, version, _find(local, MODEL_FILE), checkpoint, config)


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def next_task_config(model: FetchedModel, new: RunConfig | None) -> RunConfig:
    """The settings for task T+1: the model's own, or ``new`` where it is compatible (same
    backbone, word layout and scenario); ``scenario.num_tasks`` becomes T+1."""
    base = model.config.model_dump(mode="json")
    chosen = base if new is None else new.model_dump(mode="json")
    for key in MUST_MATCH:
        if _get(chosen, key) != _get(base, key):
            raise UsageError(
                f"{key} is {_get(chosen, key)!r} but the model was built with "
                f"{_get(base, key)!r}; a packed model can only grow with the settings it was "
                "built with (drop the override or the preset that changes it)"
            )
    chosen["scenario"]["num_tasks"] = model.num_tasks + 1
    return validate(chosen)


def prepare_run_dir(
    model: FetchedModel, cfg: RunConfig, out: Path, from_latest: bool = False
) -> None:
    """Make ``out`` a run directory after the model's T tasks, resumable under ``cfg``; the
    checkpoint records where it came from (``learned_from``: what ``sync`` needs to attach
    the new version to its parent)."""
    if (out / MODEL_FILE).exists():
        raise UsageError(f"{out} already holds a model; pass a new --out")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model.model_file, out / MODEL_FILE)
    state = dict(model.checkpoint)
    state["config"] = cfg.model_dump(mode="json")
    state["learned_from"] = {
        "model": model.name,
        "version": model.version,
        "tasks": model.num_tasks,
        "from_latest": from_latest,
    }
    save_checkpoint(out, state)
