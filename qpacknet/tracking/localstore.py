"""The embedded tracking store: a sqlite file in the output directory.

Creating an MLflow sqlite store runs its whole schema migration history, on every run. An
empty store at the current schema is the same file each time, so it is built once per MLflow
version in the user's cache directory and copied (write, then rename) into a new run's output
directory; MLflow then only checks that the schema is current.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qpacknet"


def _template() -> Path | None:
    """An empty, migrated store for this MLflow version (built on first use), or None."""
    import mlflow

    path = _cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".db.tmp")
        os.close(fd)
        os.unlink(tmp)
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def prepare(db: Path) -> None:
    """Give ``db`` an empty current-schema store if it does not exist yet."""
    if db.exists():
        return
    template = _template()
    if template is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_suffix(".db.tmp")
    shutil.copyfile(template, tmp)
    os.replace(tmp, db)
