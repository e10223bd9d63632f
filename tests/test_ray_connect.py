"""Starting or joining Ray: the embedded instance stays on 127.0.0.1."""

from __future__ import annotations

import ray

from qpacknet.cluster.connect import connect, is_loopback


def test_embedded_ray_binds_to_loopback_only() -> None:
    """``connect()`` without an address starts Ray on 127.0.0.1 (Ray would otherwise pick the
    machine's external address) and says it started it, so the executor shuts it down."""
    assert not ray.is_initialized()
    assert connect() is True
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        assert connect() is False, "a second call joins, it must not claim ownership"
    finally:
        ray.shutdown()


def test_loopback_addresses_are_recognised() -> None:
    for addr in ("127.0.0.1:6379", "http://127.0.0.1:8265", "localhost:1", "[::1]:6379"):
        assert is_loopback(addr), addr
    assert not is_loopback("10.0.0.5:6379")
    assert not is_loopback("ray://head.example:10001")
