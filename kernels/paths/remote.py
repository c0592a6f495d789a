"""Remote -> host and remote -> GPU: blocks of a peer's G2 pool (`RemoteKVCache`, G4) read by NIXL over UCX.

Each transfer reads the distinct remote blocks it needs in batches of one landing chunk (``bounce_blocks`` blocks;
``bounce_chunks`` batches in flight): one NIXL READ per batch, one descriptor per run of consecutive block ids
(a block-major block is one contiguous range on both sides). The chunks are pinned host memory of this path,
registered once with the reader's agent. The steps poll ``check_xfer_state`` without blocking (they yield None
while a read is in flight), then verify each block read against the checksum its peer published, and only then
copy the intact blocks on into the destination (`Transfers.submit` from the chunk: a host copy, or the GPU path
with its layout conversion). So a destination block is written only with bytes known good: a read that fails
(NIXL "ERR", a peer that disconnected or died, a read past the cache's ``timeout_s``) or a checksum mismatch
fails the block as lost and leaves the destination untouched.

Reads land on the host even for a GPU destination: the checksum is verified on the CPU. A read NIXL cannot cancel
(its handle refuses release) keeps its chunk out of the pool, so late bytes never reach a chunk lent again.

Writing into a peer's pool (host -> remote) is not a path here: which slots of a peer's pool a writer may fill
belongs to the directory that owns the pool.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from ..block_transfer import BlockTransfer, Steps
from ..bounce import BounceChunk, BouncePool
from ..disk_file import align_up
from ..medium import Medium, medium_of
from ..nixl_agent import NixlAgent, checksum_bytes
from ..remote_cache import RemoteKVCache
from ..transfers import Transfers, register_path
from .host_disk import run_batches, settle_copy

__all__ = ["RemotePath", "read_descriptors"]

log = logging.getLogger(__name__)


def read_descriptors(remote: RemoteKVCache, src: np.ndarray, landing_base: int, slots: np.ndarray,
                     slot_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(local, remote) Nx3 descriptor rows that read remote blocks ``src`` into landing slots ``slots`` (slot k at
    ``landing_base + k * slot_bytes``): one row per run where both the block ids and the slots are consecutive and
    both strides equal the block size, else one row per block."""
    d = remote.descriptor
    bb = d.block_bytes
    if src.size == 0:
        return np.zeros((0, 3), np.uint64), np.zeros((0, 3), np.uint64)
    mergeable = d.block_stride == bb and slot_bytes == bb
    breaks = np.ones(src.size, dtype=bool)
    if mergeable and src.size > 1:
        breaks[1:] = (np.diff(src) != 1) | (np.diff(slots) != 1)
    starts = np.flatnonzero(breaks)
    lengths = np.diff(np.append(starts, src.size)).astype(np.uint64) * np.uint64(bb)
    local = np.empty((starts.size, 3), dtype=np.uint64)
    local[:, 0] = np.uint64(landing_base) + slots[starts].astype(np.uint64) * np.uint64(slot_bytes)
    local[:, 1] = lengths
    local[:, 2] = 0
    rem = remote.block_ranges(src[starts])
    rem[:, 1] = lengths
    return local, rem


class _Landing:
    """The path's pinned landing chunks for one (agent, geometry, dtype), registered with the agent."""

    def __init__(self, agent: NixlAgent, pool: BouncePool) -> None:
        self.agent, self.pool = agent, pool
        self.base = pool.storage.data_ptr()
        self.nbytes = pool.storage.numel()
        agent.register_buffer(self.base, self.nbytes, "DRAM")
        self.quarantined = 0  # chunks kept out: a read into them could not be cancelled

    def close(self) -> None:
        try:
            self.agent.deregister_buffer(self.base, self.nbytes)
        except Exception:  # noqa: BLE001 - the agent may be closed already
            pass
        self.pool.close()


