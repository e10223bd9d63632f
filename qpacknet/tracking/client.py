"""MLflow calls that cannot break a run.

Every call goes through :meth:`SafeTracking.call`. The first failure (server unreachable,
rejected request, full disk) is reported once as a warning and switches tracking off for the
rest of this process's run, so a dead server costs one bounded attempt: MLflow's HTTP retry
settings are set for the run (``http_retries`` retries, 1 s backoff factor, ``http_timeout_s``
per request) instead of MLflow's defaults (7 retries, backoff factor 2, 120 s timeouts), which
can stall a run for many minutes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("qpacknet.tracking")
T = TypeVar("T")


def configure_http(timeout_s: float, retries: int) -> None:
    """MLflow reads these on every request; set them in each process that talks to MLflow."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0.5"


class SafeTracking:
    """An ``MlflowClient`` for ``uri`` whose failures become one warning, then silence."""

    def __init__(self, uri: str, timeout_s: float, retries: int, where: str) -> None:
        configure_http(timeout_s, retries)
        from mlflow import MlflowClient

        self.uri = uri
        self.where = where
        self.broken = False
        self.failure = ""
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)``, or None once tracking is off or if this call fails."""
        if self.broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # tracking must never stop training
            self.broken = True
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.failure = f"{what} ({type(exc).__name__}: {first[:300]})"
            log.warning(
                "MLflow tracking at %s failed while %s (%s: %s); tracking is off for the rest "
                "of this run in %s. Training goes on and everything is still written to the "
                "output directory.",
                self.uri,
                what,
                type(exc).__name__,
                first[:300],
                self.where,
            )
            return None

    def lookup(self, what: str, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)`` for something that may not exist: None when the store says it does
        not (MLflow's ``RESOURCE_DOES_NOT_EXIST``, an answer, not a failure). Any other error
        is a failure like in :meth:`call` (one warning, tracking off) and also gives None, so
        callers tell the two apart by :attr:`broken`."""
        from mlflow.exceptions import MlflowException

        if self.broken:
            return None
        try:
            return fn(*args)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            return self.fail(what, exc)
        except Exception as exc:
            return self.fail(what, exc)

    def fail(self, what: str, exc: BaseException) -> None:
        """Report an error caught outside :meth:`call` the way :meth:`call` reports its own:
        one warning, then tracking is off."""

        def again() -> None:
            raise exc

        self.call(what, again)


class Background:
    """One worker thread that runs logging jobs in order, off the training thread: training
    never waits for the tracking store except at :meth:`flush` (end of a task or run)."""

    def __init__(self, name: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._pending: list[Any] = []

    def submit(self, fn: Callable[[], None]) -> None:
        self._pending.append(self._pool.submit(fn))

    def flush(self) -> None:
        """Wait for every job submitted so far (their errors were already turned into one
        warning by :class:`SafeTracking`; anything else is logged here, never raised)."""
        pending, self._pending = self._pending, []
        for fut in pending:
            try:
                fut.result()
            except Exception as exc:  # a bug in a logging job must not stop the run
                log.warning("an MLflow logging job failed: %s: %s", type(exc).__name__, exc)

    def close(self) -> None:
        self.flush()
        self._pool.shutdown(wait=True)
