"""Entrypoint for ``ray job submit``: add one task to a registered model version.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}}' \\
        -- python jobs/learn.py --model models:/qpacknet-pmnist/latest --out /outputs/pm-v11

Arguments are those of ``qpacknet learn``: the version is downloaded from the registry, the
next task of its stream is learned on the cluster (Ray executor unless ``--executor local``),
and the result is registered as the next version; earlier tasks stay bit-identical.
"""

from __future__ import annotations

import sys

from qpacknet.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--executor" not in args:
        args += ["--executor", "ray"]
    raise SystemExit(main(["learn", *args]))
