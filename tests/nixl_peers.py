"""Processes for the G4 tests: peers that own a G2 pool behind their own NIXL agent, and a reader that pulls blocks
from them through `Transfers.submit`. Each runs in its own OS process (multiprocessing spawn) and obeys commands
sent over a pipe by the test, which also carries the peers' exports (the metadata exchange) to the reader.

UCX is pinned to TCP (``UCX_TLS=tcp``) in every process: on one machine UCX would otherwise pick shared memory /
CMA, whose reads complete inside the post call, so a read could never be caught in flight (the kill test needs
that). Reads and metadata exchange work with UCX's defaults as well.
"""
from __future__ import annotations

import os
import signal
import time
import traceback
from typing import Any

UCX_ENV = {"UCX_TLS": "tcp", "UCX_LOG_LEVEL": "error", "NIXL_LOG_LEVEL": "ERROR"}
GEOMETRY = dict(num_layers=2, num_kv=2, block_size=16, num_heads=2, head_dim=64, itemsize=2)  # 16 KiB blocks
POISON = 0  # destination bytes before a read; a pool's bytes are never 0


def _setup() -> None:
    os.environ.update(UCX_ENV)


def pool_bytes(seed: int, num_blocks: int, block_bytes: int) -> Any:
    """What peer ``seed`` writes into its pool: random non-zero bytes, one row per block."""
    import numpy as np

    return np.random.default_rng(seed).integers(1, 256, (num_blocks, block_bytes), dtype=np.uint8)


def _geometry():
    from kvbm.layouts import KVGeometry

    return KVGeometry(**GEOMETRY)


def _host_pool(num_blocks: int):
    """A pinned (plain mmap without a GPU) block-major G2 cache, allocated as kvbm allocates its G2 tier."""
    import torch

    from kvbm.kernels.medium import Medium
    from kvbm.tiers import TierSpec
    from kvbm.worker.tier_memory import allocate_tier

    return allocate_tier(TierSpec("G2", Medium.HOST, num_blocks), _geometry(), torch.bfloat16)


def _rows(cache) -> Any:
    """A dense block-major cache's bytes as a [num_blocks, block_bytes] uint8 array (a view)."""
    import torch

    return cache.tensors[0].view(-1).view(torch.uint8).numpy().reshape(cache.num_blocks, -1)


def peer_main(conn, seed: int, num_blocks: int) -> None:
    """A peer: fill a G2 pool with `pool_bytes(seed, ...)`, register it, send ("ready", export, pid, checksums),
    then obey ("rewrite", block) (overwrite a block without republishing: its published checksum goes stale) and
    ("stop",)."""
    _setup()
    try:
        from kvbm.kernels.nixl_agent import NixlAgent

        cache = _host_pool(num_blocks)
        rows = _rows(cache)
        rows[:] = pool_bytes(seed, num_blocks, rows.shape[1])
        agent = NixlAgent(f"peer-{seed}")
        agent.register_cache(cache, "G2")
        conn.send(("ready", agent.export(), os.getpid(), agent.checksums("G2", range(num_blocks))))
        while True:
            cmd = conn.recv()
            if cmd[0] == "rewrite":
                rows[cmd[1]] = (rows[cmd[1]].astype(int) % 255 + 1).astype(rows.dtype)  # still non-zero
                conn.send(("ok",))
            elif cmd[0] == "stop":
                agent.close()
                conn.send(("ok",))
                return
    except Exception:  # noqa: BLE001 - reported to the test
        conn.send(("error", traceback.format_exc()))


def _logical_rows(cache, ids) -> Any:
    """Bytes of blocks ``ids`` of any layout in block-major staging order (layer, kv, token, head, channel)."""
    import numpy as np
    import torch

    g = cache.geometry
    out = []
    for b in ids:
        out.append(np.concatenate([cache.piece_view(layer, kv, torch.int16)[int(b)].contiguous().view(torch.uint8)
                                   .numpy().reshape(-1) for layer in range(g.num_layers) for kv in range(g.num_kv)]))
    return np.stack(out) if out else np.zeros((0, g.block_bytes), np.uint8)


