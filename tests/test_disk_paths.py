"""The disk paths through `Transfers.submit`: host <-> disk (direct and through bounce chunks), GPU <-> disk over
POSIX (on the CPU through a stand-in GPU <-> host path) and over cuFile (on the CPU with a stand-in cufile module
doing real file I/O on host memory), per-block failures, fan-out reads, checksums, threads, chunk bookkeeping.
Real-GPU tests skip without CUDA."""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from disk_faults import flip_byte, rng  # noqa: F401  (rng is a fixture)

from kvbm.config import KvbmConfig
from kvbm.connectors.messages import RequestLoad, RequestStore
from kvbm.connectors.worker import ConnectorWorker
from kvbm.kernels import gds
from kvbm.kernels import transfers as transfers_module
from kvbm.kernels.block_transfer import BlockStatus, BlockTransfer
from kvbm.kernels.bounce import SLOT_LAYOUT, bounce_pool
from kvbm.kernels.disk_cache import DiskKVCache
from kvbm.kernels.medium import Medium
from kvbm.kernels.paths import host_disk
from kvbm.kernels.paths.gpu_disk import GpuDiskPath
from kvbm.kernels.paths.host_disk import HostDiskPath, direct_array
from kvbm.kernels.transfers import Transfers
from kvbm.layouts import KVGeometry, PagedKVCache, allocate, block_major, copy_blocks
from kvbm.leader.plans import Move, MoveKind
from kvbm.tiers import TierSpec

ALIGNED = KVGeometry(2, 2, 4, 2, 64, 2)  # 4096-byte blocks: slot = block
PADDED = KVGeometry(3, 2, 4, 2, 40, 2)  # 3840-byte blocks in 4096-byte slots
DT = torch.bfloat16
POISON = 0x5A5A


def make_cache(preset: str, geometry: KVGeometry, n: int) -> PagedKVCache:
    """A cache as an engine allocates it, ("g2") KVBM's dense block-major host pool in page-aligned memory, or
    ("misaligned") the same layout 64 bytes past a 4 KiB boundary."""
    if preset not in ("g2", "misaligned"):
        return allocate(preset, geometry, n, dtype=DT)
    from kvbm.kernels.host_memory import PinnedHostBuffer

    g = geometry
    if preset == "g2":
        storage = PinnedHostBuffer(n * g.block_bytes).tensor(torch.uint8)
    else:
        raw = torch.empty(n * g.block_bytes + 8192, dtype=torch.uint8)
        start = (64 - raw.data_ptr()) % 4096
        storage = raw[start:start + n * g.block_bytes]
    return block_major(storage.view(DT).view(n, g.num_layers, g.num_kv, g.block_size, g.num_heads, g.head_dim))


def fill(cache: PagedKVCache, rng) -> None:
    """Random non-zero 16-bit values in every element of a 2-byte cache."""
    for t in cache.tensors:
        v = t.view(torch.int16)
        v.copy_(torch.from_numpy(rng.integers(1, 30000, tuple(v.shape), dtype=np.int16)))


def poison(cache: PagedKVCache) -> None:
    for t in cache.tensors:
        t.view(torch.int16).fill_(POISON)


def block_bytes(cache: PagedKVCache, b: int) -> bytes:
    """Block ``b`` of a cache in KVBM's staging order (what a disk slot holds)."""
    g = cache.geometry
    return b"".join(cache.piece_view(layer, kv, torch.int16)[b].contiguous().numpy().tobytes()
                    for layer in range(g.num_layers) for kv in range(g.num_kv))


