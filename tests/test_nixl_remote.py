"""G4 over NIXL: real OS processes, each with its own agent and G2 pool, on UCX over loopback TCP.

The peers and the reader are spawned by the test (`nixl_peers`); their exports travel through the test's pipes.
The reader pulls blocks through `Transfers.submit(remote, local, ...)` and compares every byte with what the peer
wrote; destinations are poisoned first, so a block that failed must still hold only poison.
"""
from __future__ import annotations

import signal

import numpy as np
import pytest
import kvbm.kernels.paths.remote as remote_path  # noqa: F401  (registers the remote paths)
from kvbm.kernels.block_transfer import BlockStatus
from kvbm.kernels.medium import Medium
from kvbm.kernels.transfers import registered_paths
from kvbm.layouts import allocate

from nixl_peers import Processes, peer_main, reader_main


def _start(procs: Processes, seeds_blocks: list[tuple[int, int]], num_local: int):
    reader = procs.start(reader_main, num_local)
    peers = [procs.start(peer_main, seed, n) for seed, n in seeds_blocks]
    procs.recv(reader)
    names, pids, blobs = [], [], []
    for (seed, n), peer in zip(seeds_blocks, peers):
        _, blob, pid, sums = procs.recv(peer)
        names.append(procs.ask(reader, "add", blob, seed, n, sums)[1])
        pids.append(pid)
        blobs.append(blob)
    return reader, peers, names, pids, blobs


def _read(procs, reader, name, src, dst, preset=None, signal_to=None) -> dict:
    return procs.ask(reader, "read", name, [int(i) for i in src], [int(i) for i in dst], preset, signal_to)[1]


def test_remote_paths_are_registered():
    pairs = registered_paths()
    assert (Medium.REMOTE, Medium.HOST) in pairs and (Medium.REMOTE, Medium.GPU) in pairs


def test_two_processes_read_byte_exact_and_refuse_stale_or_foreign_blocks():
    rng = np.random.default_rng(1)
    procs = Processes()
    try:
        reader, (peer,), (name,), (pid,), (blob,) = _start(procs, [(11, 64)], num_local=48)
        src, dst = rng.permutation(64)[:40], rng.permutation(48)[:40]
        out = _read(procs, reader, name, src, dst)
        assert out["path"] == "remote-read" and out["failed"] == [] and out["exact"] == list(range(40)), out
        # one remote block into several destinations, in another layout (converted on the way), read once
        out = _read(procs, reader, name, [5, 9, 5, 63], [0, 1, 2, 3], preset="vllm_flash_attn_hnd")
        assert out["failed"] == [] and out["exact"] == [0, 1, 2, 3], out
        # the peer rewrites block 7 after publishing its checksum: the reader must not serve it
        procs.ask(peer, "rewrite", 7)
        out = _read(procs, reader, name, [6, 7, 8], [10, 11, 12])
        assert out["failed"] == [1] and out["lost"] == [1] and out["exact"] == [0, 2] and out["poisoned"] == [1]
        assert "checksum mismatch" in out["reasons"][0]
        # a peer that stops answering (SIGSTOP) while a read is posted: whatever UCX still completes is served
        # byte-exact, the rest times out as lost and stays poisoned; once the peer runs again it serves again
        out = _read(procs, reader, name, src, dst, signal_to=(pid, signal.SIGSTOP, 1.0))
        assert set(out["lost"]) == set(out["failed"]) and set(out["exact"]).isdisjoint(out["failed"]), out
        assert sorted(out["exact"] + out["poisoned"]) == list(range(40)), out
        assert all("timed out" in r or "checksum mismatch in block 7" in r for r in out["reasons"]), out
        assert out["quarantined"] == 0  # timed-out reads were cancelled: their chunks are lent again
        out = _read(procs, reader, name, src, dst)
        stale = [int(i) for i in np.flatnonzero(src == 7)]  # block 7 stays unservable
        assert out["failed"] == stale and out["exact"] == [i for i in range(40) if i not in stale], out
        # a pool of another geometry is refused before anything is read
        refusal = procs.ask(reader, "mismatch", blob)[1]
        assert refusal is not None and "differs in geometry" in refusal and "num_layers" in refusal
    finally:
        procs.close()


def test_four_processes_and_a_peer_killed_mid_read():
    rng = np.random.default_rng(2)
    procs = Processes()
    try:
        reader, peers, names, pids, _ = _start(procs, [(21, 96), (22, 96), (23, 2048)], num_local=2048)
        for name in names[:2]:
            src, dst = rng.choice(96, 64, replace=False), rng.choice(2048, 64, replace=False)
            out = _read(procs, reader, name, src, dst)
            assert out["failed"] == [] and out["exact"] == list(range(64)), out
        # a large read from peer 3 (32 MiB), which is SIGKILLed right after the read is posted
        src, dst = rng.permutation(2048), rng.permutation(2048)
        out = _read(procs, reader, names[2], src, dst, signal_to=(pids[2], signal.SIGKILL, 20.0))
        assert out["in_flight"], "the read finished before the kill: nothing was tested"
        assert out["failed"], out
        assert out["lost"] == out["failed"]
        assert sorted(out["exact"] + out["poisoned"]) == list(range(2048)), "a block holds bytes it was never sent"
        assert set(out["exact"]).isdisjoint(out["failed"])
        # the reader survives: the live peers still serve, the dead one fails fast and loses its blocks
        out = _read(procs, reader, names[0], [1, 2, 3], [4, 5, 6])
        assert out["failed"] == [] and out["exact"] == [0, 1, 2], out
        out = _read(procs, reader, names[2], [1, 2], [7, 8])
        assert out["failed"] == [0, 1] and out["lost"] == [0, 1] and out["poisoned"] == [0, 1], out
        assert out["secs"] < 10
    finally:
        procs.close()


