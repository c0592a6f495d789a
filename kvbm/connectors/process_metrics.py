"""One `KvbmMetrics` per process for the connectors' two sides, served once while either side is open.

An engine may run its scheduler and a worker in one process (one GPU) or in several; both sides record into the
process's metrics (lookups and hit rates on the scheduler side, transfers on the worker side), and the first side
to open serves them on ``DYN_KVBM_METRICS_HOST:DYN_KVBM_METRICS_PORT`` when ``DYN_KVBM_METRICS`` is set. A
process that finds the port taken (another process of the same engine serves it) logs that and records only.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from kvbm.config import KvbmConfig
from kvbm.metrics import KvbmMetrics

__all__ = ["acquire", "release", "build_with"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_lock = threading.Lock()
_state: dict = {"metrics": None, "users": 0, "serving": False}


def acquire(config: KvbmConfig) -> KvbmMetrics:
    """The process's metrics (served from now on when ``config.metrics``); pair with `release`."""
    with _lock:
        if _state["metrics"] is None:
            _state["metrics"] = KvbmMetrics()
        _state["users"] += 1
        metrics = _state["metrics"]
        if config.metrics and not _state["serving"]:
            try:
                port = metrics.start_server(config.metrics_port, host=config.metrics_host)
                _state["serving"] = True
                log.info("kvbm metrics served on %s:%d", config.metrics_host, port)
            except OSError as e:
                log.warning("kvbm metrics not served from this process: %s", e)
        return metrics


def release() -> None:
    """One side closed; the last one stops the server and drops the metrics."""
    with _lock:
        _state["users"] = max(0, _state["users"] - 1)
        if _state["users"] == 0 and _state["metrics"] is not None:
            if _state["serving"]:
                _state["metrics"].stop_server()
            _state.update(metrics=None, serving=False)


def build_with(config: KvbmConfig, build: Callable[[KvbmMetrics], T]) -> T:
    """``build(metrics)`` with the process's metrics acquired, released again if it raises."""
    metrics = acquire(config)
    try:
        return build(metrics)
    except BaseException:
        release()
        raise
