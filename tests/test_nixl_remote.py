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
from kvbm.kernels.medium import Medium
from kvbm.kernels.transfers import registered_paths

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
        # a peer that stops answering (SIGSTOP) mid-read: the read times out, its blocks are lost, never served;
        # once the peer runs again it serves again
        out = _read(procs, reader, name, src, dst, signal_to=(pid, signal.SIGSTOP, 1.0))
        assert out["in_flight"] and out["failed"] and out["lost"] == out["failed"], out
        assert any("timed out" in r for r in out["reasons"]), out
        assert sorted(out["exact"] + out["poisoned"]) == list(range(40)) and set(out["exact"]).isdisjoint(out["failed"])
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
