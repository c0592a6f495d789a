"""One rank's presence among kvbm instances (G4): its G2 pool exported over NIXL, and loads from other instances.

`G4Endpoint` owns a NIXL agent (`kvbm.kernels.nixl_agent.NixlAgent`, UCX). An exporting endpoint registers the
rank's G2 cache and a **seal table**: one row per G2 slot, ``[state, sequence hash, xxh3-64]``. The store writes
a row as ``UNSEALED`` before a slot is overwritten and seals it (or marks it ``FAILED``) once the store into the
slot is over; `endpoint` gives the bytes another instance needs to read from here (the agent's export and where
the seal table is). Seals, not checksums shipped with the request, because an engine names a finished request's
blocks before their last stores are done: the reader finds out through the table when they are.

A reading endpoint (`read`) loads blocks of another instance's G2 into a local cache: it first reads the seal
rows of the slots it needs (retrying while a store there is still in flight, up to the timeout), keeps the slots
sealed with the hash it expects, publishes their checksums to the peer's `RemoteKVCache`, and reads them through
`Transfers.submit` (`kvbm.kernels.paths.remote`: every block verified, lost on a mismatch or a dead peer). A slot
sealed with another hash was reused: failed, never served. When the read is over the reader notifies the holder
(NIXL notification ``kvbm-g4-done:<request id>``), which then unpins the slots (`take_released`).
"""
from __future__ import annotations

import logging
import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvbm.kernels.block_transfer import BlockTransfer, Steps
from kvbm.kernels.nixl_agent import NixlAgent, block_checksums
from kvbm.kernels.remote_cache import RemoteKVCache
from kvbm.kernels.transfers import Transfers
from kvbm.leader.plans import Move

__all__ = ["FAILED", "G4Endpoint", "SEALED", "UNSEALED", "parse_endpoint"]

log = logging.getLogger(__name__)

UNSEALED, SEALED, FAILED = 0, 1, 2
_POOL = "G2"
_MAGIC = b"KVBM-G4-1\n"
_DONE = b"kvbm-g4-done:"
_ROW = 3 * 8  # bytes of one seal row
_RETRY_S = 0.005  # between seal reads while a store at the holder is in flight


def parse_endpoint(blob: bytes) -> tuple[int, int, bytes]:
    """``(seal table address, slots, agent export)`` of an `G4Endpoint.endpoint` blob; ValueError if malformed."""
    if not isinstance(blob, (bytes, bytearray)) or not blob.startswith(_MAGIC):
        raise ValueError("not a kvbm G4 endpoint (bad magic)")
    try:
        base, slots = struct.unpack_from("<QQ", blob, len(_MAGIC))
    except struct.error as e:
        raise ValueError(f"malformed kvbm G4 endpoint: {e!r}") from None
    return base, slots, bytes(blob[len(_MAGIC) + 16:])


