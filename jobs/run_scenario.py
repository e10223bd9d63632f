"""Entrypoint for ``ray job submit``: learn a whole scenario on the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"pip": ["-e ."]}' -- python jobs/run_scenario.py --preset pmnist

Arguments are those of ``qpacknet run``; inside a Ray job the run joins the job's cluster and
uses the Ray executor unless ``--executor local`` is given.
"""

from __future__ import annotations

import sys

from qpacknet.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--executor" not in args:
        args += ["--executor", "ray"]
    raise SystemExit(main(["run", *args]))
