"""A peer's G2 pool as a paged cache on `Medium.REMOTE`: what `Transfers.submit` moves blocks out of (G4).

`RemoteKVCache` holds no memory: it describes a pool another process registered with its NIXL agent and exported
(`kvbm.kernels.nixl_agent`): geometry, dtype, number of blocks, and the same dense block-major layout as the local
G2, so a remote block is one contiguous range. The reads themselves are `kvbm.kernels.paths.remote`'s.

A peer whose pool differs from what the reader expects (geometry, dtype, or the layout digest: any difference in
where a byte sits inside a block) is refused when the cache is built, before anything is read.

Checksums: the reader verifies each block it reads against the xxh3-64 the peer published for it (`publish`, fed
from the peer's directory entries). With ``verify=True`` (the default) a block with no published checksum is not
served; ``verify=False`` serves bytes as the transport delivered them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from kvbm.layouts import KVGeometry, KVLayout, block_major

from .medium import Medium
from .nixl_agent import NixlAgent, PeerInfo, PoolDescriptor, block_major_digest

__all__ = ["RemoteKVCache"]


class RemoteKVCache:
    """Pool ``pool`` of ``peer`` (known to ``agent``), expected to hold blocks of ``geometry`` / ``dtype`` in
    KVBM's block-major layout. ``timeout_s`` bounds one read of a batch of blocks; a read still in flight then
    fails its blocks as lost. Raises ValueError for a peer pool that does not match."""

    medium = Medium.REMOTE

    def __init__(self, agent: NixlAgent, peer: PeerInfo, pool: str, geometry: KVGeometry, dtype: torch.dtype, *,
                 verify: bool = True, timeout_s: float = 30.0) -> None:
        if pool not in peer.pools:
            raise ValueError(f"peer {peer.name!r} exports no pool {pool!r} (pools: {sorted(peer.pools)})")
        desc: PoolDescriptor = peer.pools[pool]
        if desc.geometry != geometry:
            raise ValueError(f"peer {peer.name!r} pool {pool!r} differs in geometry: "
                             f"{desc.geometry.describe_mismatch(geometry)}")
        if desc.dtype != str(dtype):
            raise ValueError(f"peer {peer.name!r} pool {pool!r} differs in dtype: {desc.dtype} vs {dtype}")
        want = block_major_digest(geometry, dtype)
        if desc.digest != want:
            raise ValueError(f"peer {peer.name!r} pool {pool!r} differs in layout: digest {desc.digest} vs {want} "
                             f"(a G4 pool must be block-major in KVBM's staging order)")
        if desc.block_bytes != geometry.block_bytes or desc.block_stride < desc.block_bytes or desc.num_blocks <= 0:
            raise ValueError(f"peer {peer.name!r} pool {pool!r} has a malformed descriptor: {desc}")
        if desc.mem_type not in ("DRAM", "VRAM"):
            raise ValueError(f"peer {peer.name!r} pool {pool!r} is in {desc.mem_type} memory")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.agent = agent
        self.peer = peer.name
        self.pool = pool
        self.descriptor = desc
        self.geometry = geometry
        self.dtype = dtype
        self.num_blocks = desc.num_blocks
        self.name = f"G4:{peer.name}/{pool}"
        self.verify = verify
        self.timeout_s = float(timeout_s)
        g = geometry
        meta = torch.empty(desc.num_blocks, g.num_layers, g.num_kv, g.block_size, g.num_heads, g.head_dim,
                           dtype=dtype, device="meta")
        self.layout: KVLayout = block_major(meta).layout
        self._sums = np.zeros(self.num_blocks, dtype=np.uint64)
        self._known = np.zeros(self.num_blocks, dtype=bool)

    def publish(self, checksums: Mapping[int, int]) -> None:
        """Record the peer's checksums of blocks (block id -> xxh3-64, as `NixlAgent.checksums` gives them)."""
        ids = np.fromiter((int(k) for k in checksums), dtype=np.int64, count=len(checksums))
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
            raise IndexError(f"checksum for a block outside [0, {self.num_blocks})")
        self._sums[ids] = np.fromiter((int(v) for v in checksums.values()), dtype=np.uint64, count=ids.size)
        self._known[ids] = True

    def withdraw(self, ids: Any) -> None:
        """Forget the checksums of blocks the peer no longer holds (they are not served until published again)."""
        self._known[np.asarray(ids, dtype=np.int64)] = False

    def checksum(self, block: int) -> int | None:
        """The published checksum of ``block``, or None."""
        return int(self._sums[block]) if self._known[block] else None

    @property
    def connected(self) -> bool:
        """Whether the local agent still knows the peer."""
        return self.agent.has_peer(self.peer)

    def block_ranges(self, ids: np.ndarray) -> np.ndarray:
        """Nx3 (address, length, device) rows of blocks ``ids`` in the peer's memory."""
        d = self.descriptor
        rows = np.empty((ids.size, 3), dtype=np.uint64)
        rows[:, 0] = d.base + ids.astype(np.uint64) * np.uint64(d.block_stride)
        rows[:, 1] = d.block_bytes
        rows[:, 2] = d.device_id
        return rows

    def __repr__(self) -> str:
        return f"RemoteKVCache({self.name!r}, blocks={self.num_blocks}, {self.geometry}, {self.dtype})"
