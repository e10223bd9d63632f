"""One live writer per run directory.

``run``, ``add_task`` and ``learn`` rewrite a run directory's model, checkpoint and results
(and ``sync`` its ``mlflow.json``);
two of them on one directory would interleave their commits. Each holds an exclusive
``flock`` on ``<out>/.qpacknet.lock`` for as long as it writes, and records in that file who it
is, so that a second writer is refused at once with the holder's pid, host and command. The
kernel drops the lock when its process dies, however it dies (``kill -9`` included), so a
crashed run's directory is taken over and resumed as before; no stale-lock clean-up exists
or is needed. (``flock`` is per host: directories on a network share written from two hosts
are not covered.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from qpacknet.errors import UsageError

LOCK_FILE = ".qpacknet.lock"

_held: dict[Path, tuple[int, int]] = {}


class RunDirBusy(UsageError):
    """Another live process is writing the run directory (exit 2)."""


def read_holder(fd: int) -> dict[str, object]:
    """The record a lock's holder wrote through :func:`write_holder`, read through ``fd``
    (it may be mid-write: then try again; ``{}`` when it never becomes readable)."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 65536, 0))
        except ValueError:
            time.sleep(0.05)
            continue
        return info if isinstance(info, dict) else {}
    return {}


def write_holder(fd: int, command: str) -> None:
    """Say in the locked file who holds it: pid, host, command and start time."""
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.time(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)


def _describe(out: Path, info: dict[str, object]) -> str:
    if not info:
        return f"{out} is being written by another live qpacknet process (it has not said which)"
    started = info.get("started")
    since = (
        time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(float(started)))
        if isinstance(started, int | float)
        else ""
    )
    return (
        f"{out} is being written by {info.get('command', 'another qpacknet process')} "
        f"(pid {info.get('pid')} on host {info.get('host')}{since})"
    )


@contextlib.contextmanager
def hold_run_dir(out: Path, command: str | None = None) -> Iterator[None]:
    """Hold ``out`` for this process while the block runs (re-entrant within a process: a
    command that calls another, like ``add_task`` → ``run``, holds it once).

    Raises :class:`RunDirBusy` when another live process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            _release(key)
        return
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        info = read_holder(fd)
        os.close(fd)
        raise RunDirBusy(
            f"{_describe(out, info)}; one process writes a run directory at a time. Wait for "
            f"it to finish (or stop it: kill {info.get('pid', '<pid>')}) and run again, which "
            "resumes from its last committed task, or pass another --out"
        ) from None
    try:
        write_holder(fd, command or " ".join(["qpacknet", *sys.argv[1:]]))
    except OSError:
        os.close(fd)  # drops the lock again: a full disk must not leave it held
        raise
    _held[key] = (fd, 1)
    try:
        yield
    finally:
        _release(key)


def _release(key: Path) -> None:
    fd, depth = _held[key]
    if depth > 1:
        _held[key] = (fd, depth - 1)
        return
    del _held[key]
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # closing the last descriptor drops the flock
