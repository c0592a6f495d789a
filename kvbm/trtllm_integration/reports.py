"""The in-process channel from the rank-0 TensorRT-LLM worker to the leader: its block geometry and its reports.

TensorRT-LLM's connector interface carries nothing from the workers back to the scheduler side except finished
request ids, yet the leader's block index must learn every move's result (a store commits its slots, a load
releases its holds, a failed block is discarded). In the PyTorch backend the leader and the rank-0 worker live in
one process, so the worker posts its `WorkerReport`s here (in ``get_finished``) and the leader drains them (when
it builds a step's metadata and when a request finishes). The worker also announces its block geometry once, when
it registers the KV cache: ``llm_args`` does not describe the model's KV, and the leader sizes its tiers for the
worker's block bytes. Only plain data crosses, never the worker's store. Multi-rank set-ups are refused at
start-up by both connector sides.
"""
from __future__ import annotations

import threading
from collections import deque

from kvbm.connectors.messages import WorkerReport

__all__ = ["attach", "detach", "geometry", "post", "drain"]

_lock = threading.Lock()
_geometry: tuple[int, int] | None = None  # (tokens per block, bytes per block) of the attached worker
_reports: deque[WorkerReport] = deque()


def attach(block_size: int, block_bytes: int) -> None:
    """A worker registered its KV cache; a second live worker in the same process is refused."""
    global _geometry
    with _lock:
        if _geometry is not None:
            raise RuntimeError("a kvbm TensorRT-LLM worker is already registered in this process (one rank per "
                               "process is supported); close it before registering another")
        _geometry = (block_size, block_bytes)
        _reports.clear()


def detach() -> None:
    """The attached worker closed: forget its geometry and its undrained reports."""
    global _geometry
    with _lock:
        _geometry = None
        _reports.clear()


def geometry() -> tuple[int, int]:
    """``(tokens per block, bytes per block)`` of the registered worker; RuntimeError when there is none."""
    found = _geometry
    if found is None:
        raise RuntimeError("no kvbm worker in this process: DynamoKVBMConnectorWorker.register_kv_caches must run "
                           "(TensorRT-LLM calls it when it allocates the KV cache) before the leader is used")
    return found


def post(report: WorkerReport) -> None:
    """Queue a worker's report for the leader."""
    with _lock:
        _reports.append(report)


def drain() -> list[WorkerReport]:
    """Every report posted since the last drain, oldest first."""
    with _lock:
        out = list(_reports)
        _reports.clear()
    return out
