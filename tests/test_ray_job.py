"""Integration: a real head started with ``ray start``, the digits preset sent with
``ray job submit`` through ``jobs/run_scenario.py``, results checked, cluster stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # single machine on loopback: keep Ray from rewriting 127.0.0.1 to the external IP
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture
def head(tmp_path: Path) -> Iterator[str]:
    env = _env()
    subprocess.run(
        [RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60
    )
    dash = _free_port()
    start = subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={_free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert start.returncode == 0, start.stderr
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_digits(head: str, tmp_path: Path) -> None:
    out = tmp_path / "job-out"
    proc = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            head,
            "--submission-id",
            "qpacknet-test-digits",
            "--working-dir",
            str(REPO),
            "--",
            sys.executable,
            "jobs/run_scenario.py",
            "--preset",
            "digits",
            "--quiet",
            "--set",
            "scenario.num_tasks=2",
            "--no-tracking",  # tracking under Ray: test_mlflow_server, test_ray_multinode
            "--out",
            str(out),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert "task 2/2 committed" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["executor"] == "ray"
    assert len(res["tasks"]) == 2 and res["bwt"] == 0.0 and res["acc"] > 85.0
    assert (out / "model.safetensors").stat().st_size == res["packed_bytes"]

    logs = subprocess.run(
        [RAY, "job", "logs", "--address", head, "qpacknet-test-digits"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    # one line per candidate result, per stage, per task; nothing from Ray in between
    assert sum(" candidate " in ln and "sparsity" in ln for ln in lines) == 2 * 6
    for stage in ("SEARCH", "TRAIN", "QUANTIZE"):
        assert sum(f" {stage} done in " in ln for ln in lines) == 2
    assert sum("committed; test acc" in ln for ln in lines) == 2
    noise = [ln for ln in lines if "WARNING" in ln or "ERROR" in ln or ln.startswith("(")]
    assert not noise, noise
