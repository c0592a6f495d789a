"""Process-wide registry of block managers, keyed by vLLM engine id.

vLLM builds the scheduler-side and the worker-side connector as two objects; with one worker (the only setup the
connector accepts) both live in the engine-core process. The worker side creates the manager once it knows the
KV tensors and registers it here; the scheduler side finds it by the engine id both sides read from
``kv_transfer_config.engine_id``. The lock serialises the two sides' calls (the manager is not thread-safe, and
with async scheduling vLLM may run the worker on another thread).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kvbm.manager import BlockManager

__all__ = ["ManagerEntry", "register", "lookup", "unregister"]


@dataclass
class ManagerEntry:
    """A registered manager and the lock every caller holds while using it."""

    manager: BlockManager
    lock: threading.Lock = field(default_factory=threading.Lock)


_ENTRIES: dict[str, ManagerEntry] = {}
_GUARD = threading.Lock()


def register(engine_id: str, manager: BlockManager) -> ManagerEntry:
    """Register ``manager`` for ``engine_id``; an engine registers one manager at a time."""
    if not isinstance(engine_id, str) or not engine_id:
        raise ValueError(f"engine_id must be a non-empty str, got {engine_id!r}")
    with _GUARD:
        if engine_id in _ENTRIES:
            raise ValueError(f"a block manager is already registered for engine {engine_id!r}")
        entry = ManagerEntry(manager)
        _ENTRIES[engine_id] = entry
        return entry


def lookup(engine_id: str) -> ManagerEntry | None:
    """The entry registered for ``engine_id``, or None (the worker side has not registered its KV caches yet)."""
    return _ENTRIES.get(engine_id)


def unregister(engine_id: str) -> ManagerEntry | None:
    """Remove and return the entry of ``engine_id`` (None if there was none)."""
    with _GUARD:
        return _ENTRIES.pop(engine_id, None)
