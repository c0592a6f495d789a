"""The in-process channel from the rank-0 TensorRT-LLM worker to the leader: its block geometry and its reports.

TensorRT-LLM's connector interface carries nothing from workers back to the scheduler side but finished request
ids, yet the leader's index must learn every move's result. In the PyTorch backend the leader and the rank-0 worker
share a process: the worker posts its `WorkerReport`s here (in ``get_finished``), the leader drains them. The
worker also announces its block geometry (``llm_args`` does not describe the model's KV; the leader sizes its tiers
for the worker's block bytes). Only plain data crosses; multi-rank set-ups are refused at start-up.
"""
from __future__ import annotations

import threading

from kvbm.connectors.messages import WorkerReport

__all__ = ["attach", "geometry", "post", "drain"]

_lock = threading.Lock()
_state: dict = {"geometry": None, "reports": []}  # geometry: the worker's (tokens, bytes) per block


def attach(geometry: tuple[int, int] | None) -> None:
    """A worker registered its KV cache, of ``(tokens, bytes)`` per block (a second one in the process is refused);
    ``None``: it closed (its undrained reports are dropped)."""
    with _lock:
        if geometry is not None and _state["geometry"] is not None:
            raise RuntimeError("a kvbm TensorRT-LLM worker is already registered in this process (one rank per "
                               "process is supported); close it before registering another")
        _state.update(geometry=geometry, reports=[])


def geometry() -> tuple[int, int] | None:
    """``(tokens, bytes)`` per block of the registered worker; None while there is none."""
    return _state["geometry"]


def post(report: WorkerReport) -> None:
    """Queue a worker's report for the leader."""
    with _lock:
        _state["reports"].append(report)


def drain() -> list[WorkerReport]:
    """The reports posted since the last drain, oldest first."""
    with _lock:
        out, _state["reports"] = _state["reports"], []
    return out
