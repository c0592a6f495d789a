"""The memory of one rank's offload tiers: each tier a paged cache in the engine's geometry, on its medium.

A host tier is a dense block-major cache (KVBM's staging order) in pinned memory (plain mmap without a GPU), so
runs of its blocks move with one DMA; a disk tier is a `DiskKVCache`: block-major blocks at 4 KiB-aligned slots of
one preallocated file. A host tier may live in a pool shared with other ranks (``shared_fd``). Adding a medium
means one more branch in `allocate_tier` (and a path for it in `kvbm.kernels.paths`).
"""
from __future__ import annotations

from typing import Any

import torch

from kvbm.kernels.host_memory import PinnedHostBuffer
from kvbm.kernels.medium import Medium
from kvbm.layouts import KVGeometry, PagedKVCache, block_major
from kvbm.tiers import TierSpec

__all__ = ["allocate_tier", "close_tier"]


def _host_cache(geometry: KVGeometry, dtype: torch.dtype, num_blocks: int, shared_fd: int | None,
                first_touch: bool) -> PagedKVCache:
    buffer = PinnedHostBuffer(num_blocks * geometry.block_bytes, shared_fd=shared_fd, first_touch=first_touch)
    g = geometry
    cache = block_major(buffer.tensor(dtype).view(num_blocks, g.num_layers, g.num_kv, g.block_size, g.num_heads,
                                                  g.head_dim))
    cache.__dict__["_kvbm_buffer"] = buffer  # the cache owns its memory: closed with `close_tier`
    return cache


def allocate_tier(memory: TierSpec, geometry: KVGeometry, dtype: torch.dtype, *, shared_fd: int | None = None,
                  first_touch: bool = True) -> Any:
    """A cache of ``memory.num_blocks`` blocks of ``geometry`` on the tier's medium; a host tier in the memory of
    ``shared_fd`` when given (a pool other ranks map too: see `kvbm.worker.shared_pool`), zeroed first unless
    ``first_touch`` is False (a rank attaching to a pool its writer filled)."""
    if memory.medium is Medium.HOST:
        return _host_cache(geometry, dtype, memory.num_blocks, shared_fd, first_touch)
    if shared_fd is not None:
        raise ValueError(f"tier {memory.name}: only host tiers can be shared, not {memory.medium.value}")
    if memory.medium is Medium.DISK:
        from kvbm.kernels.disk_cache import DiskKVCache

        if memory.directory is None:
            raise ValueError(f"disk tier {memory.name} needs a directory")
        return DiskKVCache(memory.directory, geometry, dtype, memory.num_blocks, use_o_direct=memory.use_o_direct,
                           zerofill_fallback=memory.zerofill_fallback)
    raise ValueError(f"tier {memory.name}: no allocator for medium {memory.medium.value}")


def close_tier(cache: Any) -> None:
    """Release a tier's memory (idempotent); no transfer may still use it."""
    buffer = getattr(cache, "__dict__", {}).get("_kvbm_buffer")
    if buffer is not None:
        buffer.close()
    elif hasattr(cache, "close"):
        cache.close()