class G4Endpoint:
    """A rank's NIXL agent, its exported G2 with the seal table (``export=True``), and its reads from peers.

    ``timeout_s`` bounds one load from a peer: waiting for seals, then each NIXL read batch."""

    def __init__(self, transfers: Transfers, host_cache: Any, *, export: bool, timeout_s: float = 30.0,
                 name: str | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.transfers = transfers
        self.host_cache = host_cache
        self.timeout_s = float(timeout_s)
        self.agent = NixlAgent(name)
        self.seals: np.ndarray | None = None
        self._peers: dict[bytes, RemoteKVCache] = {}
        self._kept: list[np.ndarray] = []  # seal landings a read NIXL could not cancel may still write
        try:
            if export:
                self.agent.register_cache(host_cache, _POOL)
                self.seals = np.zeros((host_cache.num_blocks, 3), dtype=np.uint64)
                self.agent.register_buffer(self.seals.ctypes.data, self.seals.nbytes, "DRAM")
        except BaseException:
            self.agent.close()
            raise

    # -- the holder's side -------------------------------------------------------------------------------------

    def endpoint(self) -> bytes:
        """What a reader needs to reach this rank's G2 (see `parse_endpoint`); only for an exporting endpoint."""
        if self.seals is None:
            raise ValueError("this G4 endpoint does not export its G2")
        return _MAGIC + struct.pack("<QQ", self.seals.ctypes.data, self.seals.shape[0]) + self.agent.export()

    def unseal(self, slots: Sequence[int]) -> None:
        """Slots about to be overwritten: readers wait (or fail) until they are sealed again."""
        if self.seals is not None and len(slots):
            self.seals[np.asarray(slots, dtype=np.int64), 0] = UNSEALED

    def seal(self, slots: Sequence[int], hashes: Sequence[int], failed: Sequence[int] = ()) -> None:
        """Slots whose store is over: sealed with their hash and checksum, or marked failed (positions
        ``failed``)."""
        if self.seals is None or not len(slots):
            return
        bad = set(failed)
        good = [i for i in range(len(slots)) if i not in bad]
        sums = block_checksums(self.host_cache, [slots[i] for i in good]) if good else {}
        for i, slot in enumerate(slots):
            row = self.seals[int(slot)]
            row[1] = np.uint64(hashes[i])
            row[2] = np.uint64(sums.get(int(slot), 0))
            row[0] = FAILED if i in bad else SEALED

    def take_released(self) -> list[str]:
        """Holder request ids whose blocks a reader finished with since the last call (one entry per reader)."""
        out = []
        for messages in self.agent.notifications().values():
            for message in messages:
                if message.startswith(_DONE):
                    out.append(message[len(_DONE):].decode(errors="replace"))
        return out

    # -- the reader's side -------------------------------------------------------------------------------------

    def _remote(self, blob: bytes) -> tuple[RemoteKVCache, int]:
        base, slots, export = parse_endpoint(blob)
        remote = self._peers.get(export)
        if remote is None or not remote.connected:
            peer = self.agent.add_peer(export)
            g = self.host_cache
            remote = RemoteKVCache(self.agent, peer, _POOL, g.geometry, g.dtype, timeout_s=self.timeout_s)
            if remote.num_blocks != slots:
                raise ValueError(f"{remote.name}: seal table of {slots} rows for a pool of {remote.num_blocks} blocks")
            self._peers[export] = remote
        return remote, base

    def read(self, move: Move, dst: Any, rank: int) -> BlockTransfer:
        """Start a load from another instance (``move.remote``; this is reading rank ``rank``) into ``dst``."""
        source = move.remote
        if source is None:
            raise ValueError(f"move {move.move_id} has no remote source")
        if not 0 <= rank < len(source.endpoints):
            raise ValueError(f"move {move.move_id}: rank {rank} reads, but the holder exported "
                             f"{len(source.endpoints)} rank(s) (the two engines must have the same parallel layout)")
        remote, base = self._remote(source.endpoints[rank])
        return BlockTransfer(move.num_blocks, "g4-load", self._load_steps(move, dst, remote, base))

    def _load_steps(self, move: Move, dst: Any, remote: RemoteKVCache, seal_base: int) -> Steps:
        n = move.num_blocks
        slots = np.asarray(move.src_ids, dtype=np.int64)
        want = np.asarray(move.hashes, dtype=np.uint64)
        errors: dict[int, str] = {}
        lost: set[int] = set()
        sums: dict[int, int] = {}
        waiting = np.arange(n)
        deadline = time.monotonic() + self.timeout_s
        try:
            while waiting.size:
                rows = yield from self._read_seals(remote, seal_base, slots[waiting], deadline)
                if rows is None:
                    for i in waiting.tolist():
                        errors[i] = (f"seal of slot {slots[i]} of {remote.name} could not be read (peer gone or "
                                     f"timed out)")
                        lost.add(i)
                    break
                state, hashes = rows[:, 0], rows[:, 1]
                mine = hashes == want[waiting]
                for k, i in enumerate(waiting.tolist()):
                    if state[k] == SEALED and mine[k]:
                        sums[int(slots[i])] = int(rows[k, 2])
                    elif state[k] == FAILED and mine[k]:
                        errors[i] = f"the holder's store into slot {slots[i]} failed"
                    elif state[k] != UNSEALED and not mine[k]:
                        errors[i] = f"slot {slots[i]} of {remote.name} holds another block now"
                waiting = np.array([i for k, i in enumerate(waiting.tolist()) if state[k] == UNSEALED], dtype=np.int64)
                if waiting.size:
                    if time.monotonic() >= deadline:
                        for i in waiting.tolist():
                            errors[i] = f"slot {slots[i]} of {remote.name} was not sealed within {self.timeout_s} s"
                        break
                    pause = time.monotonic() + _RETRY_S
                    while time.monotonic() < pause:
                        yield None
            ok = np.array([i for i in range(n) if i not in errors], dtype=np.int64)
            if ok.size:
                remote.publish({int(slots[i]): sums[int(slots[i])] for i in ok.tolist()})
                inner = self.transfers.submit(remote, dst, slots[ok], np.asarray(move.dst_ids, dtype=np.int64)[ok])
                while not inner.done():
                    yield inner
                for j, reason in inner.reasons.items():
                    errors[int(ok[j])] = reason
                lost.update(int(ok[j]) for j in inner.lost)
        finally:
            self._notify_done(remote, move)
        return errors, lost & set(errors)

    def _read_seals(self, remote: RemoteKVCache, seal_base: int, slots: np.ndarray, deadline: float
                    ) -> Steps:
        """Read the seal rows of ``slots``; returns them (N x 3), or None when the read failed or timed out."""
        landing = np.zeros((slots.size, 3), dtype=np.uint64)
        address, nbytes = landing.ctypes.data, landing.nbytes
        self.agent.register_buffer(address, nbytes, "DRAM")
        local = np.empty((slots.size, 3), dtype=np.uint64)
        local[:, 0] = np.uint64(address) + np.arange(slots.size, dtype=np.uint64) * np.uint64(_ROW)
        local[:, 1], local[:, 2] = _ROW, 0
        rows = np.empty((slots.size, 3), dtype=np.uint64)
        rows[:, 0] = np.uint64(seal_base) + slots.astype(np.uint64) * np.uint64(_ROW)
        rows[:, 1], rows[:, 2] = _ROW, 0
        handle, state, released = None, "ERR", True
        try:
            handle = self.agent.read(local, rows, remote.peer)
            state = self.agent.state(handle)
            while state == "PROC" and time.monotonic() < deadline:
                yield None
                state = self.agent.state(handle)
        except Exception as e:  # noqa: BLE001 - NIXL refused the read: the peer is gone
            log.warning("%s: reading seals failed: %r", remote.name, e)
        finally:
            if handle is not None:
                released = self.agent.release(handle)
            if released:  # a read NIXL could not cancel may still write here: keep the memory registered
                self.agent.deregister_buffer(address, nbytes)
            else:
                self._kept.append(landing)
        return landing.copy() if state == "DONE" else None

    def _notify_done(self, remote: RemoteKVCache, move: Move) -> None:
        try:
            self.agent.notify(remote.peer, _DONE + move.remote.request_id.encode())
        except Exception as e:  # noqa: BLE001 - a holder that is gone unpins by its timeout
            log.info("%s: could not tell the holder that request %s was read: %r", remote.name,
                     move.remote.request_id, e)

    def close(self) -> None:
        """Forget peers and deregister everything (no load may still run)."""
        self._peers.clear()
        self.agent.close()