class _Batch:
    """One READ of up to a chunk of distinct remote blocks."""

    def __init__(self, uniq: np.ndarray, chunk: BounceChunk) -> None:
        self.uniq = uniq  # indices into the transfer's distinct source blocks
        self.chunk = chunk
        self.handle: Any = None
        self.deadline = 0.0
        self.stage: BlockTransfer | None = None
        self.positions = np.zeros(0, dtype=np.int64)  # transfer positions the stage writes


def _read_steps(transfers: Transfers, remote: RemoteKVCache, dst: Any, src_ids: np.ndarray, dst_ids: np.ndarray,
                landing: _Landing, me: list) -> Steps:
    """Steps of reading remote blocks ``src_ids`` into ``dst_ids`` of ``dst``; returns ``(failed, lost)``."""
    agent, pool = remote.agent, landing.pool
    bb, slot = remote.geometry.block_bytes, pool.slot_bytes
    errors: dict[int, str] = {}
    lost: set[int] = set()
    blocks, inverse = np.unique(src_ids, return_inverse=True)
    size = pool.chunk_blocks
    pending = deque(np.arange(i, min(i + size, blocks.size)) for i in range(0, blocks.size, size))
    in_flight: list[_Batch] = []

    def fail(uniq: np.ndarray, reason: str, is_lost: bool = True) -> None:
        for p in np.flatnonzero(np.isin(inverse, uniq)).tolist():
            errors.setdefault(p, reason)
            if is_lost:
                lost.add(p)

    def start(uniq: np.ndarray) -> bool:
        chunk = pool.acquire()
        if chunk is None:
            return False
        b = _Batch(uniq, chunk)
        slots = chunk.ids[: uniq.size]
        local, rem = read_descriptors(remote, blocks[uniq], landing.base, slots, slot)
        try:
            b.handle = agent.read(local, rem, remote.peer, remote_mem_type=remote.descriptor.mem_type)
        except Exception as e:  # noqa: BLE001 - NIXL refused the read (peer gone, disconnected): blocks lost
            reason = f"read from {remote.name} could not start: {e!r}"
            fail(uniq, reason)
            chunk.release()
            while len(pending) > 1:  # the peer is unreachable: the batches not started fail the same way
                fail(pending.pop(), reason)
            return True
        b.deadline = time.monotonic() + remote.timeout_s
        in_flight.append(b)
        return True

    def finish_read(b: _Batch, state: str) -> None:
        """The read is over (DONE, ERR or timed out): verify, release the handle, start the copy on."""
        if state != "DONE":
            why = "timed out" if state == "PROC" else "failed (NIXL ERR: peer gone or transport error)"
            fail(b.uniq, f"read from {remote.name} {why}")
        released = agent.release(b.handle)
        b.handle = None
        if not released and state != "DONE":
            landing.quarantined += 1
            log.warning("%s: a read could not be cancelled; its landing chunk is kept out of use", remote.name)
            b.chunk = None
        if state != "DONE":
            return
        good_slots: dict[int, int] = {}
        for k, u in enumerate(b.uniq.tolist()):
            block = int(blocks[u])
            want = remote.checksum(block)
            if want is None:
                if remote.verify:
                    fail(np.array([u]), f"block {block} of {remote.name} has no published checksum", False)
                    continue
            else:
                start_byte = int(b.chunk.ids[k]) * slot
                got = checksum_bytes(pool.array[start_byte:start_byte + bb], remote.descriptor.digest)
                if got != want:
                    fail(np.array([u]), f"checksum mismatch in block {block} of {remote.name}: the bytes read are "
                                        f"not the block published")
                    continue
            good_slots[u] = int(b.chunk.ids[k])
        positions = np.flatnonzero(np.isin(inverse, list(good_slots)))
        b.positions = positions
        if positions.size == 0:
            b.stage = BlockTransfer.completed(0, "none")
            return
        chunk_ids = np.array([good_slots[int(inverse[p])] for p in positions], dtype=np.int64)
        try:
            b.stage = transfers.submit(pool.cache, dst, chunk_ids, dst_ids[positions])
        except Exception as e:  # noqa: BLE001 - the copy on could not start: these blocks fail (not lost)
            for p in positions.tolist():
                errors.setdefault(p, f"copy from the landing chunk failed: {e!r}")
            b.stage = BlockTransfer.completed(0, "none")
            b.positions = positions[:0]

    def advance(b: _Batch) -> bool:
        if b.handle is not None:
            state = agent.state(b.handle)
            if state == "PROC" and time.monotonic() < b.deadline:
                return False
            finish_read(b, state)
            if b.stage is None:
                in_flight.remove(b)
                if b.chunk is not None:
                    b.chunk.release()
            return True
        return settle_copy(b, errors, in_flight)

    def starved() -> bool:
        """No landing chunk will ever come back: fail what has not started."""
        if landing.quarantined < pool.num_chunks:
            return False
        while pending:
            fail(pending.popleft(), f"read from {remote.name} not started: every landing chunk is held by a read "
                                    f"NIXL could not cancel")
        return True

    def drain(batches: list) -> None:
        """Abandoned mid-way: cancel reads, finish copies, give chunks back."""
        for b in batches:
            if b.handle is not None:
                done = agent.state(b.handle) == "DONE"
                if not agent.release(b.handle) and not done:
                    landing.quarantined += 1
                    b.chunk = None
            if b.stage is not None:
                b.stage.wait()
            if b.chunk is not None:
                b.chunk.release()

    # a copy on to wait for, or None while the reads are in flight (polled again)
    yield from run_batches(pending, start, advance, in_flight, pool, me, starved=starved, drain=drain,
                           wait_on=lambda batches: next((b.stage for b in batches if b.stage is not None), None))
    return errors, lost & set(errors)


