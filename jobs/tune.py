"""Entrypoint for ``ray job submit``: tune the method's settings on the cluster with Ray Tune.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"pip": ["-e ."]}' -- \\
        python jobs/tune.py --preset pmnist-quick --samples 16 --storage /mnt/shared/tune

Arguments are those of ``qpacknet tune``. Inside a Ray job the trials run on the job's
cluster; ``--storage`` must be a path every node can reach (or the head's disk on one node).
Re-submitting with ``--resume --name NAME --storage DIR`` continues an interrupted experiment.
"""

from __future__ import annotations

import sys

from qpacknet.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["tune", *sys.argv[1:]]))
