"""The `KvbmMetrics` of the connector sides open in one process, each served while a side using it is open.

An engine may run its scheduler and its workers in one process (one GPU) or in several (vLLM's multiprocessing
executor: the scheduler in the engine core, each worker rank in its own process). Every side records into the
metrics it acquires, and the first side to open them serves them when ``DYN_KVBM_METRICS`` is set:

- the process's metrics (``rank=None``), on ``DYN_KVBM_METRICS_HOST:DYN_KVBM_METRICS_PORT``: the scheduler side
  (lookups, hit rates, the cost rule, the worker ranks' registration), and in a single-process engine its worker
  too (``sides="both"``: one port, the series as Dynamo KVBM names them, no rank label);
- a worker rank's own metrics (``rank=r``), on ``DYN_KVBM_METRICS_PORT + 1 + r``: a worker of an engine whose
  ranks run apart from the scheduler (``sides="worker"``: transfers, labelled ``rank="r"``), or a rank that is an
  engine of its own (SGLang's tensor-parallel ranks, each its own index and tiers: ``sides="both"``).

A Prometheus server scraping the base port and the next world-size ports sees every series once. A process that
finds its port taken (another process serves it) logs that and records only.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kvbm.config import KvbmConfig
from kvbm.metrics import KvbmMetrics

__all__ = ["acquire", "release", "build_with", "port_of"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_lock = threading.Lock()


@dataclass
class _Entry:
    metrics: KvbmMetrics
    users: int = 0
    serving: bool = False


_entries: dict[int | None, _Entry] = {}  # rank (None: the process's) -> its metrics


def port_of(config: KvbmConfig, rank: int | None) -> int:
    """Where the metrics of ``rank`` are served: ``DYN_KVBM_METRICS_PORT`` for the process's (None), the next
    ports for ranks 0, 1, ..."""
    return config.metrics_port if rank is None else config.metrics_port + 1 + rank


def acquire(config: KvbmConfig, *, rank: int | None = None, sides: str = "both") -> KvbmMetrics:
    """The metrics of ``rank`` in this process (the process's own for None), holding ``sides``' series (served from
    now on when ``config.metrics``); pair with ``release(rank)``. Raises ValueError when they are open already with
    other sides."""
    with _lock:
        entry = _entries.get(rank)
        if entry is None:
            entry = _entries[rank] = _Entry(KvbmMetrics(sides=sides, rank=rank))
        elif entry.metrics.sides != sides:
            raise ValueError(f"kvbm metrics of {'this process' if rank is None else f'rank {rank}'} are open with "
                             f"sides={entry.metrics.sides!r}; asked for sides={sides!r}")
        entry.users += 1
        if config.metrics and not entry.serving:
            port = port_of(config, rank)
            try:
                entry.metrics.start_server(port, host=config.metrics_host)
                entry.serving = True
                log.info("kvbm metrics%s served on %s:%d", "" if rank is None else f" of rank {rank}",
                         config.metrics_host, port)
            except (OSError, ValueError) as e:
                log.warning("kvbm metrics%s not served from this process (they are recorded only): %s",
                            "" if rank is None else f" of rank {rank} (DYN_KVBM_METRICS_PORT + 1 + {rank})", e)
        return entry.metrics


def release(rank: int | None = None) -> None:
    """One side using ``rank``'s metrics closed; the last one stops their server and drops them."""
    with _lock:
        entry = _entries.get(rank)
        if entry is None:
            return
        entry.users -= 1
        if entry.users <= 0:
            if entry.serving:
                entry.metrics.stop_server()
            del _entries[rank]


def build_with(config: KvbmConfig, build: Callable[[KvbmMetrics], T], *, rank: int | None = None,
               sides: str = "both") -> T:
    """``build(metrics)`` with ``rank``'s metrics acquired, released again if it raises."""
    metrics = acquire(config, rank=rank, sides=sides)
    try:
        return build(metrics)
    except BaseException:
        release(rank)
        raise
