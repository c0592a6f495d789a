"""DiskKVCache: its layout (block i = slot i at byte i * slot_bytes, the same layout objects as other caches), its
slot I/O and the per-slot checksums (a flipped byte, two swapped slots, a punched hole or another tag fail the
block, and only it)."""
from __future__ import annotations

import errno
import mmap
import os
import threading

import numpy as np
import pytest
import torch
import xxhash

from disk_faults import flip_byte, punch_hole, rng, swap_ranges  # noqa: F401  (rng is a fixture)

from kvbm.kernels import block_checksums
from kvbm.kernels.bounce import BouncePool, slot_cache
from kvbm.kernels.disk_cache import DiskKVCache, same_slot_layout
from kvbm.kernels.medium import Medium, medium_of
from kvbm.kernels.transfers import checked_ids
from kvbm.layouts import KVGeometry, allocate

ALIGNED = KVGeometry(2, 2, 4, 2, 64, 2)  # 4096-byte blocks: slot = block
PADDED = KVGeometry(3, 2, 4, 2, 40, 2)  # 3840-byte blocks in 4096-byte slots
POISON = 0xA5


def random_slots(rng, n: int, slot_bytes: int) -> np.ndarray:
    """A page-aligned flat buffer of ``n`` slots of random non-zero bytes."""
    buf = np.frombuffer(mmap.mmap(-1, n * slot_bytes), dtype=np.uint8)
    buf[:] = rng.integers(1, 256, buf.size, dtype=np.uint8)
    return buf


def poisoned(n: int, slot_bytes: int) -> np.ndarray:
    buf = np.frombuffer(mmap.mmap(-1, n * slot_bytes), dtype=np.uint8)
    buf[:] = POISON
    return buf


@pytest.fixture
def disk(tmp_path):
    cache = DiskKVCache(tmp_path, PADDED, torch.bfloat16, 12)
    yield cache
    cache.close()


