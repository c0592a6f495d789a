"""The memory of one rank's offload tiers: each tier a paged cache in the engine's geometry, on its medium.

A host tier is a dense block-major cache (KVBM's staging order) in pinned memory (plain mmap without a GPU), so
runs of its blocks move with one DMA; a disk tier is a `DiskKVCache`: block-major blocks at 4 KiB-aligned slots of
one preallocated file. A host tier may live in a pool shared with other ranks (``shared_fd``), a disk tier's slot
records in memory its readers map (``table``: `kvbm.worker.shared_disk`). Adding a medium
means one more branch in `allocate_tier` (and a path for it in `kvbm.kernels.paths`).

Engine caches of unlike block geometries (a hybrid model's KV cache groups) share tiers of raw slots
(`slot_geometry`, as wide as the largest block): tier-to-tier copies move whole slots, and each engine cache moves
its blocks through a view of the tier in its own geometry (`tier_view`), its block at the start of each slot.
"""
from __future__ import annotations

from typing import Any

import torch

from kvbm.kernels.bounce import slot_cache
from kvbm.kernels.host_memory import PinnedHostBuffer
from kvbm.kernels.medium import Medium, medium_of
from kvbm.kernels.slot_table import SlotTable
from kvbm.layouts import KVGeometry, PagedKVCache, block_major
from kvbm.tiers import TierSpec

__all__ = ["allocate_tier", "close_tier", "slot_geometry", "tier_view"]


def _host_cache(geometry: KVGeometry, dtype: torch.dtype, num_blocks: int, shared_fd: int | None,
                first_touch: bool) -> PagedKVCache:
    buffer = PinnedHostBuffer(num_blocks * geometry.block_bytes, shared_fd=shared_fd, first_touch=first_touch)
    g = geometry
    cache = block_major(buffer.tensor(dtype).view(num_blocks, g.num_layers, g.num_kv, g.block_size, g.num_heads,
                                                  g.head_dim))
    cache.__dict__["_kvbm_buffer"] = buffer  # the cache owns its memory: closed with `close_tier`
    return cache


def allocate_tier(memory: TierSpec, geometry: KVGeometry, dtype: torch.dtype, *, shared_fd: int | None = None,
                  first_touch: bool = True, table: SlotTable | None = None) -> Any:
    """A cache of ``memory.num_blocks`` blocks of ``geometry`` on the tier's medium; a host tier in the memory of
    ``shared_fd`` when given (a pool other ranks map too: see `kvbm.worker.shared_pool`), zeroed first unless
    ``first_touch`` is False (a rank attaching to a pool its writer filled); a disk tier with its slot records in
    ``table`` when given."""
    if table is not None and memory.medium is not Medium.DISK:
        raise ValueError(f"tier {memory.name}: only disk tiers take a slot table, not {memory.medium.value}")
    if memory.medium is Medium.HOST:
        return _host_cache(geometry, dtype, memory.num_blocks, shared_fd, first_touch)
    if shared_fd is not None:
        raise ValueError(f"tier {memory.name}: only host tiers take a shared pool, not {memory.medium.value}")
    if memory.medium is Medium.DISK:
        from kvbm.kernels.disk_cache import DiskKVCache

        if memory.directory is None:
            raise ValueError(f"disk tier {memory.name} needs a directory")
        return DiskKVCache(memory.directory, geometry, dtype, memory.num_blocks, use_o_direct=memory.use_o_direct,
                           zerofill_fallback=memory.zerofill_fallback, table=table)
    raise ValueError(f"tier {memory.name}: no allocator for medium {memory.medium.value}")


def slot_geometry(slot_bytes: int) -> KVGeometry:
    """A block of ``slot_bytes`` raw bytes (allocated as ``torch.uint8``): the geometry of tiers whose slots hold
    blocks of several geometries, each seen through `tier_view`."""
    return KVGeometry(num_layers=1, num_kv=1, block_size=1, num_heads=1, head_dim=slot_bytes, itemsize=1)


def tier_view(cache: Any, geometry: KVGeometry, dtype: torch.dtype) -> Any:
    """The slots of a tier allocated in `slot_geometry` (host or disk) as a cache of blocks of ``geometry`` /
    ``dtype``, each at the start of its slot: the same memory, never closed on its own."""
    slot = cache.geometry.block_bytes
    if geometry.block_bytes > slot:
        raise ValueError(f"blocks of {geometry.block_bytes} bytes do not fit the tier's {slot}-byte slots")
    if medium_of(cache) is Medium.DISK:
        return cache.view(geometry, dtype)
    if medium_of(cache) is not Medium.HOST or cache.dtype != torch.uint8 or len(cache.tensors) != 1:
        raise ValueError(f"tier {cache.name}: no view of a {medium_of(cache).value} cache in {cache.dtype}")
    storage = cache.tensors[0].reshape(-1)
    return slot_cache(storage, geometry, dtype, cache.num_blocks, slot)


def close_tier(cache: Any) -> None:
    """Release a tier's memory (idempotent); no transfer may still use it."""
    buffer = getattr(cache, "__dict__", {}).get("_kvbm_buffer")
    if buffer is not None:
        buffer.close()
    elif hasattr(cache, "close"):
        cache.close()