def poison_bytes(geometry: KVGeometry) -> bytes:
    return np.full(geometry.block_bytes // 2, POISON, dtype=np.int16).tobytes()


@pytest.fixture
def transfers():
    t = Transfers(disk_io="posix", bounce_blocks=3, bounce_chunks=2)
    yield t
    t.close()


def round_trip(transfers, tmp_path, rng, preset, geometry, n=11, **submit):
    """Write n random blocks of a ``preset`` cache to shuffled slots, read them back into a poisoned cache."""
    src = make_cache(preset, geometry, n)
    fill(src, rng)
    disk = DiskKVCache(tmp_path, geometry, DT, 2 * n)
    slots = rng.permutation(2 * n)[:n]
    t = transfers.submit(src, disk, np.arange(n), slots, **submit)
    t.wait()
    assert t.ok, t.reasons
    with open(disk.file.path, "rb") as f:
        for i, s in enumerate(slots):
            f.seek(int(s) * disk.slot_bytes)
            assert f.read(geometry.block_bytes) == block_bytes(src, i)
    dst = make_cache(preset, geometry, n)
    poison(dst)
    order = rng.permutation(n)
    t = transfers.submit(disk, dst, slots[order], np.arange(n))
    t.wait()
    assert t.ok and t.results == [BlockStatus.OK] * n, t.reasons
    for j, i in enumerate(order):
        assert block_bytes(dst, j) == block_bytes(src, int(i))
    return src, disk, slots


def spy_copies(monkeypatch) -> list[tuple[str, str]]:
    """(what, thread) of every block copy of the host paths (`block_copier`): to a bounce chunk (writes), from one
    or between destination blocks (reads)."""
    seen: list[tuple[str, str]] = []
    real_copier = host_disk.block_copier

    def copier(src, dst):
        inner = real_copier(src, dst)

        def run(src_ids, dst_ids):
            what = "from bounce" if src.name == SLOT_LAYOUT else "to bounce" if dst.name == SLOT_LAYOUT else "fan-out"
            seen.append((what, threading.current_thread().name))
            inner(src_ids, dst_ids)

        return run

    monkeypatch.setattr(host_disk, "block_copier", copier)
    return seen


@pytest.mark.parametrize("preset,geometry,direct", [
    ("g2", ALIGNED, True),  # G2 at a 4096-multiple block size: written from and read into its own memory
    ("g2", PADDED, False),  # slot stride != block stride: bounce
    ("misaligned", ALIGNED, False),  # the same layout, but not 4 KiB aligned: bounce
    ("block_major_head_first", ALIGNED, False),  # another inner order: bounce + conversion
    ("vllm_flash_attn_nhd", ALIGNED, False),
    ("vllm_flashinfer_hnd", PADDED, False),
])
def test_host_disk_round_trip(transfers, tmp_path, rng, preset, geometry, direct, monkeypatch):
    staged = spy_copies(monkeypatch)
    src, disk, _ = round_trip(transfers, tmp_path, rng, preset, geometry)
    assert (direct_array(src, disk) is not None) is direct
    whats = {what for what, _ in staged}
    assert whats == (set() if direct else {"to bounce", "from bounce"})
    pool = bounce_pool(transfers, geometry, DT, disk.slot_bytes)
    assert pool.num_free() == transfers.bounce_chunks
    disk.close()


def test_io_and_conversions_to_and_from_the_bounce_chunk_on_disk_threads(transfers, tmp_path, rng, monkeypatch):
    seen: dict[str, set[str]] = {"write": set(), "read": set()}
    staged = spy_copies(monkeypatch)
    real_w, real_r = DiskKVCache.write_slots, DiskKVCache.read_slots

    def write(self, *a, **k):
        seen["write"].add(threading.current_thread().name)
        return real_w(self, *a, **k)

    def read(self, *a, **k):
        seen["read"].add(threading.current_thread().name)
        return real_r(self, *a, **k)

    monkeypatch.setattr(DiskKVCache, "write_slots", write)
    monkeypatch.setattr(DiskKVCache, "read_slots", read)
    _, disk, _ = round_trip(transfers, tmp_path, rng, "vllm_flash_attn_nhd", PADDED)
    for what in ("to bounce", "from bounce"):  # the serial copy, per request
        threads = {t for w, t in staged if w == what}
        assert threads and all(t.startswith("kvbm-disk") for t in threads), (what, threads)
    assert seen["write"] and seen["read"] and all(n.startswith("kvbm-disk") for n in seen["write"] | seen["read"])
    disk.close()


def write_shuffled(transfers, tmp_path, rng, preset, n, spare=8, tags=None):
    """n random blocks of a ``preset`` cache written into shuffled slots of a disk with ``spare`` more slots."""
    src = make_cache(preset, ALIGNED, n)
    fill(src, rng)
    disk = DiskKVCache(tmp_path, ALIGNED, DT, n + spare)
    slots = rng.permutation(n + spare)[:n]
    t = transfers.submit(src, disk, np.arange(n), slots, tags=tags)
    t.wait()
    assert t.ok, t.reasons
    return src, disk, slots


def _spy_copies(monkeypatch, writes: bool) -> list[tuple[str, list[int]]]:
    """(thread, blocks) of every copy `block_copier`'s copies make: with ``writes`` those into a bounce chunk (the
    source blocks), else the others (the destination blocks of reads)."""
    calls: list[tuple[str, list[int]]] = []
    lock = threading.Lock()
    real = host_disk.block_copier

    def copier(src, dst):
        inner = real(src, dst)

        def run(src_ids, dst_ids):
            if (dst.name == SLOT_LAYOUT) == writes:
                with lock:
                    calls.append((threading.current_thread().name, (src_ids if writes else dst_ids).tolist()))
            inner(src_ids, dst_ids)

        return run

    monkeypatch.setattr(host_disk, "block_copier", copier)
    return calls


def fail_copies_of_block(monkeypatch, block: int, writes: bool) -> list[int]:
    """Make `block_copier`'s copies raise for the request holding transfer block ``block``: with ``writes`` a copy
    into a bounce chunk (the source blocks), else a read's copy out of one (the destination blocks); returns the
    list the failed copy's blocks are added to."""
    victim: list[int] = []
    real = host_disk.block_copier

    def copier(src, dst):
        inner = real(src, dst)

        def run(src_ids, dst_ids):
            ids = (src_ids if writes else dst_ids).tolist()
            if (dst if writes else src).name == SLOT_LAYOUT and block in ids:
                victim.extend(ids)
                raise RuntimeError("injected copy failure")
            inner(src_ids, dst_ids)

        return run

    monkeypatch.setattr(host_disk, "block_copier", copier)
    return victim


def copies_of_reads(monkeypatch) -> list[tuple[str, list[int]]]:
    """(thread, destination blocks) of every copy of reads `block_copier`'s copies make (not those of writes, into
    a bounce chunk)."""
    return _spy_copies(monkeypatch, writes=False)


def test_bounced_reads_copy_each_request_on_its_io_thread(tmp_path, rng, monkeypatch):
    """Through a chunk, every I/O request's blocks are copied into their destination by that request's thread right
    after its read and checks (one copy per request, several per chunk); bytes exact, blocks not read untouched."""
    n = 40
    calls = copies_of_reads(monkeypatch)
    with Transfers(disk_io="posix", bounce_blocks=16, bounce_chunks=2) as transfers:
        src, disk, slots = write_shuffled(transfers, tmp_path, rng, "vllm_flash_attn_nhd", n)
        disk.file._slots_per_request = 4
        dst = make_cache("vllm_flash_attn_nhd", ALIGNED, n + 5)
        poison(dst)
        back = rng.permutation(n + 5)[:n]
        t = transfers.submit(disk, dst, slots, back)
        t.wait()
        assert t.ok and t.results == [BlockStatus.OK] * n, t.reasons
        for k in range(n):
            assert block_bytes(dst, int(back[k])) == block_bytes(src, k)
        for b in sorted(set(range(n + 5)) - set(back.tolist())):
            assert block_bytes(dst, b) == poison_bytes(ALIGNED)
        assert sorted(b for _, blocks in calls for b in blocks) == sorted(back.tolist())  # each block copied once
        assert len(calls) >= n // 4 and all(len(blocks) <= 4 for _, blocks in calls)
        assert all(name.startswith("kvbm-disk") for name, _ in calls)
        assert bounce_pool(transfers, ALIGNED, DT).num_free() == 2
        disk.close()


def test_a_checksum_mismatch_in_a_request_copied_on_an_io_thread_fails_only_its_block(tmp_path, rng, monkeypatch):
    """A corrupted slot inside a request whose copy runs on the I/O thread: its block FAILED and lost, never
    copied (the destination untouched); the other blocks of the same request copied byte-exact."""
    n = 24
    calls = copies_of_reads(monkeypatch)
    with Transfers(disk_io="posix", bounce_blocks=8, bounce_chunks=2) as transfers:
        tags = [int(x) for x in rng.integers(1, 2**62, n)]
        src, disk, slots = write_shuffled(transfers, tmp_path, rng, "vllm_flash_attn_nhd", n, spare=0, tags=tags)
        disk.file._slots_per_request = 4
        order = np.argsort(slots)  # read in slot order: requests of 4 consecutive slots
        bad = int(order[5])  # the second slot of the second request
        flip_byte(disk.file.path, int(slots[bad]) * disk.slot_bytes + int(rng.integers(0, ALIGNED.block_bytes)))
        dst = make_cache("vllm_flash_attn_nhd", ALIGNED, n)
        poison(dst)
        t = transfers.submit(disk, dst, slots, np.arange(n), tags=tags)
        t.wait()
        assert [k for k, r in enumerate(t.results) if r is not BlockStatus.OK] == [bad]
        assert "checksum mismatch" in t.reasons[bad] and t.lost == {bad}
        assert block_bytes(dst, bad) == poison_bytes(ALIGNED)
        assert all(block_bytes(dst, k) == block_bytes(src, k) for k in range(n) if k != bad)
        copied = [blocks for _, blocks in calls]
        assert bad not in {b for blocks in copied for b in blocks}
        neighbours = {int(order[4]), int(order[6]), int(order[7])}
        assert any(neighbours <= set(blocks) for blocks in copied)  # its request's other blocks: one copy
        disk.close()


def test_a_failing_copy_fails_only_its_requests_blocks(tmp_path, rng, monkeypatch):
    """A copy that raises on an I/O thread fails the blocks of its request (not lost: the slots are intact); the
    other requests' blocks are copied byte-exact."""
    n = 24
    victim = fail_copies_of_block(monkeypatch, 7, writes=False)
    with Transfers(disk_io="posix", bounce_blocks=8, bounce_chunks=2) as transfers:
        src, disk, slots = write_shuffled(transfers, tmp_path, rng, "block_major_head_first", n)
        disk.file._slots_per_request = 4
        dst = make_cache("block_major_head_first", ALIGNED, n)
        poison(dst)
        t = transfers.submit(disk, dst, slots, np.arange(n))
        t.wait()
        assert 7 in victim and len(victim) <= 4
        assert sorted(k for k, r in enumerate(t.results) if r is not BlockStatus.OK) == sorted(victim)
        assert all("injected copy failure" in t.reasons[k] for k in victim) and t.lost == set()
        assert all(block_bytes(dst, k) == block_bytes(src, k) for k in range(n) if k not in victim)
        disk.close()


def test_direct_reads_land_in_g2_without_a_chunk_or_a_copy(tmp_path, rng, monkeypatch):
    """A dense, 4 KiB-aligned G2 is read straight into: no bounce chunk, no copy except to the other blocks a slot
    is read into; a slot asked for under another tag, a corrupted slot and an unreadable one fail only their blocks
    (never OK), every other block is byte-exact and blocks not read stay untouched."""
    n = 32
    calls = copies_of_reads(monkeypatch)
    with Transfers(disk_io="posix", bounce_blocks=8, bounce_chunks=2) as transfers:
        tags = [int(x) for x in rng.integers(1, 2**62, n)]
        src, disk, slots = write_shuffled(transfers, tmp_path, rng, "g2", n, tags=tags)
        dst = make_cache("g2", ALIGNED, n + 8)
        assert direct_array(dst, disk) is not None
        poison(dst)
        pool = bounce_pool(transfers, ALIGNED, DT, disk.slot_bytes)
        monkeypatch.setattr(pool, "acquire", lambda: pytest.fail("a direct read took a bounce chunk"))
        flipped, unreadable = 3, 9
        flip_byte(disk.file.path, int(slots[flipped]) * disk.slot_bytes + 11)
        bad_offset = int(slots[unreadable]) * disk.slot_bytes
        real_preadv = os.preadv

        def preadv(fd, bufs, offset):
            if offset <= bad_offset < offset + sum(len(b) for b in bufs):
                raise OSError(errno.EIO, "Input/output error")
            return real_preadv(fd, bufs, offset)

        monkeypatch.setattr(os, "preadv", preadv)
        # every block once, then block 0 into two more blocks: under its tag, and under another one
        ids = np.concatenate([np.arange(n), [0, 0]])
        back = rng.permutation(n + 8)[:n + 2]
        read_tags = tags + [tags[0], tags[0] ^ 1]
        t = transfers.submit(disk, dst, slots[ids], back, tags=read_tags)
        t.wait()
        failed = {k for k, r in enumerate(t.results) if r is not BlockStatus.OK}
        assert failed == {flipped, unreadable, n + 1} and t.lost == failed
        assert "checksum mismatch" in t.reasons[flipped] and "Input/output error" in t.reasons[unreadable]
        assert "checksum mismatch" in t.reasons[n + 1] and "tag" in t.reasons[n + 1]
        for k in set(range(n + 2)) - failed:
            assert block_bytes(dst, int(back[k])) == block_bytes(src, int(ids[k]))
        assert block_bytes(dst, int(back[n + 1])) == poison_bytes(ALIGNED)  # a failed fan-out copies nothing
        for b in sorted(set(range(n + 8)) - set(back.tolist())):
            assert block_bytes(dst, b) == poison_bytes(ALIGNED)
        assert [blocks for _, blocks in calls] == [[int(back[n])]]  # the one fan-out copy
        disk.close()


def copies_of_writes(monkeypatch) -> list[tuple[str, list[int]]]:
    """(thread, source blocks) of every copy `block_copier`'s copies make into a bounce chunk."""
    return _spy_copies(monkeypatch, writes=True)


def read_back(transfers, disk, slots, preset, n, tags=None) -> tuple[BlockTransfer, PagedKVCache]:
    """Slots read into blocks 0..len(slots)-1 of a poisoned ``preset`` cache of n blocks."""
    dst = make_cache(preset, disk.geometry, n)
    poison(dst)
    t = transfers.submit(disk, dst, slots, np.arange(len(slots)), tags=tags)
    t.wait()
    return t, dst


def test_direct_writes_from_scattered_g2_blocks_without_a_chunk_or_a_copy(tmp_path, rng, monkeypatch):
    """Scattered blocks of a dense, 4 KiB-aligned G2 are written straight from its memory: no bounce chunk, no
    copy, one iovec per stretch of source blocks adjacent in both the source and the file; bytes exact on disk and
    read back under their tags; an unwritable slot fails only its block, which is then never served."""
    n, size = 24, 96
    calls = copies_of_writes(monkeypatch)
    with Transfers(disk_io="posix", bounce_blocks=8, bounce_chunks=2) as transfers:
        src = make_cache("g2", ALIGNED, size)
        fill(src, rng)
        disk = DiskKVCache(tmp_path, ALIGNED, DT, n + 8)
        assert direct_array(src, disk) is not None
        pool = bounce_pool(transfers, ALIGNED, DT, disk.slot_bytes)
        monkeypatch.setattr(pool, "acquire", lambda: pytest.fail("a direct write took a bounce chunk"))
        gaps = rng.integers(1, 4, n)  # scattered source blocks, some of them adjacent (gap 1)
        gaps[9:12] = 1  # and a stretch of four for sure
        ids = np.cumsum(gaps)
        slots = np.arange(n)  # consecutive slots: one request (a direct batch is not cut at a chunk's size)
        tags = [int(x) for x in rng.integers(1, 2**62, n)]
        unwritable = n - 3
        bad_offset = int(slots[unwritable]) * disk.slot_bytes
        writes: dict[int, list[int]] = {}
        real_pwritev = os.pwritev

        def pwritev(fd, bufs, offset):
            writes.setdefault(offset, [len(b) for b in bufs])
            if offset <= bad_offset < offset + sum(len(b) for b in bufs):
                raise OSError(errno.EIO, "Input/output error")
            return real_pwritev(fd, bufs, offset)

        monkeypatch.setattr(os, "pwritev", pwritev)
        t = transfers.submit(src, disk, ids, slots, tags=tags)
        t.wait()
        assert [k for k, r in enumerate(t.results) if r is not BlockStatus.OK] == [unwritable]
        assert "Input/output error" in t.reasons[unwritable] and t.lost == set()
        assert calls == []
        cuts = np.flatnonzero(np.diff(ids) != 1) + 1  # one iovec per stretch of adjacent source blocks
        stretches = np.diff(np.concatenate([[0], cuts, [n]]))
        assert writes[0] == (stretches * disk.slot_bytes).tolist()
        assert len(writes[0]) < n  # (the stretch of four is one iovec)
        with open(disk.file.path, "rb") as f:
            for k in range(n):
                if k != unwritable:
                    f.seek(int(slots[k]) * disk.slot_bytes)
                    assert f.read(ALIGNED.block_bytes) == block_bytes(src, int(ids[k]))
        monkeypatch.setattr(os, "pwritev", real_pwritev)
        back, dst = read_back(transfers, disk, slots, "g2", n, tags)
        assert [k for k, r in enumerate(back.results) if r is not BlockStatus.OK] == [unwritable]
        assert "last write failed" in back.reasons[unwritable]
        for k in set(range(n)) - {unwritable}:  # read straight into G2: a failed block's bytes are unspecified
            assert block_bytes(dst, k) == block_bytes(src, int(ids[k]))
        disk.close()


def test_direct_batches_keep_every_io_thread_busy_and_chunked_ones_fit_a_chunk(tmp_path, rng, monkeypatch):
    """Moved straight between G2 and the disk, a batch holds enough consecutive slots for a full-size request on
    every I/O thread (a chunk's worth would leave most of them idle); through a chunk it holds a chunk's worth. Both
    ways every byte arrives."""
    n = 96
    with Transfers(disk_io="posix", bounce_blocks=8, bounce_chunks=2) as transfers:
        disk = DiskKVCache(tmp_path, ALIGNED, DT, n)
        disk.file._slots_per_request, disk.file._io_threads = 4, 6  # a full batch: 24 slots
        batches: list[int] = []
        for name in ("write_slots", "read_slots"):
            real = getattr(disk, name)
            monkeypatch.setattr(disk, name, lambda slots, *a, _real=real, **k: batches.append(len(slots))
                                or _real(slots, *a, **k))
        for preset, want in (("g2", [24] * 4), ("vllm_flash_attn_nhd", [8] * 12)):
            src, dst = make_cache(preset, ALIGNED, n), make_cache(preset, ALIGNED, n)
            fill(src, rng)
            fill(dst, rng)  # (poison: random bytes unlike the source's)
            assert (direct_array(src, disk) is not None) == (preset == "g2")
            ids, slots = rng.permutation(n), np.arange(n)
            tags = [int(x) for x in rng.integers(1, 2**62, n)]
            batches.clear()
            wrote = transfers.submit(src, disk, ids, slots, tags=tags)
            wrote.wait()
            assert wrote.ok and batches == want, (preset, batches)
            batches.clear()
            read = transfers.submit(disk, dst, slots, ids, tags=tags)
            read.wait()
            assert read.ok and batches == want, (preset, batches)
            for k in range(n):
                assert block_bytes(dst, int(ids[k])) == block_bytes(src, int(ids[k]))
        disk.close()


def test_bounced_writes_convert_each_request_on_its_io_thread(tmp_path, rng, monkeypatch):
    """Another layout goes through a chunk that each I/O request fills with its own blocks on its I/O thread (one
    copy per request, several per chunk), then checksums and writes; bytes exact on disk and read back."""
    n = 40
    calls = copies_of_writes(monkeypatch)
    with Transfers(disk_io="posix", bounce_blocks=16, bounce_chunks=2) as transfers:
        src = make_cache("vllm_flash_attn_nhd", ALIGNED, n + 9)
        fill(src, rng)
        disk = DiskKVCache(tmp_path, ALIGNED, DT, n + 8)
        disk.file._slots_per_request = 4
        ids = rng.permutation(n + 9)[:n]  # scattered source blocks into scattered slots
        slots = rng.permutation(n + 8)[:n]
        tags = [int(x) for x in rng.integers(1, 2**62, n)]
        t = transfers.submit(src, disk, ids, slots, tags=tags)
        t.wait()
        assert t.ok and t.results == [BlockStatus.OK] * n, t.reasons
        assert sorted(b for _, blocks in calls for b in blocks) == sorted(ids.tolist())  # each block copied once
        assert len(calls) >= n // 4 and all(len(blocks) <= 4 for _, blocks in calls)
        assert all(name.startswith("kvbm-disk") for name, _ in calls)
        assert bounce_pool(transfers, ALIGNED, DT).num_free() == 2
        with open(disk.file.path, "rb") as f:
            for k in range(n):
                f.seek(int(slots[k]) * disk.slot_bytes)
                assert f.read(ALIGNED.block_bytes) == block_bytes(src, int(ids[k]))
        back, dst = read_back(transfers, disk, slots, "vllm_flash_attn_nhd", n, tags)
        assert back.ok, back.reasons
        assert all(block_bytes(dst, k) == block_bytes(src, int(ids[k])) for k in range(n))
        disk.close()


def test_a_failing_write_conversion_fails_only_its_requests_blocks(tmp_path, rng, monkeypatch):
    """A copy into the chunk that raises on an I/O thread fails the blocks of its request (nothing of them is
    written; their slots read back FAILED, never served, even where they held a block before); the other requests'
    blocks are written byte-exact."""
    n = 24
    with Transfers(disk_io="posix", bounce_blocks=8, bounce_chunks=2) as transfers:
        _, disk, slots = write_shuffled(transfers, tmp_path, rng, "block_major_head_first", n)  # earlier blocks
        disk.file._slots_per_request = 4
        victim = fail_copies_of_block(monkeypatch, 7, writes=True)
        src = make_cache("block_major_head_first", ALIGNED, n)
        fill(src, rng)
        t = transfers.submit(src, disk, np.arange(n), slots)
        t.wait()
        assert 7 in victim and len(victim) <= 4
        assert sorted(k for k, r in enumerate(t.results) if r is not BlockStatus.OK) == sorted(victim)
        assert all("injected copy failure" in t.reasons[k] for k in victim) and t.lost == set()
        back, dst = read_back(transfers, disk, slots, "block_major_head_first", n)
        assert sorted(k for k, r in enumerate(back.results) if r is not BlockStatus.OK) == sorted(victim)
        for k in range(n):
            assert block_bytes(dst, k) == (poison_bytes(ALIGNED) if k in victim else block_bytes(src, k))
        disk.close()


def test_copies_on_io_threads_never_run_a_parallel_region_beside_the_callers(tmp_path):
    """numba's workqueue threading layer aborts the process when two parallel regions run at once: bounced writes
    and reads (a layout conversion per request on the I/O threads) while the caller runs parallel copies must not;
    the same run with the parallel copy on the I/O threads does abort (the check can fail)."""
    script = f"""
import sys, numpy as np, torch
from kvbm.kernels import numba_copy
from kvbm.kernels.disk_cache import DiskKVCache
from kvbm.kernels.paths import host_disk
from kvbm.kernels.transfers import Transfers
from kvbm.layouts import KVGeometry, allocate, copy_blocks
g, n = KVGeometry(2, 2, 16, 2, 64, 2), 64
if sys.argv[1] == "parallel":
    host_disk.block_copier = lambda s, d: lambda a, b: copy_blocks(s, d, a, b)
src = allocate("vllm_flash_attn_nhd", g, n, dtype=torch.bfloat16)
for t in src.tensors:
    t.view(torch.int16).copy_(torch.from_numpy(np.random.default_rng(1).integers(1, 30000, tuple(t.shape),
                                                                              dtype=np.int16)))
other = allocate("vllm_flash_attn_nhd", g, n, dtype=torch.bfloat16)
ids = np.arange(n)
with Transfers(disk_io="posix", bounce_blocks=32, bounce_chunks=2, disk_threads=2) as transfers, \
        DiskKVCache({str(tmp_path)!r}, g, torch.bfloat16, n) as disk:
    disk.file._slots_per_request = 2
    for _ in range(30):
        t = transfers.submit(src, disk, ids, ids)
        while not t.done():
            copy_blocks(src, other, ids, ids)  # a parallel region on the caller's thread
        assert t.ok, t.reasons
        dst = allocate("vllm_flash_attn_nhd", g, n, dtype=torch.bfloat16)
        t = transfers.submit(disk, dst, ids, ids)
        while not t.done():
            copy_blocks(src, other, ids, ids)  # a parallel region on the caller's thread
        assert t.ok, t.reasons
        assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(src.tensors, dst.tensors))
import numba
print("layer", numba.threading_layer())
"""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    ok = subprocess.run([sys.executable, "-c", script, "serial"], env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0 and "layer workqueue" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", script, "parallel"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "workqueue" in bad.stderr, (bad.returncode, bad.stderr[-2000:])


def test_read_of_one_slot_into_several_blocks_reads_it_once(transfers, tmp_path, rng, monkeypatch):
    src = allocate("vllm_flash_attn_nhd", PADDED, 4, dtype=DT)
    fill(src, rng)
    disk = DiskKVCache(tmp_path, PADDED, DT, 8)
    assert transfers.submit(src, disk, [0, 1, 2], [5, 2, 7]).wait() is None
    reads: list[list[int]] = []
    real = DiskKVCache.read_slots
    monkeypatch.setattr(DiskKVCache, "read_slots", lambda self, s, *a: reads.append(list(s)) or real(self, s, *a))
    dst = allocate("vllm_flash_attn_nhd", PADDED, 6, dtype=DT)
    poison(dst)
    t = transfers.submit(disk, dst, [5, 5, 7, 2, 5], [0, 1, 2, 3, 4])
    t.wait()
    assert t.ok, t.reasons
    assert sorted(s for r in reads for s in r) == [2, 5, 7]
    for d, i in zip(range(5), [0, 0, 2, 1, 0]):
        assert block_bytes(dst, d) == block_bytes(src, i)
    assert block_bytes(dst, 5) == poison_bytes(PADDED)
    disk.close()


@pytest.mark.parametrize("reading", [False, True])
def test_io_error_fails_exactly_its_block(transfers, tmp_path, rng, monkeypatch, reading):
    src = allocate("vllm_flash_attn_nhd", PADDED, 6, dtype=DT)
    fill(src, rng)
    disk = DiskKVCache(tmp_path, PADDED, DT, 8)
    bad_offset = 4 * disk.slot_bytes
    name = "preadv" if reading else "pwritev"
    real = getattr(os, name)

    def failing(fd, bufs, offset):
        if offset <= bad_offset < offset + sum(len(b) for b in bufs):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, offset)

    if not reading:
        monkeypatch.setattr(os, name, failing)
    t = transfers.submit(src, disk, range(6), [3, 4, 5, 0, 1, 2])
    t.wait()
    if not reading:
        assert t.results == [BlockStatus.OK, BlockStatus.FAILED] + [BlockStatus.OK] * 4
        assert "Input/output error" in t.reasons[1] and "disk write failed" in t.reasons[1]
        assert t.lost == set()  # the source is intact
        return disk.close()
    assert t.ok
    monkeypatch.setattr(os, name, failing)
    dst = allocate("vllm_flash_attn_nhd", PADDED, 6, dtype=DT)
    poison(dst)
    t = transfers.submit(disk, dst, [3, 4, 5, 0, 1, 2], range(6))
    t.wait()
    assert [i for i, r in enumerate(t.results) if r is BlockStatus.FAILED] == [1]
    assert "Input/output error" in t.reasons[1] and "disk read failed" in t.reasons[1] and t.lost == {1}
    for i in range(6):
        assert block_bytes(dst, i) == (poison_bytes(PADDED) if i == 1 else block_bytes(src, i))
    disk.close()


def test_corrupted_slot_fails_its_block_and_leaves_the_destination_untouched(transfers, tmp_path, rng):
    src, disk, slots = round_trip(transfers, tmp_path, rng, "g2", ALIGNED, n=5)
    flip_byte(disk.file.path, int(slots[3]) * disk.slot_bytes + 100)
    dst = make_cache("misaligned", ALIGNED, 5)  # (through a bounce chunk: a direct read leaves a failed block's bytes)
    poison(dst)
    t = transfers.submit(disk, dst, slots, range(5))
    t.wait()
    assert [r is BlockStatus.OK for r in t.results] == [True, True, True, False, True]
    assert "checksum mismatch" in t.reasons[3] and t.lost == {3}  # the stored copy is bad: the index drops it
    assert block_bytes(dst, 3) == poison_bytes(ALIGNED)
    disk.close()


@pytest.mark.parametrize("preset", ["g2", "vllm_flash_attn_nhd"])
def test_shuffled_ids_coalesce_and_a_bad_slot_in_a_run_fails_only_its_block(tmp_path, rng, preset):
    n = 64
    with Transfers(disk_io="posix", bounce_blocks=16, bounce_chunks=2) as transfers:
        src = make_cache(preset, ALIGNED, n)
        fill(src, rng)
        disk = DiskKVCache(tmp_path, ALIGNED, DT, n + 8)
        disk.file._slots_per_request = 5  # several requests per chunk, cut inside runs
        ids, slots = rng.permutation(n), rng.permutation(n + 8)[:n]
        tags = [int(t) for t in rng.integers(1, 2**62, n)]
        t = transfers.submit(src, disk, ids, slots, tags=tags)
        t.wait()
        assert t.ok, t.reasons
        bad = [int(k) for k in rng.choice(n, 3, replace=False)]
        for k in bad:
            flip_byte(disk.file.path, int(slots[k]) * disk.slot_bytes + int(rng.integers(0, ALIGNED.block_bytes)))
        dst = make_cache(preset, ALIGNED, n)
        poison(dst)
        back = rng.permutation(n)  # read every block into a shuffled destination
        t = transfers.submit(disk, dst, slots, back, tags=tags)
        t.wait()
        assert sorted(t.reasons) == sorted(bad) and t.lost == set(bad)
        assert all("checksum mismatch" in t.reasons[k] for k in bad)
        for k in range(n):  # read straight into G2, a failed block's bytes are unspecified (and never served)
            if k not in bad:
                assert block_bytes(dst, int(back[k])) == block_bytes(src, int(ids[k]))
            elif preset != "g2":  # through a chunk: the destination untouched
                assert block_bytes(dst, int(back[k])) == poison_bytes(ALIGNED)
        disk.close()


def test_tags_through_submit(transfers, tmp_path, rng):
    src = allocate("kvbm_staging", PADDED, 3, dtype=DT)
    fill(src, rng)
    disk = DiskKVCache(tmp_path, PADDED, DT, 4)
    path = transfers.path(Medium.HOST, Medium.DISK)
    assert isinstance(path, HostDiskPath)
    path.submit(src, disk, np.arange(3), np.arange(3), tags=[11, 12, 13]).wait()
    dst = allocate("kvbm_staging", PADDED, 4, dtype=DT)
    poison(dst)
    t = path.submit(disk, dst, np.array([0, 1, 2, 2]), np.arange(4), tags=[11, 99, 13, 14])
    t.wait()
    assert [r is BlockStatus.OK for r in t.results] == [True, False, True, False]
    assert all("checksum mismatch" in t.reasons[i] for i in (1, 3))
    assert block_bytes(dst, 3) == poison_bytes(PADDED) and block_bytes(dst, 2) == block_bytes(src, 2)
    with pytest.raises(ValueError, match="tags has 2 entries"):
        path.submit(src, disk, np.arange(3), np.arange(3), tags=[1, 2])
    disk.close()


def test_more_transfers_than_chunks(tmp_path, rng):
    transfers = Transfers(disk_io="posix", bounce_blocks=2, bounce_chunks=2)
    src = allocate("vllm_flash_attn_nhd", PADDED, 20, dtype=DT)
    fill(src, rng)
    disk = DiskKVCache(tmp_path, PADDED, DT, 20)
    handles = [transfers.submit(src, disk, range(i, i + 5), range(i, i + 5)) for i in (0, 5, 10, 15)]
    for h in handles:
        h.wait()
        assert h.ok, h.reasons
    dst = allocate("vllm_flash_attn_nhd", PADDED, 20, dtype=DT)
    poison(dst)
    handles = [transfers.submit(disk, dst, range(i, i + 5), range(i, i + 5)) for i in (0, 5, 10, 15)]
    transfers.drain()
    assert all(h.ok for h in handles)
    assert all(block_bytes(dst, i) == block_bytes(src, i) for i in range(20))
    assert bounce_pool(transfers, PADDED, DT).num_free() == 2
    transfers.close()
    disk.close()


def test_refuses_caches_it_cannot_move(transfers, tmp_path):
    disk = DiskKVCache(tmp_path, PADDED, DT, 4)
    other = DiskKVCache(tmp_path, PADDED, DT, 4)
    with pytest.raises(ValueError, match="no transfer path from disk to disk"):
        transfers.submit(disk, other, [0], [0])
    with pytest.raises(ValueError, match="host cache and a DiskKVCache"):
        transfers.path(Medium.HOST, Medium.DISK).submit(allocate("kvbm_staging", PADDED, 2, dtype=DT),
                                                        object(), np.arange(1), np.arange(1))
    disk.close()
    other.close()


# ---------------------------------------------------------------------- GPU <-> disk without a GPU


class StandInGpuCache(PagedKVCache):
    """A CPU cache that declares itself GPU memory, to route GPU <-> disk transfers on a machine without one."""

    medium = Medium.GPU


def gpu_stand_in(preset: str, geometry: KVGeometry, n: int) -> StandInGpuCache:
    cache = allocate(preset, geometry, n, dtype=DT)
    return StandInGpuCache(cache.tensors, cache.layout)


class StandInGpuHostPath:
    """GPU <-> host as an asynchronous copy: done on a timer thread, completes through a Future (like an event)."""

    name = "stand-in-gpu-host"
    threads: list[str] = []
    held: list[Future] | None = None  #: when a list, each copy's completion is appended here for the test to set

    def __init__(self, transfers) -> None:
        pass

    def submit(self, src, dst, src_ids, dst_ids) -> BlockTransfer:
        StandInGpuHostPath.threads.append(threading.current_thread().name)
        copy_blocks(src, dst, src_ids, dst_ids, backend="torch")
        done: Future = Future()
        if StandInGpuHostPath.held is not None:
            StandInGpuHostPath.held.append(done)
        else:
            threading.Timer(0.002, done.set_result, [None]).start()

        def steps():
            yield done
            return {}

        return BlockTransfer(src_ids.size, self.name, steps())

    def close(self) -> None:
        pass


@pytest.fixture
def stand_in_gpu_paths(monkeypatch):
    StandInGpuHostPath.threads, StandInGpuHostPath.held = [], None
    monkeypatch.setitem(transfers_module._PATHS, (Medium.GPU, Medium.HOST), StandInGpuHostPath)
    monkeypatch.setitem(transfers_module._PATHS, (Medium.HOST, Medium.GPU), StandInGpuHostPath)
    return StandInGpuHostPath


def gpu_round_trip(transfers, tmp_path, rng, geometry=PADDED, n=7):
    gpu = gpu_stand_in("vllm_flash_attn_hnd", geometry, n)
    fill(gpu, rng)
    disk = DiskKVCache(tmp_path, geometry, DT, n + 2)
    slots = rng.permutation(n + 2)[:n]
    t = transfers.submit(gpu, disk, np.arange(n), slots)
    t.wait()
    assert t.ok, t.reasons
    back = gpu_stand_in("vllm_flash_attn_hnd", geometry, n + 1)
    poison(back)
    t = transfers.submit(disk, back, np.concatenate([slots, slots[:1]]), np.arange(n + 1))
    t.wait()
    return gpu, disk, slots, back, t


def assert_read_back(gpu, back, n: int) -> None:
    """``gpu_round_trip``'s blocks came back byte-exact: its ``n`` blocks, then block 0 read a second time."""
    for i in range(n):
        assert block_bytes(back, i) == block_bytes(gpu, i)
    assert block_bytes(back, n) == block_bytes(gpu, 0)


def test_gpu_disk_posix_through_the_gpu_host_path(stand_in_gpu_paths, transfers, tmp_path, rng):
    gpu, disk, slots, back, t = gpu_round_trip(transfers, tmp_path, rng)
    assert t.ok and t.path == "gpu-disk-posix", t.reasons
    assert transfers.path(Medium.GPU, Medium.DISK).mode == "posix"
    assert_read_back(gpu, back, len(slots))
    me = threading.current_thread().name
    assert stand_in_gpu_paths.threads and set(stand_in_gpu_paths.threads) == {me}
    assert bounce_pool(transfers, PADDED, DT).num_free() == transfers.bounce_chunks
    disk.close()


def test_gpu_disk_prepare_builds_the_copies_a_transfer_then_uses(stand_in_gpu_paths, transfers, tmp_path, rng,
                                                                  monkeypatch):
    """`Transfers.prepare` of a GPU cache and a disk cache, both ways, under POSIX I/O: the GPU <-> host path is asked
    to prepare the very pairs (the GPU cache, the bounce pool's cache) that the round trip then submits, one each
    way; nothing is moved by the preparing (the GPU -> host path's submit is not called); caches the path cannot
    move raise as for a submit."""
    prepared, submitted = [], []
    monkeypatch.setattr(stand_in_gpu_paths, "prepare", lambda self, src, dst: prepared.append((src, dst)),
                        raising=False)
    submit = stand_in_gpu_paths.submit

    def recorded(self, src, dst, src_ids, dst_ids):
        submitted.append((src, dst))
        return submit(self, src, dst, src_ids, dst_ids)
    monkeypatch.setattr(stand_in_gpu_paths, "submit", recorded)
    gpu = gpu_stand_in("vllm_flash_attn_hnd", PADDED, 7)
    fill(gpu, rng)
    disk = DiskKVCache(tmp_path, PADDED, DT, 9)
    transfers.prepare(gpu, disk)
    transfers.prepare(disk, gpu)
    pool = bounce_pool(transfers, PADDED, DT, disk.slot_bytes)
    assert len(prepared) == 2 and not submitted
    assert prepared[0][0] is gpu and prepared[0][1] is pool.cache
    assert prepared[1][0] is pool.cache and prepared[1][1] is gpu
    slots = rng.permutation(9)[:7]
    t = transfers.submit(gpu, disk, np.arange(7), slots)
    t.wait()
    back = gpu_stand_in("vllm_flash_attn_hnd", PADDED, 7)
    poison(back)
    r = transfers.submit(disk, back, slots, np.arange(7))
    r.wait()
    assert t.ok and r.ok, (t.reasons, r.reasons)
    for i in range(7):
        assert block_bytes(back, i) == block_bytes(gpu, i)
    assert submitted[0][0] is gpu and submitted[0][1] is pool.cache
    assert submitted[-1][0] is pool.cache and submitted[-1][1] is back
    with pytest.raises(ValueError, match="moves blocks between a GPU cache and a DiskKVCache"):
        transfers.path(Medium.GPU, Medium.DISK).prepare(gpu, allocate("vllm_flash_attn_hnd", PADDED, 2, dtype=DT))
    disk.close()


def test_gpu_disk_posix_read_failure_never_reaches_the_gpu(stand_in_gpu_paths, transfers, tmp_path, rng):
    gpu = gpu_stand_in("vllm_flash_attn_nhd", ALIGNED, 4)
    fill(gpu, rng)
    disk = DiskKVCache(tmp_path, ALIGNED, DT, 4)
    transfers.submit(gpu, disk, range(4), range(4)).wait()
    flip_byte(disk.file.path, 2 * disk.slot_bytes + 7)
    back = gpu_stand_in("vllm_flash_attn_nhd", ALIGNED, 4)
    poison(back)
    t = transfers.submit(disk, back, range(4), range(4))
    t.wait()
    assert [r is BlockStatus.OK for r in t.results] == [True, True, False, True]
    assert "checksum mismatch" in t.reasons[2] and block_bytes(back, 2) == poison_bytes(ALIGNED)
    disk.close()


def _gated_writes(disk: DiskKVCache, monkeypatch) -> threading.Event:
    """Hold ``disk``'s slot writes on their disk threads until the returned event is set."""
    gate = threading.Event()
    write = disk.write_slots

    def held(*args, **kwargs):
        assert gate.wait(30), "the test never opened the gate"
        return write(*args, **kwargs)

    monkeypatch.setattr(disk, "write_slots", held)
    return gate


def _poll_until(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.001)
    return check()


def test_a_gpu_write_frees_its_source_once_every_block_is_in_a_chunk(stand_in_gpu_paths, transfers, tmp_path, rng,
                                                                      monkeypatch):
    """The two chunks' copies end one after the other: the first chunk's write starts (and is held) before the
    second copy ends, and the source is reported read once that copy ends, not once the held write does."""
    n = 5  # two chunks of the fixture's pool: both copied before either write ends
    gpu = gpu_stand_in("vllm_flash_attn_hnd", PADDED, n)
    fill(gpu, rng)
    want = [block_bytes(gpu, i) for i in range(n)]
    disk = DiskKVCache(tmp_path, PADDED, DT, n + 3)
    gate = _gated_writes(disk, monkeypatch)
    slots = rng.permutation(n + 3)[:n]
    stand_in_gpu_paths.held = copies = []
    t = transfers.submit(gpu, disk, np.arange(n), slots)
    assert len(copies) == 2 and not t.source_read and not t.done()
    copies[0].set_result(None)
    assert not _poll_until(lambda: t.done() or t.source_read, seconds=0.05)  # the first write runs, held
    copies[1].set_result(None)
    assert _poll_until(lambda: t.done() or t.source_read)
    assert t.source_read and not t.done()  # every write is held at the gate
    poison(gpu)  # the engine reuses the blocks while the writes go on
    gate.set()
    t.wait()
    assert t.ok, t.reasons
    back = gpu_stand_in("vllm_flash_attn_hnd", PADDED, n)
    poison(back)
    stand_in_gpu_paths.held = None  # the read's copies complete on their own
    r = transfers.submit(disk, back, slots, np.arange(n))
    r.wait()
    assert r.ok, r.reasons
    assert [block_bytes(back, i) for i in range(n)] == want
    disk.close()


def test_a_gpu_write_longer_than_the_pool_reads_its_source_until_its_last_chunk_is_copied(
        stand_in_gpu_paths, transfers, tmp_path, rng, monkeypatch):
    n = 8  # the fixture's pool holds 6: the last chunk's copy waits for a write to give a chunk back
    gpu = gpu_stand_in("vllm_flash_attn_nhd", ALIGNED, n)
    fill(gpu, rng)
    disk = DiskKVCache(tmp_path, ALIGNED, DT, n)
    gate = _gated_writes(disk, monkeypatch)
    t = transfers.submit(gpu, disk, np.arange(n), np.arange(n))
    assert not _poll_until(lambda: t.done() or t.source_read, 0.2)
    gate.set()
    t.wait()
    assert t.ok and t.source_read, t.reasons
    disk.close()


class _StoringWorker:
    """A worker over a stand-in GPU cache of random blocks and a disk G3 whose writes wait at ``gate``, storing its
    first ``len(slots)`` blocks into ``slots`` for request "req" (move 1)."""

    def __init__(self, tmp_path, rng, monkeypatch, slots: tuple[int, ...]) -> None:
        self.engine = gpu_stand_in("vllm_flash_attn_hnd", PADDED, 6)
        fill(self.engine, rng)
        self.slots, n = slots, len(slots)
        self.want = [block_bytes(self.engine, i) for i in range(n)]
        self.worker = ConnectorWorker(self.engine, [TierSpec("G3", Medium.DISK, 8, tmp_path, use_o_direct=False)],
                                      KvbmConfig())
        self.gate = _gated_writes(self.worker.store.cache("G3"), monkeypatch)
        self.hashes = tuple(int(h) for h in rng.integers(1, 2**62, n))
        self.worker.start_stores([RequestStore("req", (Move(1, MoveKind.STORE, "G1", "G3", tuple(range(n)), slots,
                                                            self.hashes),))])

    def assert_loads_back(self) -> None:
        """The stored blocks load back into the engine's blocks byte-exact (after it overwrote them)."""
        n = len(self.slots)
        self.worker.start_loads([RequestLoad("back", (Move(2, MoveKind.LOAD, "G3", "G1", self.slots, tuple(range(n)),
                                                           self.hashes),))])
        self.worker.store.wait_all()
        assert self.worker.poll()[1] == {"back"} and self.worker.take_load_errors() == set()
        assert [block_bytes(self.engine, i) for i in range(n)] == self.want
        self.worker.close()


def test_a_worker_frees_a_stored_requests_engine_blocks_before_its_disk_write_ends(stand_in_gpu_paths, tmp_path, rng,
                                                                                   monkeypatch):
    """The engine gets a held request's blocks back once the store has them in its bounce buffers; the write's
    result reaches the leader when it ends, and the blocks load back byte-exact after the engine overwrote them."""
    s = _StoringWorker(tmp_path, rng, monkeypatch, (5, 2, 7, 0))
    s.worker.hold(["req"])
    freed: set[str] = set()
    assert _poll_until(lambda: bool(freed.update(s.worker.poll()[0])) or "req" in freed)
    report = s.worker.take_report()
    assert report is None or 1 not in report.results  # the write goes on
    poison(s.engine)  # the engine reuses the blocks
    s.gate.set()
    results: dict = {}

    def reported() -> bool:
        s.worker.poll()
        report = s.worker.take_report()
        results.update({} if report is None else report.results)
        return 1 in results

    assert _poll_until(reported) and results[1].failed == {}
    s.assert_loads_back()


def test_finishing_a_preempted_requests_stores_waits_for_its_bounce_copies_not_its_disk_writes(
        stand_in_gpu_paths, tmp_path, rng, monkeypatch):
    s = _StoringWorker(tmp_path, rng, monkeypatch, (0, 1, 2, 3))
    finishing = threading.Thread(target=s.worker.finish_stores_of, args=(["req"],), daemon=True)
    finishing.start()
    finishing.join(10)
    returned = not finishing.is_alive()
    poison(s.engine)  # the engine reuses the preempted request's blocks
    s.gate.set()
    finishing.join(10)
    assert returned  # while every write was held
    s.worker.store.wait_all()
    s.worker.poll()
    assert s.worker.take_report().results[1].failed == {}
    s.assert_loads_back()


# ---------------------------------------------------------------------- cuFile, with a stand-in module


class FakeCuFileError(Exception):
    pass


def fake_cufile(register_error: Exception | None = None, bad_offsets=(), short_offsets=()):
    """A stand-in for cuda.bindings.cufile: real pread/pwrite of the registered descriptor to and from host
    memory at the given address; raises at ``bad_offsets``, moves half at ``short_offsets``."""
    mod = types.ModuleType("cuda.bindings.cufile")
    mod.calls, descrs, handles = [], {}, {}

    class Descr:
        def __init__(self):
            self.type, self.handle, self.fs_ops = None, types.SimpleNamespace(fd=None), None
            self.ptr = id(self)
            descrs[self.ptr] = self

    def handle_register(ptr):
        mod.calls.append("handle_register")
        if register_error is not None:
            raise register_error
        handles[len(handles) + 1] = descrs[ptr].handle.fd
        return len(handles)

    def move(reading, fh, base, size, file_offset, buf_offset):
        mod.calls.append(("read" if reading else "write", file_offset, size))
        if any(file_offset <= b < file_offset + size for b in bad_offsets):
            raise FakeCuFileError("cuFile error 5011 (CU_FILE_IO_ERROR)")
        if any(file_offset <= b < file_offset + size for b in short_offsets):
            size //= 2
        view = (ctypes.c_char * size).from_address(base + buf_offset)
        return (os.preadv if reading else os.pwritev)(handles[fh], [view], file_offset)

    mod.Descr = Descr
    mod.FileHandleType = types.SimpleNamespace(OPAQUE_FD=1)
    mod.driver_open = lambda: mod.calls.append("driver_open")
    mod.driver_close = lambda: mod.calls.append("driver_close")
    mod.handle_register = handle_register
    mod.handle_deregister = lambda fh: mod.calls.append("handle_deregister")
    mod.buf_register = lambda *a: mod.calls.append("buf_register")
    mod.buf_deregister = lambda *a: mod.calls.append("buf_deregister")
    mod.read = lambda *a: move(True, *a)
    mod.write = lambda *a: move(False, *a)
    return mod


@pytest.fixture
def nvidia_fs(tmp_path, monkeypatch):
    modules = tmp_path / "modules"
    modules.write_text("nvidia_fs 1 0 - Live 0x0\n")
    monkeypatch.setattr(gds, "PROC_MODULES", str(modules))


@pytest.fixture
def host_staging(monkeypatch):
    """cuFile's staging chunks in host memory and the staging copies on the CPU (the I/O logic under test)."""

    def staging_pool(self, gpu, disk):
        return bounce_pool(self._transfers, disk.geometry, disk.dtype, disk.slot_bytes)

    def stage(self, src, dst, src_ids, dst_ids):
        copy_blocks(src, dst, src_ids, dst_ids, backend="torch")
        return BlockTransfer.completed(src_ids.size, "stand-in-staging")

    monkeypatch.setattr(GpuDiskPath, "_staging_pool", staging_pool)
    monkeypatch.setattr(GpuDiskPath, "_stage", stage)


def test_auto_uses_gds_when_probe_and_registration_succeed(nvidia_fs, host_staging, monkeypatch, tmp_path, rng):
    cufile = fake_cufile()
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", cufile)
    transfers = Transfers(disk_io="auto", bounce_blocks=3, bounce_chunks=2)
    gpu, disk, slots, back, t = gpu_round_trip(transfers, tmp_path, rng)
    assert t.ok and t.path == "gpu-disk-gds", t.reasons
    assert transfers.path(Medium.GPU, Medium.DISK).mode == "gds"
    assert_read_back(gpu, back, len(slots))
    sb = disk.slot_bytes
    read = [s for c in cufile.calls if c[0:1] == ("read",) for s in range(c[1] // sb, (c[1] + c[2]) // sb)]
    assert sorted(read) == sorted(int(s) for s in slots)  # each slot once, though slot 0 went to two blocks
    assert cufile.calls.count("handle_register") == 1
    transfers.close()
    assert cufile.calls[-1] == "driver_close" and "handle_deregister" in cufile.calls
    disk.close()


def test_gds_runs_of_consecutive_slots_are_one_call(nvidia_fs, host_staging, monkeypatch, tmp_path, rng):
    cufile = fake_cufile()
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", cufile)
    transfers = Transfers(disk_io="gds", bounce_blocks=8, bounce_chunks=1)
    gpu = gpu_stand_in("vllm_flash_attn_nhd", PADDED, 6)
    fill(gpu, rng)
    disk = DiskKVCache(tmp_path, PADDED, DT, 10)
    assert transfers.submit(gpu, disk, range(6), [5, 3, 4, 9, 0, 1]).wait() is None
    writes = [(c[1] // disk.slot_bytes, c[2] // disk.slot_bytes) for c in cufile.calls if c[0:1] == ("write",)]
    assert sorted(writes) == [(0, 2), (3, 3), (9, 1)]
    transfers.close()
    disk.close()


@pytest.mark.parametrize("fault", ["raise", "short"])
@pytest.mark.parametrize("reading", [False, True])
def test_gds_io_errors_fail_exactly_their_blocks(nvidia_fs, host_staging, monkeypatch, tmp_path, rng, fault,
                                                 reading):
    sb = 4096
    bad = {"bad_offsets" if fault == "raise" else "short_offsets": [3 * sb]}
    good = fake_cufile()
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", good if reading else fake_cufile(**bad))
    transfers = Transfers(disk_io="gds", bounce_blocks=8, bounce_chunks=1)
    gpu = gpu_stand_in("vllm_flash_attn_nhd", PADDED, 5)
    fill(gpu, rng)
    disk = DiskKVCache(tmp_path, PADDED, DT, 6)
    t = transfers.submit(gpu, disk, range(5), range(1, 6))
    t.wait()
    if not reading:
        assert [r is BlockStatus.OK for r in t.results] == [True, True, False, True, True]
        assert "disk write failed: cuFile write of slot 3" in t.reasons[2]
        assert ("5011" if fault == "raise" else "moved") in t.reasons[2]
        transfers.close()
        return disk.close()
    assert t.ok
    transfers.close()
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", fake_cufile(**bad))
    transfers = Transfers(disk_io="gds", bounce_blocks=8, bounce_chunks=1)
    back = gpu_stand_in("vllm_flash_attn_nhd", PADDED, 5)
    poison(back)
    t = transfers.submit(disk, back, range(1, 6), range(5))
    t.wait()
    assert [r is BlockStatus.OK for r in t.results] == [True, True, False, True, True]
    assert "disk read failed: cuFile read of slot 3" in t.reasons[2]
    for i in range(5):
        assert block_bytes(back, i) == (poison_bytes(PADDED) if i == 2 else block_bytes(gpu, i))
    transfers.close()
    disk.close()


def test_auto_falls_back_to_posix_when_registration_fails(nvidia_fs, stand_in_gpu_paths, monkeypatch, tmp_path,
                                                          rng, caplog):
    cufile = fake_cufile(register_error=FakeCuFileError("cuFile error 5027 (HANDLE_NOT_REGISTERED)"))
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", cufile)
    transfers = Transfers(disk_io="auto", bounce_blocks=3, bounce_chunks=2)
    with caplog.at_level(logging.INFO, logger="kvbm.kernels.paths.gpu_disk"):
        gpu, disk, slots, back, t = gpu_round_trip(transfers, tmp_path, rng)
    assert t.ok and t.path == "gpu-disk-posix"
    assert all(block_bytes(back, i) == block_bytes(gpu, i) for i in range(len(slots)))
    fallbacks = [r for r in caplog.records if "HANDLE_NOT_REGISTERED" in r.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.INFO
    assert cufile.calls.count("handle_register") == 1  # tried once per cache, not per transfer
    transfers.close()
    disk.close()


def test_gds_mode_fails_clearly_without_gds(nvidia_fs, monkeypatch, tmp_path, stand_in_gpu_paths):
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile",
                        fake_cufile(register_error=FakeCuFileError("cuFile error 5027 (HANDLE_NOT_REGISTERED)")))
    transfers = Transfers(disk_io="gds")
    gpu = gpu_stand_in("vllm_flash_attn_nhd", PADDED, 2)
    disk = DiskKVCache(tmp_path, PADDED, DT, 2)
    with pytest.raises(ValueError, match="DYN_KVBM_DISK_IO=gds.*HANDLE_NOT_REGISTERED"):
        transfers.submit(gpu, disk, [0], [0])
    transfers.close()
    (tmp_path / "modules").write_text("nvidia 1 0 - Live 0x0\n")  # no nvidia_fs: compatibility mode only
    with pytest.raises(RuntimeError, match="DYN_KVBM_DISK_IO=gds.*compatibility mode"):
        Transfers(disk_io="gds").path(Medium.GPU, Medium.DISK)
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", None)
    with pytest.raises(RuntimeError, match="DYN_KVBM_DISK_IO=gds.*not importable"):
        Transfers(disk_io="gds").path(Medium.DISK, Medium.GPU)
    disk.close()


def test_posix_mode_never_probes(monkeypatch, caplog):
    monkeypatch.setattr(gds, "probe_gds", lambda: pytest.fail("probed under DYN_KVBM_DISK_IO=posix"))
    with caplog.at_level(logging.INFO, logger="kvbm.kernels.paths.gpu_disk"):
        path = Transfers(disk_io="posix").path(Medium.GPU, Medium.DISK)
    assert path.mode == "posix" and "DYN_KVBM_DISK_IO=posix" in caplog.text


def test_auto_without_nvidia_fs_is_posix_with_the_reason_logged(monkeypatch, tmp_path, caplog):
    modules = tmp_path / "modules"
    modules.write_text("nvidia 1 0 - Live 0x0\n")
    monkeypatch.setattr(gds, "PROC_MODULES", str(modules))
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", fake_cufile())
    with caplog.at_level(logging.INFO, logger="kvbm.kernels.paths.gpu_disk"):
        path = Transfers(disk_io="auto").path(Medium.GPU, Medium.DISK)
    assert path.mode == "posix" and "compatibility mode" in caplog.text


# ---------------------------------------------------------------------- on a GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("disk_io", ["posix", "auto"])
@pytest.mark.parametrize("preset,geometry", [("vllm_flash_attn_nhd", PADDED), ("kvbm_staging", ALIGNED)])
def test_gpu_disk_round_trip_on_the_gpu(tmp_path, rng, disk_io, preset, geometry):
    transfers = Transfers(disk_io=disk_io, bounce_blocks=4, bounce_chunks=2)
    n = 13
    cpu = allocate(preset, geometry, n, dtype=DT)
    fill(cpu, rng)
    gpu = allocate(preset, geometry, n + 1, dtype=DT, device="cuda")
    for a, b in zip(gpu.tensors, cpu.tensors):
        a[:, :n].copy_(b) if preset.startswith("vllm_flash_attn") else a[:n].copy_(b)
    disk = DiskKVCache(tmp_path, geometry, DT, 2 * n)
    slots = rng.permutation(2 * n)[:n]
    t = transfers.submit(gpu, disk, np.arange(n), slots)
    t.wait()
    assert t.ok, t.reasons
    back = allocate(preset, geometry, n + 1, dtype=DT, device="cuda")
    for x in back.tensors:
        x.view(torch.int16).fill_(POISON)
    flip_byte(disk.file.path, int(slots[4]) * disk.slot_bytes + 1)
    t = transfers.submit(disk, back, np.concatenate([slots, slots[:1]]), np.arange(n + 1))
    t.wait()
    torch.cuda.synchronize()
    host_back = PagedKVCache([x.cpu() for x in back.tensors], back.layout)
    checked = transfers.path(Medium.GPU, Medium.DISK).mode == "posix"  # cuFile-written slots carry no checksum
    for i in range(n + 1):
        want = block_bytes(cpu, i % n)
        if i == 4 and checked:
            assert t.results[i] is BlockStatus.FAILED and "checksum mismatch" in t.reasons[i]
            assert block_bytes(host_back, i) == poison_bytes(geometry)
        elif i != 4:
            assert t.results[i] is BlockStatus.OK and block_bytes(host_back, i) == want, t.reasons
    transfers.close()
    disk.close()


@needs_cuda
def test_gpu_disk_prepare_builds_the_bounce_copies_on_the_gpu(tmp_path, rng, monkeypatch):
    """After `Transfers.prepare` of a GPU cache and a disk cache both ways (POSIX I/O), a round trip through the
    bounce buffers builds no compiled-enqueue launch row (their pairs were built by the preparing), and every block
    comes back byte for byte."""
    from kvbm.kernels import staged_enqueue

    transfers = Transfers(disk_io="posix", bounce_blocks=4, bounce_chunks=2)
    n = 9
    cpu = allocate("vllm_flash_attn_nhd", PADDED, n, dtype=DT)
    fill(cpu, rng)
    gpu = allocate("vllm_flash_attn_nhd", PADDED, n, dtype=DT, device="cuda")
    for a, b in zip(gpu.tensors, cpu.tensors):
        a.copy_(b)
    disk = DiskKVCache(tmp_path, PADDED, DT, 2 * n)
    transfers.prepare(gpu, disk)
    transfers.prepare(disk, gpu)
    built = []
    launch_row = staged_enqueue.launch_row
    monkeypatch.setattr(staged_enqueue, "launch_row", lambda *a: built.append(a) or launch_row(*a))
    slots = rng.permutation(2 * n)[:n]
    t = transfers.submit(gpu, disk, np.arange(n), slots)
    t.wait()
    for x in gpu.tensors:  # read back into the prepared cache, poisoned
        x.view(torch.int16).fill_(POISON)
    r = transfers.submit(disk, gpu, slots, np.arange(n))
    r.wait()
    torch.cuda.synchronize()
    assert t.ok and r.ok, (t.reasons, r.reasons)
    host_back = PagedKVCache([x.cpu() for x in gpu.tensors], gpu.layout)
    assert all(block_bytes(host_back, i) == block_bytes(cpu, i) for i in range(n))
    assert built == []
    transfers.close()
    disk.close()
