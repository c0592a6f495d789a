"""One NIXL agent per process: the only way KV bytes leave a kvbm process (G4, a tier shared between instances).

`NixlAgent` owns a ``nixl_agent`` with the UCX backend. It registers caches with it: a host cache (pinned G2, or
plain mmap'd memory without a GPU) as "DRAM", a GPU cache as "VRAM" (where CUDA is present), and plain host
buffers (the remote path's landing chunks). `export` turns the agent's NIXL metadata plus a `PoolDescriptor` per
registered cache (base address, block stride, block count, geometry, dtype, layout digest) into plain bytes that
any out-of-band channel can carry (a pipe, a key-value store); `add_peer` loads a peer's bytes, after which the
peer's pools can be read by NIXL (`kvbm.kernels.remote_cache.RemoteKVCache`, `kvbm.kernels.paths.remote`).

Only pools whose blocks are whole dense runs at a fixed stride are exported (KVBM's block-major G2): a remote block
is then one contiguous range, read with one descriptor (or one per run of consecutive blocks).

Integrity: `block_checksums` gives the xxh3-64 of blocks of a registered pool, seeded with the pool's layout
digest; a peer publishes these with its directory entries and the reader verifies every block it reads against
them, which catches a slot rewritten since it was published as well as a damaged transfer.

The agent is created with NIXL's strict thread-sync mode, so transfers may be polled from any thread.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from kvbm.layouts import KVGeometry

from .medium import Medium, medium_of

__all__ = ["NixlAgent", "PeerInfo", "PoolDescriptor", "block_checksums", "block_major_digest", "layout_digest",
           "nixl_available", "process_agent"]

_MAGIC = b"KVBM-NIXL-1\n"
_GEOMETRY_FIELDS = ("num_layers", "num_kv", "block_size", "num_heads", "head_dim", "itemsize")


def nixl_available() -> bool:
    """Whether the NIXL Python package imports here."""
    try:
        import nixl._api  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no NIXL
        return False
    return True


def layout_digest(layout: Any) -> str:
    """Hex xxh3-64 of what fixes every byte's place inside a block: geometry, dtype, strides and pieces (not the
    block count, not the name). Two pools with equal digests hold blocks byte-compatible with each other."""
    g = layout.geometry
    key = ("kvbm-block", tuple(getattr(g, f) for f in _GEOMETRY_FIELDS), str(layout.dtype), tuple(layout.strides),
           tuple(layout.piece_tensor), tuple(layout.piece_offset))
    return xxhash.xxh3_64_hexdigest(repr(key).encode())


def block_major_digest(geometry: KVGeometry, dtype: torch.dtype) -> str:
    """The `layout_digest` of a dense block-major cache in KVBM's staging order (the layout of G2)."""
    from kvbm.layouts import block_major

    g = geometry
    meta = torch.empty(1, g.num_layers, g.num_kv, g.block_size, g.num_heads, g.head_dim, dtype=dtype, device="meta")
    return layout_digest(block_major(meta).layout)


def _dense_blocks(cache: Any) -> bool:
    from .paths.gpu_host import whole_blocks_contiguous

    return whole_blocks_contiguous(cache)


def _checksum_seed(digest: str) -> int:
    return xxhash.xxh3_64_intdigest(b"kvbm-g4:" + digest.encode())


def checksum_bytes(block: Any, digest: str) -> int:
    """xxh3-64 of one block's bytes (a buffer), seeded with the pool's layout digest."""
    return xxhash.xxh3_64_intdigest(memoryview(block), seed=_checksum_seed(digest))


def block_checksums(cache: Any, ids: Sequence[int]) -> dict[int, int]:
    """Block id -> xxh3-64 of that block's bytes, for a host cache whose blocks are dense (G2), seeded with its
    layout digest (what a reader of the pool verifies against)."""
    if medium_of(cache) is not Medium.HOST or not _dense_blocks(cache):
        raise ValueError("checksums are taken of a host cache whose blocks are dense (block-major G2)")
    digest, bb = layout_digest(cache.layout), cache.geometry.block_bytes
    rows = _host_bytes(cache.first_piece_address(), cache.num_blocks * bb).reshape(cache.num_blocks, bb)
    return {int(b): checksum_bytes(rows[int(b)], digest) for b in ids}