def reader_main(conn, num_local: int) -> None:
    """The reader: one agent, a G2-like host cache of ``num_local`` blocks, and a `Transfers` object. Commands:

    ("add", export, seed, num_blocks, checksums) -> ("ok", peer name): add the peer and build its `RemoteKVCache`;
    ("read", peer, src_ids, dst_ids, preset, signal_to) -> ("ok", summary): poison the destination (G2, or a cache
    of ``preset`` when given), read, and compare every byte with what the peer wrote; with ``signal_to`` = (pid,
    signal, timeout_s) the reader sends the signal right after submitting, while the read is in flight (SIGSTOP:
    just before submitting, and SIGCONT once the read is over), with the remote's read timeout set to timeout_s;
    ("mismatch", peer) -> ("ok", error text): a RemoteKVCache of another geometry is refused;
    ("stop",)."""
    _setup()
    try:
        import numpy as np
        import torch

        import kvbm.kernels.paths.remote  # noqa: F401  (registers the remote paths)
        from kvbm.kernels.medium import Medium
        from kvbm.kernels.nixl_agent import NixlAgent
        from kvbm.kernels.remote_cache import RemoteKVCache
        from kvbm.kernels.transfers import Transfers
        from kvbm.layouts import KVGeometry, allocate

        agent = NixlAgent("reader")
        local = _host_pool(num_local)
        transfers = Transfers(bounce_blocks=16, bounce_chunks=4)
        remotes: dict[str, Any] = {}
        expected: dict[str, Any] = {}
        conn.send(("ready", os.getpid()))
        while True:
            cmd = conn.recv()
            if cmd[0] == "add":
                _, blob, seed, n, sums = cmd
                peer = agent.add_peer(blob)
                remote = RemoteKVCache(agent, peer, "G2", _geometry(), torch.bfloat16, timeout_s=20.0)
                remote.publish(sums)
                remotes[peer.name] = remote
                expected[peer.name] = pool_bytes(seed, n, remote.geometry.block_bytes)
                conn.send(("ok", peer.name))
            elif cmd[0] == "read":
                _, name, src_ids, dst_ids, preset, signal_to = cmd
                remote = remotes[name]
                remote.timeout_s = 20.0 if signal_to is None else signal_to[2]
                dst = local if preset is None else allocate(preset, remote.geometry, max(dst_ids) + 1,
                                                            dtype=torch.bfloat16, device="cpu")
                for t in dst.tensors:
                    t.view(torch.uint8).fill_(POISON)
                stop = signal_to is not None and signal_to[1] == signal.SIGSTOP
                if stop:
                    os.kill(signal_to[0], signal.SIGSTOP)
                t0 = time.perf_counter()
                transfer = transfers.submit(remote, dst, src_ids, dst_ids)
                in_flight = not transfer.done()
                if signal_to is not None and not stop:
                    os.kill(signal_to[0], signal_to[1])
                transfer.wait()
                secs = time.perf_counter() - t0
                if stop:
                    os.kill(signal_to[0], signal.SIGCONT)
                got = _logical_rows(dst, dst_ids)
                want = expected[name][np.asarray(src_ids)]
                failed = set(transfer.reasons)
                exact = [i for i in range(len(src_ids)) if np.array_equal(got[i], want[i])]
                poisoned = [i for i in range(len(src_ids)) if not got[i].any()]
                conn.send(("ok", {"n": len(src_ids), "failed": sorted(failed), "lost": sorted(transfer.lost),
                                  "exact": exact, "poisoned": poisoned, "in_flight": in_flight, "secs": secs,
                                  "reasons": sorted(set(transfer.reasons.values()))[:3], "path": transfer.path,
                                  "quarantined": sum(landing.quarantined for landing in getattr(
                                      transfers.path(Medium.REMOTE, Medium.HOST), "_landings", {}).values())}))
            elif cmd[0] == "mismatch":
                other = KVGeometry(**{**GEOMETRY, "num_layers": GEOMETRY["num_layers"] + 1})
                peer = agent.add_peer(cmd[1])
                try:
                    RemoteKVCache(agent, peer, "G2", other, torch.bfloat16)
                    conn.send(("ok", None))
                except ValueError as e:
                    conn.send(("ok", str(e)))
            elif cmd[0] == "stop":
                transfers.close()
                agent.close()
                conn.send(("ok",))
                return
    except Exception:  # noqa: BLE001 - reported to the test
        conn.send(("error", traceback.format_exc()))


class Processes:
    """Spawned peer and reader processes with a pipe each; every wait is bounded, and `close` kills leftovers."""

    def __init__(self) -> None:
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: dict[Any, Any] = {}

    def start(self, target, *args) -> Any:
        here, there = self.ctx.Pipe()
        proc = self.ctx.Process(target=target, args=(there, *args), daemon=True)
        proc.start()
        there.close()
        self.procs.append(proc)
        self.conns[proc] = here
        return proc

    def recv(self, proc, timeout: float = 60.0) -> tuple:
        conn = self.conns[proc]
        if not conn.poll(timeout):
            raise TimeoutError(f"process {proc.pid} did not answer within {timeout} s")
        msg = conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"process {proc.pid} failed:\n{msg[1]}")
        return msg

    def ask(self, proc, *cmd, timeout: float = 60.0) -> tuple:
        self.conns[proc].send(cmd)
        return self.recv(proc, timeout)

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                try:
                    self.conns[proc].send(("stop",))
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for conn in self.conns.values():
            conn.close()