def test_bench_smoke(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "bench" / "remote_bench.py"), "--smoke", "--out", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["case"] for r in rows} == {"local G2->G1", "G4->G1", "G4->G1 unverified", "G4->G2"}
    assert all(r["bytes_ok"] and r["gbps"] > 0 for r in rows)
    assert (tmp_path / "results.md").read_text().count("| yes |") == len(rows)


class _FakeAgent:
    """Stands in for `NixlAgent` in one process: reads copy from a local array (the "peer's" pool) when the mode
    is DONE, stay in flight (PROC), fail (ERR), or refuse to start (post)."""

    def __init__(self, mode: str, release_ok: bool = True) -> None:
        self.mode, self.release_ok, self.posts, self.released = mode, release_ok, 0, 0

    def register_buffer(self, *args) -> None:
        pass

    def deregister_buffer(self, *args) -> None:
        pass

    def has_peer(self, name: str) -> bool:
        return True

    def read(self, local, remote, peer, mem_type="DRAM", remote_mem_type="DRAM"):
        import ctypes

        self.posts += 1
        if self.mode == "post":
            raise ConnectionError("NIXL_ERR_REMOTE_DISCONNECT")
        if self.mode == "DONE":
            for (dst, n, _), (src, _, _) in zip(local.tolist(), remote.tolist()):
                ctypes.memmove(dst, src, n)
        return object()

    def state(self, handle) -> str:
        return self.mode

    def release(self, handle) -> bool:
        self.released += 1
        return self.release_ok


def _fake_remote(agent, rows, verify=True):
    import torch

    from kvbm.kernels.nixl_agent import PeerInfo, PoolDescriptor, block_major_digest
    from kvbm.kernels.remote_cache import RemoteKVCache
    from kvbm.layouts import KVGeometry

    from nixl_peers import GEOMETRY

    g = KVGeometry(**GEOMETRY)
    desc = PoolDescriptor("fake", "G2", "DRAM", 0, rows.ctypes.data, g.block_bytes, g.block_bytes, rows.shape[0], g,
                          str(torch.bfloat16), block_major_digest(g, torch.bfloat16))
    return RemoteKVCache(agent, PeerInfo("fake", {"G2": desc}), "G2", g, torch.bfloat16, verify=verify,
                         timeout_s=0.05)


@pytest.mark.parametrize(("mode", "release_ok", "reason"), [
    ("DONE", True, None), ("ERR", True, "NIXL ERR"), ("PROC", True, "timed out"), ("PROC", False, "timed out"),
    ("post", True, "could not start"),
])
def test_read_outcomes_without_processes(mode, release_ok, reason):
    import torch

    from kvbm.kernels.nixl_agent import checksum_bytes
    from kvbm.kernels.transfers import Transfers
    from kvbm.layouts import KVGeometry

    from nixl_peers import GEOMETRY, POISON, pool_bytes

    g = KVGeometry(**GEOMETRY)
    rows = pool_bytes(5, 40, g.block_bytes)
    agent = _FakeAgent(mode, release_ok)
    remote = _fake_remote(agent, rows)
    remote.publish({b: checksum_bytes(rows[b], remote.descriptor.digest) for b in range(40)})
    dst = allocate("kvbm_staging", g, 40, dtype=torch.bfloat16, device="cpu")
    dst.tensors[0].view(torch.uint8).fill_(POISON)
    src, dst_ids = np.arange(39, -1, -1), np.arange(40)
    with Transfers(bounce_blocks=8, bounce_chunks=2) as transfers:
        transfer = transfers.submit(remote, dst, src, dst_ids)
        transfer.wait()
        landing = next(iter(transfers.path(Medium.REMOTE, Medium.HOST)._landings.values()))
        free = landing.pool.num_free()
    got = dst.tensors[0].view(torch.uint8).numpy().reshape(40, -1)
    if reason is None:
        assert transfer.ok and np.array_equal(got, rows[src]) and agent.posts == 5 and agent.released == 5
        return
    assert transfer.lost == set(range(40)) and not got.any()  # nothing was served
    if mode == "post":
        assert agent.posts == 1  # the peer is unreachable: the other batches fail without a post
    elif release_ok:
        assert agent.posts == agent.released == 5 and free == 2  # every handle released, every chunk back
    else:  # reads that could not be cancelled keep their chunks; with none left the rest fails at once
        assert agent.posts == agent.released == 2 and free == 0
        assert {r.split(": ")[0] for r in transfer.reasons.values()} == {
            "read from G4:fake/G2 timed out", "read from G4:fake/G2 not started"}
    assert all(reason in r or "not started" in r for r in transfer.reasons.values())


def test_unverified_blocks_and_missing_checksums():
    import torch

    from kvbm.kernels.transfers import Transfers
    from kvbm.layouts import KVGeometry

    from nixl_peers import GEOMETRY, pool_bytes

    g = KVGeometry(**GEOMETRY)
    rows = pool_bytes(6, 8, g.block_bytes)
    dst = allocate("kvbm_staging", g, 8, dtype=torch.bfloat16, device="cpu")
    with Transfers() as transfers:
        strict = transfers.submit(_fake_remote(_FakeAgent("DONE"), rows), dst, [0, 1], [0, 1])
        strict.wait()
        loose = transfers.submit(_fake_remote(_FakeAgent("DONE"), rows, verify=False), dst, [2, 3], [2, 3])
        loose.wait()
    assert strict.results == [BlockStatus.FAILED] * 2 and strict.lost == set()
    assert "no published checksum" in strict.reasons[0]
    assert loose.ok and np.array_equal(dst.tensors[0].view(torch.uint8).numpy().reshape(8, -1)[2:4], rows[2:4])