def _host_bytes(address: int, nbytes: int) -> np.ndarray:
    import ctypes

    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address))


@dataclass(frozen=True)
class PoolDescriptor:
    """A registered pool as a peer sees it: where its blocks are in the owner's address space and what they hold.
    Block i is the ``block_bytes`` bytes at ``base + i * block_stride`` of memory ``mem_type`` on ``device_id``."""

    agent: str
    pool: str
    mem_type: str
    device_id: int
    base: int
    block_stride: int
    block_bytes: int
    num_blocks: int
    geometry: KVGeometry
    dtype: str
    digest: str

    def to_json(self) -> dict:
        """The descriptor as a JSON-ready dict (what a reader of the pool is sent)."""
        out = {k: getattr(self, k) for k in ("agent", "pool", "mem_type", "device_id", "base", "block_stride",
                                             "block_bytes", "num_blocks", "dtype", "digest")}
        out["geometry"] = {f: getattr(self.geometry, f) for f in _GEOMETRY_FIELDS}
        return out

    @classmethod
    def from_json(cls, d: dict) -> PoolDescriptor:
        """The descriptor `to_json` wrote; ValueError naming what is missing or malformed."""
        try:
            fields = {k: d[k] for k in ("agent", "pool", "mem_type", "dtype", "digest")}
            ints = {k: int(d[k]) for k in ("device_id", "base", "block_stride", "block_bytes", "num_blocks")}
            geometry = KVGeometry(**{f: int(d["geometry"][f]) for f in _GEOMETRY_FIELDS})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed pool descriptor: {e!r}") from None
        return cls(geometry=geometry, **fields, **ints)


@dataclass(frozen=True)
class PeerInfo:
    """A peer known to the local agent: its agent name and its exported pools by name."""

    name: str
    pools: dict[str, PoolDescriptor]


def _nixl():
    from nixl import _api

    return _api


