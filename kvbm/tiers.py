"""The offload tiers' storage: G2 (pinned host), G3 (disk file) and the pinned bounce buffer of disk I/O.

Each tier pairs a ``BlockPool`` (which sequence hash sits in which slot) with the bytes of those slots; the block
manager (``kvbm.manager``) holds the policy. Every tier satisfies the ``Tier`` protocol (``name``, ``pool``,
``close``), which is all the manager needs to look blocks up, allocate and evict them; a remote tier (G4, over
NIXL) would be one more ``Tier`` with its own move functions.

Byte layout: G2 is a dense block-major cache (``kvbm.layouts.block_major``, KVBM's staging order) over a
``PinnedHostBuffer``, so the transfer engine can move runs of its blocks with one DMA. G3 slots are exactly one
block-major block each, at a stride of ``block_bytes`` rounded up to 4 KiB (O_DIRECT alignment). When
``block_bytes`` is already a multiple of 4096 (``BounceBuffer.padded`` is False) G2 and G3 share the stride and
G2 blocks are written to disk straight from the G2 buffer; otherwise disk I/O goes through the bounce buffer,
whose blocks use the padded stride (the padding bytes are never copied into any cache).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from kvbm.kernels.disk_file import DiskBlockFile, align_up
from kvbm.kernels.host_memory import PinnedHostBuffer
from kvbm.layouts import KVGeometry, PagedKVCache, block_major, describe
from kvbm.pool import BlockPool

__all__ = ["Tier", "HostTier", "DiskTier", "BounceBuffer", "host_cache", "PADDED_LAYOUT"]

#: Layout name of a block-major cache whose block stride carries padding (not dense: the transfer engine's
#: run-DMA paths refuse it, so it is only ever moved by the copy kernels).
PADDED_LAYOUT = "block_major_padded_staging"


class Tier(Protocol):
    """What the manager needs of every offload tier: a name ("G2", "G3"; "G4" later), its slot pool, and close."""

    name: str
    pool: BlockPool

    def close(self) -> None:
        """Release the tier's storage (idempotent)."""


def host_cache(buffer: PinnedHostBuffer, geometry: KVGeometry, dtype: torch.dtype, num_blocks: int,
               stride_bytes: int) -> PagedKVCache:
    """A block-major cache of ``num_blocks`` blocks over ``buffer``, one block every ``stride_bytes`` bytes.

    ``stride_bytes == geometry.block_bytes`` gives a dense ``block_major`` cache; a larger stride (a multiple of the
    element size) gives a padded one named ``PADDED_LAYOUT``.
    """
    bb = geometry.block_bytes
    if stride_bytes < bb or stride_bytes % geometry.itemsize:
        raise ValueError(f"stride_bytes must be >= block_bytes {bb} and a multiple of the element size "
                         f"{geometry.itemsize}, got {stride_bytes}")
    if num_blocks * stride_bytes > buffer.nbytes:
        raise ValueError(f"buffer of {buffer.nbytes} bytes cannot hold {num_blocks} blocks at a stride of "
                         f"{stride_bytes} bytes")
    g = geometry
    inner = (g.num_layers, g.num_kv, g.block_size, g.num_heads, g.head_dim)
    rows = buffer.tensor(torch.uint8)[: num_blocks * stride_bytes].view(num_blocks, stride_bytes)
    if stride_bytes == bb:
        return block_major(rows.view(dtype).view(num_blocks, *inner))
    blocks = rows[:, :bb].view(dtype).unflatten(1, inner)
    return describe([blocks], "block layer kv token head channel", name=PADDED_LAYOUT)


class HostTier:
    """G2: ``num_blocks`` blocks of pinned host memory (plain mmap without a GPU), dense block-major."""

    def __init__(self, geometry: KVGeometry, dtype: torch.dtype, num_blocks: int) -> None:
        """Allocate (and, with a GPU, pin) ``num_blocks * geometry.block_bytes`` bytes."""
        self.name = "G2"
        self.pool = BlockPool(num_blocks, self.name)
        self.buffer = PinnedHostBuffer(num_blocks * geometry.block_bytes)
        self.cache = host_cache(self.buffer, geometry, dtype, num_blocks, geometry.block_bytes)
        #: The buffer as a flat byte array, for disk I/O straight from G2 slots (unpadded geometries).
        self.array: np.ndarray = self.buffer.tensor(torch.uint8).numpy()

    def close(self) -> None:
        """Unpin and unmap the host memory (idempotent); no transfer may still use it."""
        self.buffer.close()


class DiskTier:
    """G3: one preallocated ``DiskBlockFile`` in ``directory``; slot i holds one block at a 4 KiB-aligned stride."""

    def __init__(self, directory: str, num_blocks: int, block_bytes: int, *, use_o_direct: bool,
                 zerofill_fallback: bool) -> None:
        """Create the file (O_DIRECT unless disabled); raises OSError (e.g. ENOSPC) when it cannot be made."""
        self.name = "G3"
        self.pool = BlockPool(num_blocks, self.name)
        self.file = DiskBlockFile(directory, num_blocks, block_bytes, use_o_direct=use_o_direct,
                                  zerofill_fallback=zerofill_fallback)

    @property
    def slot_bytes(self) -> int:
        """Bytes per slot: the block size rounded up to 4 KiB."""
        return self.file.slot_bytes

    def close(self) -> None:
        """Close and delete the file (idempotent)."""
        self.file.close(remove=True)


class BounceBuffer:
    """Pinned host blocks at the disk slot stride, in ``num_chunks`` chunks of ``chunk_blocks`` blocks.

    A disk transfer batch takes one chunk for its lifetime (read slots into it, then copy to G1; or copy from G1
    into it, then write slots), so at most ``num_chunks`` disk batches are in flight.
    """

    def __init__(self, geometry: KVGeometry, dtype: torch.dtype, num_chunks: int, chunk_blocks: int) -> None:
        """Allocate ``num_chunks * chunk_blocks`` blocks of ``align_up(geometry.block_bytes)`` bytes each."""
        self.slot_bytes = align_up(geometry.block_bytes)
        self.padded = self.slot_bytes != geometry.block_bytes
        self.chunk_blocks = chunk_blocks
        self.num_chunks = num_chunks
        n = num_chunks * chunk_blocks
        self.buffer = PinnedHostBuffer(n * self.slot_bytes)
        self.cache = host_cache(self.buffer, geometry, dtype, n, self.slot_bytes)
        self.array: np.ndarray = self.buffer.tensor(torch.uint8).numpy()
        self._free = list(range(num_chunks - 1, -1, -1))

    def acquire(self) -> int | None:
        """A free chunk's index, or None when every chunk is in use."""
        return self._free.pop() if self._free else None

    def release(self, chunk: int) -> None:
        """Give a chunk back; releasing a chunk that is not in use is a bug and raises."""
        if not 0 <= chunk < self.num_chunks or chunk in self._free:
            raise ValueError(f"bounce chunk {chunk} is not in use (free: {sorted(self._free)})")
        self._free.append(chunk)

    def num_free(self) -> int:
        """Chunks not in use."""
        return len(self._free)

    def block_ids(self, chunk: int, n: int) -> list[int]:
        """Ids (in ``self.cache``) of the first ``n`` blocks of ``chunk``."""
        if not 0 <= n <= self.chunk_blocks:
            raise ValueError(f"a chunk holds {self.chunk_blocks} blocks, asked for {n}")
        first = chunk * self.chunk_blocks
        return list(range(first, first + n))

    def close(self) -> None:
        """Unpin and unmap (idempotent); no transfer may still use it."""
        self.buffer.close()
