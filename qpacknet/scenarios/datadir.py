"""Where data sets live on disk, and whether qpacknet may write there.

Shared data folders on a cluster are often read-only; every loader asks :func:`is_writable`
before it downloads anything, so that a read-only folder is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "QPACKNET_DATA"
DEFAULT_DATA_DIR = "data"


def resolve_data_dir(cli_value: str | None) -> Path:
    """The data folder: ``--data-dir`` if given, else ``$QPACKNET_DATA``, else ``./data``.

    The command-line value wins so that one run can point elsewhere without changing the
    environment that a whole cluster shares.
    """
    if cli_value:
        return Path(cli_value).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_DATA_DIR)


def is_writable(path: Path | str) -> bool:
    """Whether files could be created at ``path``.

    True for an existing folder we may write into, or for a path that does not exist yet
    whose nearest existing ancestor is such a folder (it would be created on demand).
    An existing non-folder (a file in the way) is not writable.
    """
    p = Path(path).expanduser().absolute()
    if p.exists():
        return p.is_dir() and os.access(p, os.W_OK | os.X_OK)
    for parent in p.parents:
        if parent.exists():
            return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    return False