class NixlAgent:
    """Owns one ``nixl_agent`` (UCX backend) and what is registered with it. ``name`` must be unique among the
    agents that talk to each other (default: host name, pid and a random suffix)."""

    def __init__(self, name: str | None = None, *, backends: Sequence[str] = ("UCX",)) -> None:
        api = _nixl()
        self.name = name or f"kvbm-{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        config = api.nixl_agent_config(backends=list(backends),
                                       sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        self.agent = api.nixl_agent(self.name, config)
        missing = [b for b in backends if b not in self.agent.backends]
        if missing:
            raise RuntimeError(f"NIXL backend(s) {missing} could not be created (plugins: {self.agent.plugin_list})")
        self._lock = threading.Lock()
        self._pools: dict[str, PoolDescriptor] = {}
        self._caches: dict[str, Any] = {}
        self._regs: dict[tuple[int, int], Any] = {}  # (address, nbytes) -> registration descriptors
        self._peers: dict[str, PeerInfo] = {}
        self._closed = False

    # ------------------------------------------------------------------ registration

    def register_buffer(self, address: int, nbytes: int, mem_type: str = "DRAM", device_id: int = 0) -> None:
        """Register ``nbytes`` at ``address`` ("DRAM" host or "VRAM" device memory) for transfers (idempotent)."""
        if mem_type not in ("DRAM", "VRAM"):
            raise ValueError(f"mem_type must be 'DRAM' or 'VRAM', got {mem_type!r}")
        key = (int(address), int(nbytes))
        with self._lock:
            self._check_open()
            if key not in self._regs:
                self._regs[key] = self.agent.register_memory([(key[0], key[1], int(device_id), "")], mem_type)

    def deregister_buffer(self, address: int, nbytes: int) -> None:
        """Undo `register_buffer` (no transfer may still use the memory)."""
        with self._lock:
            reg = self._regs.pop((int(address), int(nbytes)), None)
            if reg is not None and not self._closed:
                self.agent.deregister_memory(reg)

    def register_cache(self, cache: Any, pool: str) -> PoolDescriptor:
        """Register a cache whose blocks are dense runs at a fixed stride (G2: pinned host, "DRAM"; or a block-major
        GPU cache, "VRAM") under the name ``pool``, and return what peers will see of it."""
        medium = medium_of(cache)
        if medium not in (Medium.HOST, Medium.GPU):
            raise ValueError(f"only host and GPU caches can be registered, got a {medium.value} cache")
        if not _dense_blocks(cache):
            raise ValueError(f"pool {pool!r}: a registered cache's blocks must be dense runs of block_bytes at a "
                             f"stride of block_bytes (block-major), got layout {cache.layout.name!r}")
        g = cache.geometry
        base, nbytes = cache.first_piece_address(), cache.num_blocks * g.block_bytes
        mem_type = "DRAM" if medium is Medium.HOST else "VRAM"
        device_id = 0 if medium is Medium.HOST else int(cache.device.index or 0)
        desc = PoolDescriptor(self.name, pool, mem_type, device_id, base, g.block_bytes, g.block_bytes,
                              cache.num_blocks, g, str(cache.dtype), layout_digest(cache.layout))
        with self._lock:
            if pool in self._pools:
                raise ValueError(f"a pool named {pool!r} is already registered")
        self.register_buffer(base, nbytes, mem_type, device_id)
        with self._lock:
            self._pools[pool] = desc
            self._caches[pool] = cache
        return desc

    def pools(self) -> dict[str, PoolDescriptor]:
        """The pools registered here, by name."""
        with self._lock:
            return dict(self._pools)

    def checksums(self, pool: str, ids: Sequence[int]) -> dict[int, int]:
        """Checksums of blocks ``ids`` of the local pool ``pool`` as they are now (to publish with them)."""
        with self._lock:
            cache = self._caches[pool]
        return block_checksums(cache, ids)

    # ------------------------------------------------------------------ metadata exchange

    def export(self) -> bytes:
        """This agent's NIXL metadata and its pools' descriptors, as plain bytes for a peer's `add_peer`."""
        with self._lock:
            self._check_open()
            header = json.dumps({"agent": self.name, "pools": [p.to_json() for p in self._pools.values()]}).encode()
            metadata = self.agent.get_agent_metadata()
        return _MAGIC + struct.pack("<I", len(header)) + header + metadata

    def add_peer(self, blob: bytes) -> PeerInfo:
        """Load a peer's `export` bytes: after this the peer's pools can be read. Re-adding a peer replaces it."""
        if not isinstance(blob, (bytes, bytearray)) or not blob.startswith(_MAGIC):
            raise ValueError("not a kvbm NIXL export (bad magic)")
        n = len(_MAGIC)
        try:
            (size,) = struct.unpack_from("<I", blob, n)
            header = json.loads(bytes(blob[n + 4:n + 4 + size]))
            metadata = bytes(blob[n + 4 + size:])
            pools = {p["pool"]: PoolDescriptor.from_json(p) for p in header["pools"]}
            name = str(header["agent"])
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"malformed kvbm NIXL export: {e!r}") from None
        if name == self.name:
            raise ValueError(f"peer {name!r} has this agent's own name")
        with self._lock:
            self._check_open()
            if name in self._peers:
                self._forget(name)
            loaded = self.agent.add_remote_agent(metadata)
            loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
            if loaded != name:
                self.agent.remove_remote_agent(loaded)
                raise ValueError(f"export names agent {name!r} but its NIXL metadata is agent {loaded!r}")
            peer = self._peers[name] = PeerInfo(name, pools)
        return peer

    def remove_peer(self, name: str) -> None:
        """Forget a peer (it left or is being replaced); reads from it fail from now on."""
        with self._lock:
            self._forget(name)

    def has_peer(self, name: str) -> bool:
        """Whether ``name`` is a peer known here (not removed)."""
        with self._lock:
            return name in self._peers and not self._closed

    def _forget(self, name: str) -> None:
        if self._peers.pop(name, None) is not None and not self._closed:
            try:
                self.agent.remove_remote_agent(name)
            except Exception:  # noqa: BLE001 - a peer that is already gone cannot be disconnected cleanly
                pass

    # ------------------------------------------------------------------ transfers (used by the remote path)

    def read(self, local: np.ndarray, remote: np.ndarray, peer: str, mem_type: str = "DRAM",
             remote_mem_type: str = "DRAM") -> Any:
        """Start a NIXL READ of ``remote`` (Nx3 address, length, device rows in the peer) into ``local`` (Nx3);
        returns the handle (raises when NIXL refuses, e.g. a disconnected peer)."""
        with self._lock:
            self._check_open()
            if peer not in self._peers:
                raise ConnectionError(f"peer {peer!r} is not known to agent {self.name!r} (removed or never added)")
            lo = self.agent.get_xfer_descs(np.ascontiguousarray(local, dtype=np.uint64), mem_type)
            ro = self.agent.get_xfer_descs(np.ascontiguousarray(remote, dtype=np.uint64), remote_mem_type)
            handle = self.agent.initialize_xfer("READ", lo, ro, peer)
        try:
            state = self.agent.transfer(handle)
        except Exception:
            self.release(handle)
            raise
        if state == "ERR":
            self.release(handle)
            raise ConnectionError(f"NIXL refused to post a read from {peer!r}")
        return handle

    def notify(self, peer: str, message: bytes) -> None:
        """Send ``message`` to ``peer`` over NIXL's notification channel (raises when the peer is unknown or gone)."""
        with self._lock:
            self._check_open()
            if peer not in self._peers:
                raise ConnectionError(f"peer {peer!r} is not known to agent {self.name!r} (removed or never added)")
            self.agent.send_notif(peer, bytes(message))

    def notifications(self) -> dict[str, list[bytes]]:
        """Notifications received since the last call, by sending agent (any agent that connected here)."""
        with self._lock:
            if self._closed:
                return {}
            return self.agent.get_new_notifs()

    def state(self, handle: Any) -> str:
        """"DONE", "PROC" or "ERR" for a transfer handle; never blocks (a NIXL error, such as a peer that
        disconnected, is "ERR")."""
        try:
            return self.agent.check_xfer_state(handle)
        except Exception:  # noqa: BLE001 - NIXL raises for a remote disconnect: the transfer failed
            return "ERR"

    def release(self, handle: Any) -> bool:
        """Release a transfer handle (cancelling it when still in flight); False when NIXL could not (the memory
        it targets may still be written)."""
        try:
            self.agent.release_xfer_handle(handle)
            return True
        except Exception:  # noqa: BLE001 - NIXL keeps the handle and retries when the agent goes
            return False

    # ------------------------------------------------------------------ lifetime

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"NIXL agent {self.name!r} is closed")

    def close(self) -> None:
        """Forget peers and deregister everything (idempotent); no transfer may still be in flight."""
        with self._lock:
            if self._closed:
                return
            for name in list(self._peers):
                self._forget(name)
            for reg in self._regs.values():
                try:
                    self.agent.deregister_memory(reg)
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    pass
            self._regs.clear()
            self._pools.clear()
            self._caches.clear()
            self._closed = True

    def __enter__(self) -> NixlAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PROCESS_AGENT: NixlAgent | None = None
_PROCESS_LOCK = threading.Lock()


def process_agent(name: str | None = None) -> NixlAgent:
    """This process's agent, created on first call (``name`` is used only then)."""
    global _PROCESS_AGENT
    with _PROCESS_LOCK:
        if _PROCESS_AGENT is None or _PROCESS_AGENT._closed:
            _PROCESS_AGENT = NixlAgent(name)
        return _PROCESS_AGENT