def test_layout_is_block_major_at_the_slot_stride(disk, tmp_path):
    g = PADDED
    assert medium_of(disk) is Medium.DISK and DiskKVCache.medium is Medium.DISK
    assert disk.slot_bytes == 4096 and disk.num_blocks == 12 and disk.dtype == torch.bfloat16
    lay = disk.layout
    assert lay.num_blocks == 12 and lay.geometry == g and lay.dtype == torch.bfloat16
    assert lay.strides == (4096 // 2, g.num_heads * g.head_dim, g.head_dim, 1)
    piece = g.piece_elems
    assert lay.piece_tensor == (0,) * g.num_pieces
    assert lay.piece_offset == tuple(p * piece for p in range(g.num_pieces))
    # the very layout of a bounce chunk of the same geometry: copies between them need no conversion
    storage = torch.zeros(4 * 4096, dtype=torch.uint8)
    assert same_slot_layout(lay, slot_cache(storage, g, torch.bfloat16, 4, 4096).layout)
    dense = allocate("kvbm_staging", ALIGNED, 3, dtype=torch.bfloat16)
    with DiskKVCache(tmp_path, ALIGNED, torch.bfloat16, 2) as aligned:
        assert same_slot_layout(aligned.layout, dense.layout)
        assert not same_slot_layout(aligned.layout, allocate("vllm_flash_attn_nhd", ALIGNED, 3,
                                                              dtype=torch.bfloat16).layout)
        assert not same_slot_layout(aligned.layout, allocate("block_major_head_first", ALIGNED, 3,
                                                              dtype=torch.bfloat16).layout)


def test_checked_ids_accepts_the_disk_cache_and_refuses_mismatches(disk):
    host = allocate("kvbm_staging", PADDED, 4, dtype=torch.bfloat16)
    s, d = checked_ids(host, disk, [0, 3], [11, 0])
    assert s.tolist() == [0, 3] and d.tolist() == [11, 0]
    with pytest.raises(IndexError, match="out of range"):
        checked_ids(host, disk, [0], [12])
    with pytest.raises(ValueError, match="dtype"):
        checked_ids(allocate("kvbm_staging", PADDED, 4, dtype=torch.float16), disk, [0], [0])
    with pytest.raises(ValueError, match="geometry"):
        checked_ids(allocate("kvbm_staging", ALIGNED, 4, dtype=torch.bfloat16), disk, [0], [0])


def test_bad_constructor_arguments(tmp_path):
    with pytest.raises(TypeError, match="KVGeometry"):
        DiskKVCache(tmp_path, (1, 2), torch.bfloat16, 4)
    with pytest.raises(ValueError, match="element size"):
        DiskKVCache(tmp_path, PADDED, torch.float32, 4)
    with pytest.raises(FileNotFoundError):
        DiskKVCache(tmp_path / "missing", PADDED, torch.bfloat16, 4)


def write_some(disk, rng, slots, tags=None) -> np.ndarray:
    src = random_slots(rng, len(slots), disk.slot_bytes)
    assert disk.write_slots(slots, src, list(range(len(slots))), tags) == {}
    return src


def test_round_trip_is_byte_exact_and_block_i_is_at_offset_i_times_slot(disk, rng):
    bb, sb = PADDED.block_bytes, disk.slot_bytes
    slots = [7, 0, 11, 3]
    src = write_some(disk, rng, slots)
    dst = poisoned(4, sb)
    assert disk.read_slots([3, 7, 0, 11], dst, [0, 1, 2, 3]) == {}
    for j, i in enumerate([3, 0, 1, 2]):
        assert dst[j * sb:j * sb + bb].tobytes() == src[i * sb:i * sb + bb].tobytes()
    with open(disk.file.path, "rb") as f:
        for i, s in enumerate(slots):
            f.seek(s * sb)
            assert f.read(bb) == src[i * sb:i * sb + bb].tobytes()


@pytest.mark.parametrize("fault", ["flip", "swap", "hole"])
def test_corrupted_slots_fail_with_checksum_mismatch(disk, rng, fault):
    sb, bb = disk.slot_bytes, PADDED.block_bytes
    slots = list(range(8))
    src = write_some(disk, rng, slots)
    if fault == "flip":
        flip_byte(disk.file.path, 5 * sb + bb - 1)  # the last byte of block 5
        bad = {5}
    elif fault == "swap":
        swap_ranges(disk.file.path, 2 * sb, 6 * sb, sb)
        bad = {2, 6}
    else:
        punch_hole(disk.file.path, 4 * sb, sb)
        bad = {4}
    flip_byte(disk.file.path, 3 * sb + bb + 5)  # padding is not part of the block: slot 3 stays good
    dst = poisoned(8, sb)
    errors = disk.read_slots(slots, dst, slots)
    assert set(errors) == bad
    assert all("checksum mismatch" in r and f"slot {slots[k]}" in r for k, r in errors.items())
    for k in slots:
        if k not in bad:
            assert dst[k * sb:k * sb + bb].tobytes() == src[k * sb:k * sb + bb].tobytes()


def test_a_bad_slot_inside_a_coalesced_run_fails_only_its_block(tmp_path, rng, monkeypatch):
    """Shuffled slot ids coalesce into long runs (one request each), verified on the I/O threads; a corrupted
    slot in the middle of a run fails that block alone, every other block of the run is byte-exact."""
    n = 48
    verified_on: set[str] = set()
    real_verify = DiskKVCache._verify

    def verify(self, *a):
        verified_on.add(threading.current_thread().name)
        return real_verify(self, *a)

    monkeypatch.setattr(DiskKVCache, "_verify", verify)
    with DiskKVCache(tmp_path, PADDED, torch.bfloat16, n) as disk:
        sb, bb = disk.slot_bytes, PADDED.block_bytes
        disk.file._slots_per_request = 8  # runs of 8 slots: several requests, so several I/O threads
        slots = [int(s) for s in rng.permutation(n)]
        tags = [int(t) for t in rng.integers(1, 2**62, n)]
        src = random_slots(rng, n, sb)
        assert disk.write_slots(slots, src, list(range(n)), tags) == {}
        bad_slots = {int(s) for s in rng.choice(np.arange(1, n - 1), 3, replace=False)}
        for s in bad_slots:
            flip_byte(disk.file.path, s * sb + int(rng.integers(0, bb)))
        order = [int(k) for k in rng.permutation(n)]
        dst = poisoned(n, sb)
        errors = disk.read_slots([slots[k] for k in order], dst, list(range(n)), [tags[k] for k in order])
        assert {order[j] for j in errors} == {slots.index(s) for s in bad_slots}
        assert all("checksum mismatch" in r for r in errors.values())
        for j, k in enumerate(order):
            if j not in errors:
                assert dst[j * sb:j * sb + bb].tobytes() == src[k * sb:k * sb + bb].tobytes()
        assert any(name.startswith("kvbm-disk") for name in verified_on)


def test_on_verified_gets_each_requests_intact_blocks_on_its_io_thread(tmp_path, rng):
    """``on_verified`` runs per request, on the request's I/O thread, after its checks: it sees every intact block
    once (position and buffer block) and never a corrupted one; a hook that raises fails exactly the blocks it was
    given, the other requests' blocks stay intact."""
    n = 40
    with DiskKVCache(tmp_path, PADDED, torch.bfloat16, n) as disk:
        sb, bb = disk.slot_bytes, PADDED.block_bytes
        disk.file._slots_per_request = 4
        slots = [int(s) for s in rng.permutation(n)]
        src = random_slots(rng, n, sb)
        assert disk.write_slots(slots, src, list(range(n))) == {}
        bad = int(rng.integers(0, n))
        flip_byte(disk.file.path, slots[bad] * sb + int(rng.integers(0, bb)))
        calls: list[tuple[str, list[tuple[int, int]], list[bytes]]] = []
        lock = threading.Lock()
        dst = poisoned(n, sb)
        blocks = [int(b) for b in rng.permutation(n)]

        def hook(run):
            with lock:  # the bytes as the hook sees them: already read and checked
                rows = [dst[b * sb:b * sb + bb].tobytes() for _, b in run]
                calls.append((threading.current_thread().name, run, rows))

        errors = disk.read_slots(slots, dst, blocks, on_verified=hook)
        assert list(errors) == [bad] and "checksum mismatch" in errors[bad]
        seen = sorted(k for _, run, _ in calls for k, _ in run)
        assert seen == [k for k in range(n) if k != bad]
        assert len(calls) >= n // 4 and all(len(run) <= 4 for _, run, _ in calls)
        assert any(name.startswith("kvbm-disk") for name, _, _ in calls)
        for _, run, seen_bytes in calls:
            for (k, b), got in zip(run, seen_bytes):
                assert b == blocks[k] and got == src[k * sb:k * sb + bb].tobytes()

        doomed: list[int] = []
        trigger = (bad + 1) % n

        def failing(run):
            if any(k == trigger for k, _ in run):
                doomed.extend(k for k, _ in run)
                raise RuntimeError("injected")

        errors = disk.read_slots(slots, poisoned(n, sb), blocks, on_verified=failing)
        want = set(doomed) | {bad}
        assert trigger in doomed and len(doomed) <= 4 and set(errors) == want
        assert all("injected" in errors[k] for k in doomed if k != bad)


def test_prepare_fills_each_requests_blocks_on_its_io_thread_before_the_checksums(tmp_path, rng):
    """``prepare`` runs per request, on the request's I/O thread, before its checksums and write: what it puts in
    the buffer is what is written and summed (reads back verified under the tags); a hook that raises fails
    exactly its request's blocks, whose slots then read back failed, never served."""
    n = 40
    with DiskKVCache(tmp_path, PADDED, torch.bfloat16, n) as disk:
        sb, bb = disk.slot_bytes, PADDED.block_bytes
        disk.file._slots_per_request = 4
        slots = [int(s) for s in rng.permutation(n)]
        blocks = [int(b) for b in rng.permutation(n)]
        tags = [int(t) for t in rng.integers(1, 2**62, n)]
        want = random_slots(rng, n, sb)  # block k's bytes, filled into the buffer only by the hook
        buffer = poisoned(n, sb)
        calls: list[tuple[str, list[tuple[int, int]]]] = []
        lock = threading.Lock()

        def fill(run):
            with lock:
                calls.append((threading.current_thread().name, run))
            for k, b in run:
                assert b == blocks[k]
                buffer[b * sb:(b + 1) * sb] = want[k * sb:(k + 1) * sb]

        assert disk.write_slots(slots, buffer, blocks, tags, prepare=fill) == {}
        assert sorted(k for _, run in calls for k, _ in run) == list(range(n))
        assert len(calls) >= n // 4 and all(len(run) <= 4 for _, run in calls)
        assert all(name.startswith("kvbm-disk") for name, _ in calls)
        dst = poisoned(n, sb)
        assert disk.read_slots(slots, dst, list(range(n)), tags) == {}
        assert all(dst[k * sb:k * sb + bb].tobytes() == want[k * sb:k * sb + bb].tobytes() for k in range(n))

        doomed: list[int] = []
        trigger = int(rng.integers(0, n))

        def failing(run):
            if any(k == trigger for k, _ in run):
                doomed.extend(k for k, _ in run)
                raise RuntimeError("injected")

        errors = disk.write_slots(slots, random_slots(rng, n, sb), blocks, tags, prepare=failing)
        assert trigger in doomed and len(doomed) <= 4 and set(errors) == set(doomed)
        assert all("injected" in errors[k] for k in doomed)
        read = disk.read_slots(slots, poisoned(n, sb), list(range(n)), tags)
        assert set(read) == set(doomed) and all("last write failed" in read[k] for k in doomed)


def test_tags_bind_the_checksum_to_the_block(disk, rng):
    sb, bb = disk.slot_bytes, PADDED.block_bytes
    tags = [2**63 + 5, -7, 0]
    src = write_some(disk, rng, [0, 1, 2], tags)
    dst = poisoned(3, sb)
    assert disk.read_slots([0, 1, 2], dst, [0, 1, 2], tags) == {}
    assert disk.read_slots([0, 1, 2], dst, [0, 1, 2]) == {}  # no tags given: verified under the writer's
    errors = disk.read_slots([0, 1, 2], dst, [0, 1, 2], [tags[0], 8, 0])
    assert list(errors) == [1] and "checksum mismatch" in errors[1] and "tag" in errors[1]
    assert dst[:bb].tobytes() == src[:bb].tobytes()
    # the same bytes written without a tag are not the block of a tag
    write_some(disk, rng, [4])
    assert "checksum mismatch" in disk.read_slots([4], dst, [0], [1])[0]


@pytest.mark.parametrize("written_by", ["compiled", "fallback"])
def test_recorded_sums_are_xxh3_of_the_block_bytes_however_computed(disk, rng, monkeypatch, written_by):
    """A slot's recorded sum is python-xxhash's xxh3-64 of its block bytes (padding excluded) under its tag's seed,
    whether the compiled loop or the fallback computed it: either one verifies the other's writes."""
    sb, bb = disk.slot_bytes, PADDED.block_bytes
    slots = [5, 0, 9, 3]
    tags = [int(t) for t in rng.integers(1, 2**63, 4)]
    tags[1] |= 1 << 63
    no_library = lambda: None  # noqa: E731
    if written_by == "fallback":
        monkeypatch.setattr(block_checksums, "_library_hash", no_library)
    src = random_slots(rng, 4, sb)
    assert disk.write_slots(slots, src, [0, 1, 2, 3], tags) == {}
    for k, s in enumerate(slots):
        block = src[k * sb:(k + 1) * sb]
        assert int(disk._sums[s]) == xxhash.xxh3_64_intdigest(block[:bb].tobytes(), seed=disk._seed(tags[k]))
        assert disk.checksum(block, tags[k]) == int(disk._sums[s])
    monkeypatch.undo()
    if written_by == "compiled":
        monkeypatch.setattr(block_checksums, "_library_hash", no_library)
    flip_byte(disk.file.path, 9 * sb + int(rng.integers(0, bb)))
    dst = poisoned(4, sb)
    errors = disk.read_slots(slots, dst, [0, 1, 2, 3], tags)
    assert list(errors) == [2] and "checksum mismatch in slot 9" in errors[2]
    for k in (0, 1, 3):
        assert dst[k * sb:k * sb + bb].tobytes() == src[k * sb:k * sb + bb].tobytes()


def test_failed_write_makes_the_slot_unreadable_until_rewritten(disk, rng, monkeypatch):
    sb = disk.slot_bytes
    write_some(disk, rng, [1, 2])
    real = os.pwritev

    def failing(fd, bufs, offset):
        if offset <= 2 * sb < offset + sum(len(b) for b in bufs):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", failing)
    src = random_slots(rng, 2, sb)
    errors = disk.write_slots([1, 2], src, [0, 1])
    assert list(errors) == [1] and "Input/output error" in errors[1] and errors[1].startswith("disk write failed")
    monkeypatch.undo()
    dst = poisoned(2, sb)
    errors = disk.read_slots([1, 2], dst, [0, 1])
    assert list(errors) == [1] and "last write failed" in errors[1]
    assert dst[:PADDED.block_bytes].tobytes() == src[:PADDED.block_bytes].tobytes()
    write_some(disk, rng, [2])
    assert disk.read_slots([2], dst, [0]) == {}


def test_unverified_slots_and_forget(disk, rng):
    sb = disk.slot_bytes
    dst = poisoned(1, sb)
    assert disk.read_slots([9], dst, [0]) == {}  # never written: zeros, nothing to verify against
    write_some(disk, rng, [9])
    flip_byte(disk.file.path, 9 * sb)
    disk.forget([9])  # written by cuFile: bytes unknown to the host, read unverified
    assert disk.read_slots([9], dst, [0]) == {}
    disk.forget([9], failed=True)
    assert "last write failed" in disk.read_slots([9], dst, [0])[0]


def test_bounce_pool_lends_each_chunk_once():
    pool = BouncePool(PADDED, torch.bfloat16, 4096, 2, 3)
    a, b = pool.acquire(), pool.acquire()
    assert pool.acquire() is None and pool.num_free() == 0
    assert {a.index, b.index} == {0, 1} and sorted(a.ids.tolist() + b.ids.tolist()) == list(range(6))
    assert a.cache is pool.cache and pool.cache.num_blocks == 6 and pool.array.size >= 6 * 4096
    a.release()
    with pytest.raises(ValueError, match="not lent"):
        a.release()
    assert pool.acquire().index == a.index
    pool.close()
    with pytest.raises(ValueError, match="multiple of 4096"):
        BouncePool(PADDED, torch.bfloat16, 4000, 1, 1)
