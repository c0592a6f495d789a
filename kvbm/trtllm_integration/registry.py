"""The process-wide link between the TensorRT-LLM leader and worker of one rank: the block manager and the
worker's view of its transfers in flight.

TensorRT-LLM builds the scheduler-side leader and the worker in the same process on rank 0, with no channel between
them except the per-step metadata. The worker owns the block manager (it needs the engine's cache tensor, which
only it receives); the leader needs the same manager for prefix lookups and needs to know whether a finished
request still has transfers in flight. Both meet here. Only a single rank is supported: ``require_single_rank``
refuses tensor/pipeline-parallel setups with a clear message.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from kvbm.manager import BlockManager

__all__ = ["Shared", "register", "unregister", "current", "require_single_rank", "tokens_per_block"]


@dataclass(frozen=True)
class Shared:
    """What the worker publishes: its block manager, and ``busy(request_id)``: True while a load or save of that
    request is in flight or planned but not yet started."""

    manager: BlockManager
    busy: Callable[[int], bool]


_lock = threading.Lock()
_shared: Shared | None = None


def register(shared: Shared) -> None:
    """Publish a worker's manager; a second live worker in the same process is refused."""
    global _shared
    with _lock:
        if _shared is not None:
            raise RuntimeError("a kvbm TensorRT-LLM worker is already registered in this process (only one rank "
                               "per process is supported); close it before registering another")
        _shared = shared


def unregister(manager: BlockManager) -> None:
    """Withdraw ``manager`` if it is the one registered (idempotent)."""
    global _shared
    with _lock:
        if _shared is not None and _shared.manager is manager:
            _shared = None


def current() -> Shared:
    """The registered worker's state; raises RuntimeError when no worker registered its KV cache yet."""
    shared = _shared
    if shared is None:
        raise RuntimeError("no kvbm block manager in this process: DynamoKVBMConnectorWorker.register_kv_caches "
                           "must run (TensorRT-LLM calls it when it allocates the KV cache) before the leader is used")
    return shared


def _attr(obj: Any, path: str) -> Any:
    """``obj.a.b`` for path "a.b", with a TypeError naming what is missing."""
    for name in path.split("."):
        if not hasattr(obj, name):
            raise TypeError(f"llm_args must provide {path} (TensorRT-LLM's TorchLlmArgs does); "
                            f"{type(obj).__name__} has no attribute {name!r}")
        obj = getattr(obj, name)
    return obj


def require_single_rank(llm_args: Any) -> None:
    """Refuse more than one rank: the leader and worker share one block manager inside one process."""
    mapping = _attr(llm_args, "parallel_config").to_mapping()
    world_size = _attr(mapping, "world_size")
    if world_size != 1:
        raise ValueError(f"kvbm's TensorRT-LLM connector supports a single rank (world_size 1, no tensor/pipeline "
                         f"parallelism), got world_size {world_size}; run without parallelism or without kvbm")


def tokens_per_block(llm_args: Any) -> int:
    """The engine's block size, ``llm_args.kv_cache_config.tokens_per_block``, checked to be a positive int."""
    value = _attr(llm_args, "kv_cache_config.tokens_per_block")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"kv_cache_config.tokens_per_block must be a positive int, got {value!r}")
    return value
