"""Look at a qpacknet run in the real MLflow UI with headless Chromium (Debian's ``chromium``).

Starts ``mlflow server`` on 127.0.0.1, runs the digits preset against it, adds one task with
``qpacknet learn``, then opens the UI pages a user would (runs list, parent run, task run,
candidate run, the experiment's Models tab, the registered model and a version) and saves a
screenshot and the rendered text of each under ``--out``. It prints what it checked in the
rendered text: run names, descriptions, rounded values, Source/User, the alias, the versions'
tags, the logged models.

    python bench/mlflow_ui_check.py --out /tmp/ui
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qpacknet.tracking.server import mlflow_server  # noqa: E402

WORKFLOW = "workflowType=machine_learning"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: apt-get install chromium")


def page(url: str, out: Path, name: str, wait_ms: int) -> str:
    """Screenshot ``url`` to ``out/name.png`` and return its rendered text."""
    common = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=2200,1000",
        f"--virtual-time-budget={wait_ms}",
    ]
    subprocess.run(
        [*common, f"--screenshot={out / (name + '.png')}", url],
        capture_output=True,
        timeout=120,
    )
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    (out / f"{name}.html").write_text(dom)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))  # the text a reader sees


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/qpacknet-ui", help="screenshots and page texts")
    ap.add_argument("--wait-ms", type=int, default=15000, help="virtual time per page")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient

    with mlflow_server(out) as uri:
        py = [sys.executable, "-m", "qpacknet"]
        run_dir = out / "runs" / f"digits-{time.strftime('%Y%m%d-%H%M%S')}"
        subprocess.run(
            [*py, "run", "--preset", "digits", "--set", "scenario.num_tasks=3", "--executor",
             "local", "--quiet", "--tracking-uri", uri, "--out", str(run_dir)],
            check=True, cwd=ROOT,
        )  # fmt: skip
        subprocess.run(
            [*py, "learn", "--model", "models:/qpacknet-digits/latest", "--tracking-uri", uri,
             "--executor", "local", "--quiet", "--out", str(out / "runs" / "learned")],
            check=True, cwd=ROOT,
        )  # fmt: skip
        client = MlflowClient(uri, uri)
        exp = client.get_experiment_by_name("qpacknet")
        runs = client.search_runs([exp.experiment_id], max_results=200)
        parent = next(r for r in runs if r.info.run_name == run_dir.name)
        task = next(
            r
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
            and r.info.run_name == "task-2"
        )
        cand = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == task.info.run_id)
        e = exp.experiment_id
        pages = {
            "1-runs": f"{uri}/#/experiments/{e}/runs?{WORKFLOW}",
            "2-parent": f"{uri}/#/experiments/{e}/runs/{parent.info.run_id}?{WORKFLOW}",
            "3-task": f"{uri}/#/experiments/{e}/runs/{task.info.run_id}?{WORKFLOW}",
            "4-candidate": f"{uri}/#/experiments/{e}/runs/{cand.info.run_id}?{WORKFLOW}",
            "5-models-tab": f"{uri}/#/experiments/{e}/models?{WORKFLOW}",
            "6-registered": f"{uri}/#/models/qpacknet-digits?{WORKFLOW}",
            "7-version": f"{uri}/#/models/qpacknet-digits/versions/4?{WORKFLOW}",
        }
        texts = {name: page(url, out, name, args.wait_ms) for name, url in pages.items()}
        checks = {
            "runs list shows the run name once": run_dir.name in texts["1-runs"]
            and f"digits-{run_dir.name}" not in texts["1-runs"],
            "parent run shows its description": "tasks of digits" in texts["2-parent"],
            "parent run shows Source": "qpacknet run --preset digits" in texts["2-parent"],
            "task run named task-2 with tag 2": "task-2" in texts["3-task"],
            "task run has a description": "Task 2: candidate" in texts["3-task"],
            "no unrounded value on the task page": "00000000" not in texts["3-task"],
            "candidate run page": "task-2-candidate-" in texts["4-candidate"],
            "models tab lists logged models": "packed-after-task-" in texts["5-models-tab"],
            "runs list shows the models": "qpacknet-digits v3" in texts["1-runs"],
            "registered model shows champion": "champion" in texts["6-registered"],
            "registered model has a description": "Version N+1 holds" in texts["6-registered"],
            "version shows its parent and ACC": "qpacknet.parent_version" in texts["7-version"]
            and "qpacknet.acc" in texts["7-version"],
        }
    for what, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    (out / "checks.json").write_text(json.dumps(checks, indent=2) + "\n")
    print(f"screenshots and page texts in {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
