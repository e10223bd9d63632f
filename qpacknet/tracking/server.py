"""A local MLflow tracking server (sqlite backend, proxied artifacts, bound to 127.0.0.1), for
the tests and benchmarks that need a real server rather than a local store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mlflow_server(
    root: Path, timeout_s: float = 90.0, port: int | None = None, kill: bool = False
) -> Iterator[str]:
    """Start ``mlflow server`` under ``root`` (its sqlite store and artifacts are kept there, so
    a server started again on the same ``root`` and ``port`` serves the same record); yield
    its URI; stop it (and its workers), with ``kill`` at once (SIGKILL, as a crash would)."""
    from qpacknet.tracking.localstore import prepare

    port = port or free_port()
    prepare(root / "mlflow.db")  # a migrated copy: the server skips MLflow's schema migrations
    mlflow = Path(sys.executable).parent / "mlflow"
    log = (root / "server.log").open("a")
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # MLflow 3's job runner (GenAI evaluation jobs; a pool of consumer processes) is not
        # used by qpacknet and costs seconds of start-up on a small machine
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not come up in time")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