class RemotePath:
    """Reads blocks of a `RemoteKVCache` into a host or GPU cache by NIXL."""

    name = "remote-read"

    def __init__(self, transfers: Transfers) -> None:
        self._transfers = transfers
        self._landings: dict[tuple[int, Any, Any], _Landing] = {}
        self._lock = threading.Lock()

    def _landing(self, remote: RemoteKVCache) -> _Landing:
        key = (id(remote.agent), remote.geometry, remote.dtype)
        with self._lock:
            landing = self._landings.get(key)
            if landing is None:
                t = self._transfers
                pool = BouncePool(remote.geometry, remote.dtype, align_up(remote.geometry.block_bytes),
                                  t.bounce_chunks, t.bounce_blocks)
                landing = self._landings[key] = _Landing(remote.agent, pool)
            return landing

    def submit(self, src: Any, dst: Any, src_ids: np.ndarray, dst_ids: np.ndarray) -> BlockTransfer:
        """Start reading; raises ValueError for caches this path cannot move (a remote destination, a source that
        is not a `RemoteKVCache`)."""
        if not isinstance(src, RemoteKVCache):
            raise ValueError(f"{self.name} reads from a RemoteKVCache, got {type(src).__name__}")
        if medium_of(dst) not in (Medium.HOST, Medium.GPU):
            raise ValueError(f"{self.name} reads into a host or GPU cache, got a {medium_of(dst).value} cache")
        landing = self._landing(src)
        me: list = []
        transfer = BlockTransfer(src_ids.size, self.name,
                                 _read_steps(self._transfers, src, dst, src_ids, dst_ids, landing, me))
        me.append(transfer)
        if not transfer.done():
            landing.pool.holders.add(transfer)
        return transfer

    def close(self) -> None:
        """Deregister and free the landing chunks (the transfers are over)."""
        with self._lock:
            for landing in self._landings.values():
                landing.close()
            self._landings.clear()


register_path(Medium.REMOTE, Medium.HOST, RemotePath)
register_path(Medium.REMOTE, Medium.GPU, RemotePath)
