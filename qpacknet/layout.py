"""The files of a run directory (``--out``), named in one torch-free place so that the CLI
can check an output directory before it starts Ray or imports torch."""

from __future__ import annotations

MODEL_FILE = "model.safetensors"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "checkpoint.json"
