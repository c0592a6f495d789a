"""Chunks of blocks at the disk slot stride, lent to disk transfers for their lifetime: pinned host bounce
buffers (POSIX disk I/O) and device staging buffers (cuFile).

A pool holds ``num_chunks`` chunks of ``chunk_blocks`` blocks in one cache of the disk's layout (block-major,
KVBM's staging order, one block every ``slot_bytes`` bytes), so a chunk's bytes go to or come from file slots as
they are, and `copy_blocks` converts between it and any other cache. A disk transfer takes a chunk with
`acquire` (None when every chunk is busy: the transfer's steps then yield None and ask again) and gives it back
with `release`. One pool per (geometry, dtype, slot stride, memory) is shared by every path of a `Transfers`
object through `bounce_pool`.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvbm.layouts import KVGeometry, PagedKVCache, describe

from .disk_file import align_up

__all__ = ["BounceChunk", "BouncePool", "bounce_pool", "slot_cache", "SLOT_LAYOUT"]

#: Layout name of a block-major cache in KVBM's staging order whose block stride is the disk slot stride.
SLOT_LAYOUT = "block_major_slots"


def slot_cache(storage: torch.Tensor, geometry: KVGeometry, dtype: torch.dtype, num_blocks: int,
               slot_bytes: int) -> PagedKVCache:
    """A block-major cache (inner order layer, kv, token, head, channel) over the 1-D uint8 tensor ``storage``:
    block i at byte ``i * slot_bytes``; the bytes past ``block_bytes`` of each slot belong to no block."""
    bb = geometry.block_bytes
    if slot_bytes < bb or slot_bytes % geometry.itemsize:
        raise ValueError(f"slot_bytes must be >= block_bytes {bb} and a multiple of the element size "
                         f"{geometry.itemsize}, got {slot_bytes}")
    if storage.dtype != torch.uint8 or storage.dim() != 1 or storage.numel() < num_blocks * slot_bytes:
        raise ValueError(f"storage must be a 1-D uint8 tensor of at least {num_blocks * slot_bytes} bytes")
    g = geometry
    inner = (g.num_layers, g.num_kv, g.block_size, g.num_heads, g.head_dim)
    rows = storage[: num_blocks * slot_bytes].view(num_blocks, slot_bytes)
    blocks = rows[:, :bb].view(dtype).unflatten(1, inner)
    return describe([blocks], "block layer kv token head channel", name=SLOT_LAYOUT)


@dataclass(frozen=True)
class BounceChunk:
    """One chunk lent to a transfer: its ``index`` in the pool and the ids of its blocks in ``pool.cache``."""

    pool: BouncePool
    index: int
    ids: np.ndarray

    @property
    def cache(self) -> PagedKVCache:
        """The pool's cache (the chunk's blocks are ``ids`` of it)."""
        return self.pool.cache

    def release(self) -> None:
        """Give the chunk back to its pool."""
        self.pool.release(self)


class BouncePool:
    """``num_chunks`` chunks of ``chunk_blocks`` blocks at a stride of ``slot_bytes``, in pinned host memory
    (``device`` None: a `PinnedHostBuffer`, plain mmap without a GPU) or in GPU memory (``device`` a CUDA device).

    ``array`` is the host pool's bytes as a flat uint8 array (None for a device pool); ``cache`` the blocks."""

    def __init__(self, geometry: KVGeometry, dtype: torch.dtype, slot_bytes: int, num_chunks: int,
                 chunk_blocks: int, device: Any = None) -> None:
        if slot_bytes % 4096 or slot_bytes < geometry.block_bytes:
            raise ValueError(f"slot_bytes must be a multiple of 4096 holding a block of {geometry.block_bytes} "
                             f"bytes, got {slot_bytes}")
        self.geometry, self.dtype, self.slot_bytes = geometry, dtype, slot_bytes
        self.num_chunks, self.chunk_blocks = num_chunks, chunk_blocks
        n = num_chunks * chunk_blocks
        self.buffer = None
        if device is None:
            from .host_memory import PinnedHostBuffer

            self.buffer = PinnedHostBuffer(n * slot_bytes)
            storage = self.buffer.tensor(torch.uint8)
            self.array: np.ndarray | None = storage.numpy()
        else:
            storage = torch.empty(n * slot_bytes, dtype=torch.uint8, device=device)
            self.array = None
        self.storage = storage
        self.cache = slot_cache(storage, geometry, dtype, n, slot_bytes)
        self._free = list(range(num_chunks - 1, -1, -1))
        self._lock = threading.Lock()
        #: Transfers that may hold chunks (a transfer short of chunks advances them: see `paths.host_disk`).
        self.holders: weakref.WeakSet = weakref.WeakSet()

    def acquire(self) -> BounceChunk | None:
        """A free chunk, or None when every chunk is lent."""
        with self._lock:
            if not self._free:
                return None
            index = self._free.pop()
        first = index * self.chunk_blocks
        return BounceChunk(self, index, np.arange(first, first + self.chunk_blocks, dtype=np.int64))

    def release(self, chunk: BounceChunk) -> None:
        """Give a chunk back; releasing one that is not lent is a bug and raises."""
        with self._lock:
            if chunk.pool is not self or not 0 <= chunk.index < self.num_chunks or chunk.index in self._free:
                raise ValueError(f"bounce chunk {chunk.index} is not lent out (free: {sorted(self._free)})")
            self._free.append(chunk.index)

    def num_free(self) -> int:
        """Chunks not lent."""
        with self._lock:
            return len(self._free)

    def close(self) -> None:
        """Free the memory (idempotent); no transfer may still use it."""
        if self.buffer is not None:
            self.buffer.close()
        self.storage = None


def bounce_pool(transfers: Any, geometry: KVGeometry, dtype: torch.dtype, slot_bytes: int | None = None,
                device: Any = None) -> BouncePool:
    """The pool of ``transfers`` for caches of this geometry, dtype and slot stride (``align_up(block_bytes)`` by
    default), in host memory or on ``device``; made on first use, sized by ``transfers.bounce_blocks`` x
    ``transfers.bounce_chunks``, closed with ``transfers``."""
    slot_bytes = align_up(geometry.block_bytes) if slot_bytes is None else slot_bytes
    where = "host" if device is None else str(device)
    name = f"bounce:{where}:{geometry}:{dtype}:{slot_bytes}"
    return transfers.shared(name, lambda: BouncePool(geometry, dtype, slot_bytes, transfers.bounce_chunks,
                                                     transfers.bounce_blocks, device))
