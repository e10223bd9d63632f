"""Attach to a Ray cluster or start an embedded one on 127.0.0.1.

Imports only Ray (not torch), so the CLI can start Ray while another thread imports torch
and loads the data. ``bench/executors.py`` reports what Ray still adds per run (its "outside
search+train" row).
"""

from __future__ import annotations

import logging
import os

import ray

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


def keep_loopback() -> None:
    """Make Ray keep a 127.0.0.1 node address instead of rewriting it to the machine's
    external IP (where nothing listens when the cluster is bound to loopback). Ray reads the
    switch ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once at import, so set both."""
    from ray._private import ray_constants

    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


def connect(address: str | None = None) -> bool:
    """Join the cluster named by ``address``/``RAY_ADDRESS`` (or the Ray job's own), else start
    an embedded local instance bound to 127.0.0.1. Returns True if this call started Ray (the
    caller then shuts it down). Ray's INFO lines are kept out of the run's log."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": True, "logging_level": logging.WARNING, "configure_logging": True}
    if address:
        if is_loopback(address):
            keep_loopback()
        ray.init(address=address, **quiet)
        return False
    keep_loopback()
    token_log = logging.getLogger(_TOKEN_LOGGER)
    level = token_log.level
    token_log.setLevel(logging.ERROR)  # "token auth is enabled": true, and not news per run
    try:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, **quiet)
    finally:
        token_log.setLevel(level)
    return True
