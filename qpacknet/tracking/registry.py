"""Registered-model lineage: every version names its parent, and no parent gets two children.

``qpacknet learn`` turns version V (T tasks) into version V' (T+1 tasks). Two learns started
from the same V would register two children of V, and whichever is newer would silently drop
the other's task from ``latest``. Three guards, from the cheapest:

1. :func:`hold_registered_model`: one learn per registered model at a time on a host (a
   ``flock`` keyed by tracking URI and model name; Ray job drivers all run on the head node, so
   this covers jobs submitted to one cluster). A second learn waits, printing who it waits
   for, then resolves ``latest`` again and learns on top of the first one's new version.
2. :func:`check_before_register`: right before registering, the parent must have no child yet
   and, for a learn from ``latest``, must still be the newest version (compare-and-set).
3. :func:`check_after_register`: if learns on two hosts registered at the same moment, the
   lower version number wins; the other withdraws its version and stops with exit 2.

Each version carries ``qpacknet.parent_version`` (empty for a run's first task).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpacknet.errors import UsageError
from qpacknet.rundir_lock import read_holder, write_holder

PARENT_TAG = "qpacknet.parent_version"
ALIAS = "champion"
WAIT_REPORT_S = 30.0


class RegistryConflict(UsageError):
    """Another learn registered a child of the same parent first (exit 2)."""


@dataclass(frozen=True)
class Lineage:
    """Where a learn's new version attaches: ``parent`` (a version number), whether it was
    asked for as ``latest`` (then it must still be the newest when registering), and the
    first task the learn adds (the parent's task count)."""

    parent: str
    from_latest: bool
    work_dir: str
    first_task: int = 0


def parent_of(
    task: int, lineage: Lineage | None, versions: dict[int, str], work_dir: str
) -> tuple[str | None, Lineage | None]:
    """The version task ``task``'s version extends ('' for a run's first task; None when the
    previous task's version is unknown, e.g. its registration failed) and the compare-and-set
    guard: every version with a parent must be that parent's only child (a learn's first task
    also checks that ``latest`` did not move)."""
    first = lineage.first_task if lineage is not None else 0
    if task == first:
        parent = lineage.parent if lineage is not None else ""
        return parent, lineage if parent else None
    parent = versions.get(task - 1)
    return parent, Lineage(parent, False, work_dir, task) if parent else None


def lock_dir() -> Path:
    """``$QPACKNET_LOCK_DIR``, else ``~/.cache/qpacknet/locks``."""
    env = os.environ.get("QPACKNET_LOCK_DIR")
    return Path(env) if env else Path.home() / ".cache" / "qpacknet" / "locks"


def _lock_path(tracking_uri: str, name: str) -> Path:
    digest = hashlib.sha256(f"{tracking_uri}\n{name}".encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60]
    return lock_dir() / f"{safe}-{digest}.lock"


@contextlib.contextmanager
def hold_registered_model(
    tracking_uri: str,
    name: str,
    command: str,
    wait: bool = True,
    say: Callable[[str], None] = print,
) -> Iterator[None]:
    """Be the only learn of ``name`` at ``tracking_uri`` on this host while the block runs.

    With ``wait`` a busy model is waited for (``say`` reports the holder at once and every
    :data:`WAIT_REPORT_S` seconds); without it :class:`RegistryConflict` is raised."""
    path = _lock_path(tracking_uri, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = time.monotonic()
        reported = -1.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = read_holder(fd)
                who = (
                    f"{holder.get('command')} (pid {holder.get('pid')} on {holder.get('host')})"
                    if holder
                    else "another learn"
                )
                if not wait:
                    raise RegistryConflict(
                        f"registered model {name!r} is being extended by {who}; run again "
                        "when it has finished (without --no-wait, learn waits for it)"
                    ) from None
                waited = time.monotonic() - started
                if reported < 0 or waited - reported >= WAIT_REPORT_S:
                    say(
                        f"waiting for {who}, which is adding a task to {name!r}"
                        + (f" ({waited:.0f} s so far)" if reported >= 0 else "")
                        + "; this learn then continues from the version it registers"
                    )
                    reported = waited
                time.sleep(0.5)
        write_holder(fd, command)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def versions_of(client: Any, name: str) -> list[Any]:
    """Every version of ``name`` (all pages), oldest first."""
    out: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            break
    return sorted(out, key=lambda v: int(v.version))


def children_of(versions: list[Any], parent: str) -> list[Any]:
    return [v for v in versions if (v.tags or {}).get(PARENT_TAG) == parent]


def _describe(v: Any) -> str:
    tags = v.tags or {}
    return (
        f"version {v.version} ({tags.get('qpacknet.tasks', '?')} tasks, "
        f"from version {tags.get(PARENT_TAG) or '-'}, run {v.run_id})"
    )


def _retry_hint(name: str, lineage: Lineage) -> str:
    return (
        f"the task is committed in {lineage.work_dir} but not registered; to add it on top, "
        f"run qpacknet learn --model models:/{name}/latest again"
    )


def check_before_register(
    client: Any, name: str, lineage: Lineage, before_training: bool = False
) -> None:
    """Compare-and-set, read side: raise :class:`RegistryConflict` if version
    ``lineage.parent`` already has a child, or (from ``latest``) is no longer the newest.
    ``before_training``: the check a learn from an explicit version makes before it trains."""
    versions = versions_of(client, name)
    taken = children_of(versions, lineage.parent)
    if taken and before_training:
        child = taken[0].version
        raise RegistryConflict(
            f"version {lineage.parent} of {name!r} already has a child, {_describe(taken[0])}; "
            f"learning on top of version {lineage.parent} again would fork the registry. Learn "
            f"on top of models:/{name}/{child} or models:/{name}/latest instead"
        )
    if taken:
        raise RegistryConflict(
            f"version {lineage.parent} of {name!r} already has a child: "
            f"{_describe(taken[0])}, registered while this learn ran; " + _retry_hint(name, lineage)
        )
    if lineage.from_latest and versions and str(versions[-1].version) != lineage.parent:
        raise RegistryConflict(
            f"'latest' of {name!r} moved from version {lineage.parent} to "
            f"{_describe(versions[-1])} while this learn ran; " + _retry_hint(name, lineage)
        )


def check_after_register(client: Any, name: str, lineage: Lineage, version: str) -> None:
    """Compare-and-set, write side: if another child of the parent got a lower version
    number (two hosts registering at once), withdraw ``version`` and raise."""
    rivals = [
        v
        for v in children_of(versions_of(client, name), lineage.parent)
        if str(v.version) != version
    ]
    first = min(rivals, key=lambda v: int(v.version), default=None)
    if first is None or int(first.version) > int(version):
        return
    client.delete_model_version(name, version)
    raise RegistryConflict(
        f"{_describe(first)} was registered from version {lineage.parent} of {name!r} at the "
        f"same time as this learn's version {version}, which was withdrawn; "
        + _retry_hint(name, lineage)
    )


def say_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
