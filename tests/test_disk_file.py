"""DiskBlockFile: byte-exact slot I/O on real files, coalescing, O_DIRECT on/off, and per-slot failure reporting.

Fault sources: ENOSPC comes from a real 1 MiB tmpfs mounted for the test (root only; skipped otherwise), truncation
and deletion act on the real file, EBADF on the real descriptor; only EIO is injected (a wrapper around
os.preadv / os.pwritev), because a failing disk sector cannot be produced on demand.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from disk_faults import fill_filesystem, rng, tiny_fs  # noqa: F401  (rng and tiny_fs are fixtures)

from kvbm.kernels import disk_file
from kvbm.kernels.disk_file import ALIGNMENT, DiskBlockFile, SlotIOResult, align_up, plan_requests, slots_per_request

POISON = 0xA5


def random_buffer(rng: np.random.Generator, nbytes: int) -> mmap.mmap:
    """A page-aligned anonymous mapping filled with random bytes."""
    buf = mmap.mmap(-1, nbytes)
    buf[:] = rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    return buf


def poisoned_buffer(nbytes: int) -> mmap.mmap:
    """A page-aligned anonymous mapping filled with a poison byte pattern."""
    buf = mmap.mmap(-1, nbytes)
    buf[:] = bytes([POISON]) * nbytes
    return buf


def block(buf: mmap.mmap, i: int, slot_bytes: int) -> bytes:
    """Bytes of block ``i`` of a buffer."""
    return buf[i * slot_bytes : (i + 1) * slot_bytes]


@pytest.mark.parametrize("o_direct", [True, False])
def test_random_slots_round_trip(tmp_path, rng, o_direct):
    num_slots, slot_bytes = 64, 3 * 4096 + 123
    with DiskBlockFile(tmp_path, num_slots, slot_bytes, use_o_direct=o_direct) as f:
        assert f.slot_bytes == align_up(slot_bytes) == 4 * 4096
        assert f.o_direct is o_direct
        assert os.path.getsize(f.path) == num_slots * f.slot_bytes
        slots = [int(s) for s in rng.choice(num_slots, size=40, replace=False)]
        src = random_buffer(rng, len(slots) * f.slot_bytes)
        assert f.write_slots(slots, src).all_ok
        # read back in another order into other buffer blocks
        order = rng.permutation(len(slots))
        dst = poisoned_buffer(len(slots) * f.slot_bytes)
        result = f.read_slots([slots[i] for i in order], dst, buf_blocks=list(range(len(slots))))
        assert result.all_ok and result.ok == [True] * len(slots)
        for j, i in enumerate(order):
            assert block(dst, j, f.slot_bytes) == block(src, i, f.slot_bytes)


def test_gather_write_from_buffer_blocks_and_numpy_buffers(tmp_path, rng):
    with DiskBlockFile(tmp_path, 16, 8192) as f:
        pool = random_buffer(rng, 10 * f.slot_bytes)
        pool_arr = np.frombuffer(pool, dtype=np.uint8).reshape(10, f.slot_bytes)  # 2-D view is accepted too
        assert f.write_slots([7, 2, 9], pool_arr, buf_blocks=[4, 0, 4]).all_ok
        dst = poisoned_buffer(3 * f.slot_bytes)
        assert f.read_slots([2, 9, 7], dst).all_ok
        assert block(dst, 0, f.slot_bytes) == block(pool, 0, f.slot_bytes)
        assert block(dst, 1, f.slot_bytes) == block(pool, 4, f.slot_bytes)
        assert block(dst, 2, f.slot_bytes) == block(pool, 4, f.slot_bytes)


def test_consecutive_slots_are_coalesced_and_split(tmp_path, rng, monkeypatch):
    calls: list[tuple[str, int, int]] = []
    real_pwritev, real_preadv = os.pwritev, os.preadv

    def pwritev(fd, bufs, offset):
        calls.append(("w", offset, len(bufs)))
        return real_pwritev(fd, bufs, offset)

    def preadv(fd, bufs, offset):
        calls.append(("r", offset, len(bufs)))
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "preadv", preadv)
    with DiskBlockFile(tmp_path, 32, 4096, max_io_bytes=3 * 4096) as f:
        slots = [20, 5, 3, 10, 4, 6, 11]  # runs 3-6 (split 3+1 by max_io_bytes), 10-11, 20
        src = random_buffer(rng, len(slots) * 4096)
        assert f.write_slots(slots, src).all_ok
        assert sorted(calls) == [("w", 3 * 4096, 3), ("w", 6 * 4096, 1), ("w", 10 * 4096, 2), ("w", 20 * 4096, 1)]
        calls.clear()
        dst = poisoned_buffer(len(slots) * 4096)
        assert f.read_slots(slots, dst).all_ok
        assert sorted(calls) == [("r", 3 * 4096, 3), ("r", 6 * 4096, 1), ("r", 10 * 4096, 2), ("r", 20 * 4096, 1)]
        assert dst[:] == src[:]


def test_requests_are_planned_from_sorted_consecutive_slots_and_bad_sizes_are_refused():
    """Pairs in any order become requests of consecutive slots, each at most ``per_request`` long, buffer blocks
    kept with their slots."""
    pairs = [(9, 0), (3, 1), (4, 2), (5, 3), (11, 4), (10, 5), (6, 6)]
    assert plan_requests(pairs, 3) == [[(3, 1), (4, 2), (5, 3)], [(6, 6)], [(9, 0), (10, 5), (11, 4)]]
    assert plan_requests(pairs, 1) == [[p] for p in sorted(pairs)] and plan_requests([], 4) == []
    assert slots_per_request(4096, 4 << 20) == 1024 and slots_per_request(8 << 20, 4 << 20) == 1
    for bad in ((0, 4096), (4096, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            slots_per_request(*bad)
    with pytest.raises(ValueError, match="per_request must be >= 1"):
        plan_requests(pairs, 0)


def test_adjacent_buffer_blocks_of_a_run_are_one_buffer(tmp_path, rng, monkeypatch):
    calls: list[tuple[int, list[int]]] = []
    real_preadv = os.preadv

    def preadv(fd, bufs, offset):
        calls.append((offset, [len(b) for b in bufs]))
        return real_preadv(fd, bufs, offset)

    with DiskBlockFile(tmp_path, 16, 4096) as f:
        src = random_buffer(rng, 16 * 4096)
        assert f.write_slots(range(16), src).all_ok
        monkeypatch.setattr(os, "preadv", preadv)
        dst = poisoned_buffer(16 * 4096)
        # slots 2-7 into buffer blocks 9, 10, 11, 3, 4, 0: three stretches of adjacent blocks, one call
        assert f.read_slots([2, 3, 4, 5, 6, 7], dst, buf_blocks=[9, 10, 11, 3, 4, 0]).all_ok
        assert calls == [(2 * 4096, [3 * 4096, 2 * 4096, 4096])]
        for s, b in zip([2, 3, 4, 5, 6, 7], [9, 10, 11, 3, 4, 0]):
            assert block(dst, b, 4096) == block(src, s, 4096)


@pytest.mark.parametrize("max_io_slots", [1, 3, 64])
def test_hooks_see_every_slot_once_on_the_request_thread(tmp_path, rng, max_io_slots):
    num_slots, sb = 96, 8192
    with DiskBlockFile(tmp_path, num_slots, sb, max_io_bytes=max_io_slots * sb, io_threads=4) as f:
        slots = [int(s) for s in rng.permutation(num_slots)[:70]]  # shuffled: runs of all lengths
        blocks = [int(b) for b in rng.permutation(80)[:70]]
        src = random_buffer(rng, 80 * sb)
        seen: list[tuple[int, int]] = []
        threads: set[str] = set()
        lock = threading.Lock()

        def hook(run):
            with lock:
                seen.extend(run)
                threads.add(threading.current_thread().name)
            ids = [s for s, _ in run]
            assert ids == list(range(ids[0], ids[0] + len(ids))) and len(ids) <= max_io_slots  # one coalesced run

        assert f.write_slots(slots, src, buf_blocks=blocks, before_write=hook).all_ok
        assert sorted(seen) == sorted(zip(slots, blocks))
        seen.clear()
        dst = poisoned_buffer(80 * sb)
        order = rng.permutation(70)
        assert f.read_slots([slots[i] for i in order], dst, buf_blocks=[blocks[i] for i in order],
                            on_read=hook).all_ok
        assert sorted(seen) == sorted(zip(slots, blocks))
        assert all(block(dst, b, sb) == block(src, b, sb) for b in blocks)
        if max_io_slots < 64:  # several requests: the hooks ran on the I/O threads
            assert any(t.startswith("kvbm-disk") for t in threads)


def test_a_hook_that_raises_fails_only_its_request(tmp_path, rng):
    with DiskBlockFile(tmp_path, 32, 4096, max_io_bytes=4 * 4096) as f:
        src = random_buffer(rng, 32 * 4096)
        assert f.write_slots(range(32), src).all_ok
        dst = poisoned_buffer(32 * 4096)

        def on_read(run):
            if any(s == 9 for s, _ in run):
                raise RuntimeError("verification broke")

        slots = [int(s) for s in rng.permutation(32)]
        result = f.read_slots(slots, dst, buf_blocks=slots, on_read=on_read)
        assert sorted(result.errors) == [8, 9, 10, 11]  # the request of slots 8-11
        assert all("on_read hook failed" in str(e) and "verification broke" in str(e) for e in result.errors.values())
        assert all(block(dst, s, 4096) == block(src, s, 4096) for s in range(32) if not 8 <= s <= 11)
        other = random_buffer(rng, 32 * 4096)

        def before_write(run):
            if any(s == 21 for s, _ in run):
                raise RuntimeError("checksum broke")

        result = f.write_slots(range(32), other, before_write=before_write)
        assert sorted(result.errors) == [20, 21, 22, 23]  # never written: the file keeps the old bytes there
        back = poisoned_buffer(32 * 4096)
        assert f.read_slots(range(32), back).all_ok
        for s in range(32):
            assert block(back, s, 4096) == block(src if 20 <= s <= 23 else other, s, 4096)


def test_requests_of_one_batch_run_in_parallel(tmp_path, rng, monkeypatch):
    barrier = threading.Barrier(2, timeout=10)
    threads: set[str] = set()
    real_preadv = os.preadv

    def preadv(fd, bufs, offset):
        threads.add(threading.current_thread().name)
        if offset in (0, 2 * 4096):  # the first two requests wait for each other: only threads can pass
            barrier.wait()
        return real_preadv(fd, bufs, offset)

    with DiskBlockFile(tmp_path, 8, 4096, io_threads=2) as f:
        src = random_buffer(rng, 8 * 4096)
        assert f.write_slots(range(8), src).all_ok
        monkeypatch.setattr(os, "preadv", preadv)
        dst = poisoned_buffer(8 * 4096)
        assert f.read_slots([0, 2, 4, 6], dst).all_ok  # four separate runs
        assert len(threads) == 2
        for i, s in enumerate([0, 2, 4, 6]):
            assert block(dst, i, 4096) == block(src, s, 4096)


def test_a_batch_of_many_requests_is_one_task_per_io_thread(tmp_path, rng, monkeypatch):
    """Each I/O thread takes the batch's next request until none is left: a batch of 20 requests on 3 threads is
    3 pool tasks, every request done once and byte-exact, and a slow request does not hold up the others."""
    with DiskBlockFile(tmp_path, 40, 4096, io_threads=3) as f:
        src = random_buffer(rng, 40 * 4096)
        assert f.write_slots(range(40), src).all_ok
        tasks = []
        real_submit = f._pool.submit
        monkeypatch.setattr(f._pool, "submit", lambda *a: tasks.append(a) or real_submit(*a))
        real_preadv = os.preadv
        done_by: dict[int, str] = {}
        release = threading.Event()

        def preadv(fd, bufs, offset):
            if offset == 0:  # the first request waits until the others are done
                assert release.wait(10)
            n = real_preadv(fd, bufs, offset)
            done_by[offset // 4096] = threading.current_thread().name
            if len(done_by) == 19:
                release.set()
            return n

        monkeypatch.setattr(os, "preadv", preadv)
        slots = list(range(0, 40, 2))  # 20 separate runs
        dst = poisoned_buffer(20 * 4096)
        assert f.read_slots(slots, dst).all_ok
        assert len(tasks) == 3 and sorted(done_by) == slots
        assert all(block(dst, i, 4096) == block(src, s, 4096) for i, s in enumerate(slots))


def test_concurrent_batches_share_the_files_io_threads(tmp_path, rng, monkeypatch):
    """Two batches read at once from two threads run at most ``io_threads`` requests at a time between them (the
    raw rows of the G3 bench keep as many in flight), every byte right."""
    with DiskBlockFile(tmp_path, 64, 4096, io_threads=3) as f:
        assert f.io_threads == 3
        src = random_buffer(rng, 64 * 4096)
        assert f.write_slots(range(64), src).all_ok
        real_preadv = os.preadv
        lock = threading.Lock()
        now, most = [0], [0]

        def preadv(fd, bufs, offset):
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
            try:
                time.sleep(0.002)  # long enough for the other batch's requests to pile up if they could
                return real_preadv(fd, bufs, offset)
            finally:
                with lock:
                    now[0] -= 1

        monkeypatch.setattr(os, "preadv", preadv)
        halves = [list(range(0, 64, 4)), list(range(2, 64, 4))]  # 16 separate runs each
        dsts = [poisoned_buffer(16 * 4096) for _ in halves]
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda k: f.read_slots(halves[k], dsts[k]), range(2)))
        assert all(r.all_ok for r in results)
        assert most[0] == 3
        for slots, dst in zip(halves, dsts):
            assert all(block(dst, i, 4096) == block(src, s, 4096) for i, s in enumerate(slots))


def test_o_direct_refused_falls_back_with_warning(tmp_path, rng, monkeypatch, caplog):
    real_fcntl = fcntl.fcntl

    def fcntl_refusing_direct(fd, cmd, *args):
        if cmd == fcntl.F_SETFL and args and args[0] & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, *args)

    monkeypatch.setattr(fcntl, "fcntl", fcntl_refusing_direct)
    with caplog.at_level(logging.WARNING, logger="kvbm.kernels.disk_file"):
        f = DiskBlockFile(tmp_path, 4, 4096)
    assert "refuses O_DIRECT" in caplog.text
    with f:
        assert not f.o_direct
        src = random_buffer(rng, 4 * 4096)
        assert f.write_slots([3, 1], src).all_ok
        dst = poisoned_buffer(2 * 4096)
        assert f.read_slots([1, 3], dst).all_ok
        assert block(dst, 0, 4096) == block(src, 1, 4096) and block(dst, 1, 4096) == block(src, 0, 4096)


def test_alignment_is_required_with_o_direct_only(tmp_path, rng):
    src = random_buffer(rng, 3 * 4096)
    misaligned = memoryview(src)[512 : 512 + 2 * 4096]
    with DiskBlockFile(tmp_path, 4, 4096) as f:
        with pytest.raises(ValueError, match="aligned"):
            f.write_slots([0, 1], misaligned)
    with DiskBlockFile(tmp_path, 4, 4096, use_o_direct=False) as f:
        payload = bytes(misaligned)
        assert f.write_slots([0, 1], payload).all_ok
        dst = bytearray([POISON]) * (2 * 4096)
        assert f.read_slots([0, 1], dst).all_ok
        assert bytes(dst) == payload


def test_bad_arguments_raise_clear_errors(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiskBlockFile(tmp_path / "missing", 4, 4096)
    (tmp_path / "plain").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        DiskBlockFile(tmp_path / "plain", 4, 4096)
    with pytest.raises(ValueError, match="slot_bytes must be > 0"):
        DiskBlockFile(tmp_path, 4, 0)
    with pytest.raises(TypeError, match="num_slots must be an int"):
        DiskBlockFile(tmp_path, True, 4096)
    f = DiskBlockFile(tmp_path, 4, 4096)
    buf = random_buffer(rng, 4 * 4096)
    with pytest.raises(ValueError, match="out of range"):
        f.write_slots([4], buf)
    with pytest.raises(ValueError, match="distinct"):
        f.write_slots([1, 1], buf)
    with pytest.raises(ValueError, match="distinct"):
        f.read_slots([0, 1], buf, buf_blocks=[2, 2])
    with pytest.raises(ValueError, match="need"):
        f.read_slots([0, 1], memoryview(buf)[:4096])
    with pytest.raises(TypeError, match="writable"):
        f.read_slots([0], bytes(4096))
    with pytest.raises(TypeError, match="buffer protocol"):
        f.write_slots([0], [0] * 4096)
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.read_slots([0], buf)


@pytest.fixture
def named(monkeypatch):
    """Files get a name in the directory (as on filesystems without O_TMPFILE)."""
    monkeypatch.setattr(disk_file, "O_TMPFILE", 0)


def cache_files(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("kvbm-g3-"))


def test_close_removes_file_and_is_idempotent(tmp_path, named):
    with DiskBlockFile(tmp_path, 2, 4096) as f:
        path = f.path
        assert os.path.exists(path) and os.path.dirname(path) == str(tmp_path)
        assert f.name == os.path.basename(path) and f.name.startswith(f"kvbm-g3-{os.getpid()}-")
    assert not os.path.exists(path) and f.closed
    f.close()
    g = DiskBlockFile(tmp_path, 2, 4096)
    g.close(remove=False)
    assert os.path.getsize(g.path) == 2 * 4096
    assert DiskBlockFile(tmp_path, 2, 4096).path != g.path  # unique names


@pytest.mark.skipif(not disk_file.O_TMPFILE, reason="no O_TMPFILE on this platform")
def test_unnamed_file_leaves_nothing_in_the_directory(tmp_path, rng):
    with DiskBlockFile(tmp_path, 4, 4096) as f:
        if f.name is not None:
            pytest.skip("this filesystem has no O_TMPFILE")
        assert cache_files(tmp_path) == [] and os.path.getsize(f.path) == 4 * 4096
        src = random_buffer(rng, 4 * 4096)
        assert f.write_slots(range(4), src).all_ok
        dst = poisoned_buffer(4 * 4096)
        assert f.read_slots(range(4), dst).all_ok and dst[:] == src[:]
    assert cache_files(tmp_path) == []
    g = DiskBlockFile(tmp_path, 2, 4096)
    g.close(remove=False)  # kept: it gets a name
    assert cache_files(tmp_path) == [os.path.basename(g.path)] and os.path.getsize(g.path) == 2 * 4096


def no_fallocate(fd: int, offset: int, length: int) -> None:
    """Stands in for os.posix_fallocate on a filesystem without fallocate support."""
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")


def test_fallocate_unsupported(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
    with pytest.raises(OSError, match="DYN_KVBM_DISK_ZEROFILL_FALLBACK"):
        DiskBlockFile(tmp_path, 8, 4096)
    assert list(tmp_path.iterdir()) == []  # the failed file was removed
    with DiskBlockFile(tmp_path, 8, 4096, zerofill_fallback=True) as f:
        assert f.preallocated_by == "zerofill"
        st = os.stat(f.path)
        assert st.st_size == 8 * 4096 and st.st_blocks * 512 >= 8 * 4096
        src = random_buffer(rng, 8 * 4096)
        assert f.write_slots(range(8), src).all_ok
        dst = poisoned_buffer(8 * 4096)
        assert f.read_slots(range(8), dst).all_ok and dst[:] == src[:]


@pytest.mark.parametrize("zerofill", [False, True])
def test_file_larger_than_disk_is_refused(tiny_fs, monkeypatch, zerofill):
    if zerofill:  # the zero-filling path must run out of space just as clearly
        monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
    with pytest.raises(OSError, match="needs 4194304 bytes") as info:
        DiskBlockFile(tiny_fs, 1024, 4096, zerofill_fallback=zerofill)
    assert info.value.errno == errno.ENOSPC
    assert list(tiny_fs.iterdir()) == []


@pytest.mark.parametrize("o_direct", [True, False])
def test_disk_full_fails_only_the_slots_without_space(tiny_fs, rng, o_direct):
    sb = 4096
    with DiskBlockFile(tiny_fs, 32, sb, use_o_direct=o_direct) as f:
        src = random_buffer(rng, 32 * sb)
        assert f.write_slots(range(8), src).all_ok
        # Space of slots 8.. is released and taken by another file: their writes now need space that is gone.
        os.truncate(f.path, 8 * sb)
        filler = fill_filesystem(tiny_fs)
        slots = [2] + list(range(8, 16))
        result = f.write_slots(slots, src, buf_blocks=slots)
        assert result.ok[0] and 8 in result.errors
        assert all(e.errno == errno.ENOSPC for e in result.errors.values())
        ok_slots = [s for s, ok in zip(slots, result.ok) if ok]
        dst = poisoned_buffer(32 * sb)
        assert f.read_slots(ok_slots, dst, buf_blocks=ok_slots).all_ok
        for s in ok_slots:
            assert block(dst, s, sb) == block(src, s, sb)
        # once space is back, the failed slots can be written and everything reads back exact
        os.unlink(filler)
        assert f.write_slots(result.failed_slots, src, buf_blocks=result.failed_slots).all_ok
        dst = poisoned_buffer(32 * sb)
        assert f.read_slots(range(16), dst).all_ok
        assert dst[: 16 * sb] == src[: 16 * sb]


@pytest.mark.parametrize("o_direct", [True, False])
def test_truncated_file_fails_slots_past_the_end(tmp_path, rng, o_direct):
    sb = 8192
    with DiskBlockFile(tmp_path, 16, sb, use_o_direct=o_direct) as f:
        src = random_buffer(rng, 16 * sb)
        assert f.write_slots(range(16), src).all_ok
        os.truncate(f.path, 5 * sb + 100)  # slot 5 now ends early, slots 6.. are gone
        dst = poisoned_buffer(16 * sb)
        result = f.read_slots(range(16), dst)
        assert result.failed_slots == list(range(5, 16))
        assert all(result.errors[s].errno == errno.ENODATA for s in range(5, 16))
        assert dst[: 5 * sb] == src[: 5 * sb]
        assert dst[5 * sb :] == bytes([POISON]) * (11 * sb)  # no partial bytes of slot 5 handed over
        # later operations still work: rewriting lost slots, reading the intact ones
        assert f.write_slots([12, 5], src, buf_blocks=[12, 5]).all_ok
        dst = poisoned_buffer(16 * sb)
        assert f.read_slots([0, 4, 5, 12], dst, buf_blocks=[0, 4, 5, 12]).all_ok
        for s in (0, 4, 5, 12):
            assert block(dst, s, sb) == block(src, s, sb)
        # slot 6 now lies inside the file again, in a hole that would read as zeros: it must still fail
        result = f.read_slots([6, 13], dst)
        assert result.failed_slots == [6, 13] and result.errors[6].errno == errno.ENODATA


@pytest.mark.parametrize("o_direct", [True, False])
def test_truncation_during_a_read_is_a_short_read_failure(tmp_path, rng, monkeypatch, o_direct):
    sb = 8192
    with DiskBlockFile(tmp_path, 16, sb, use_o_direct=o_direct) as f:
        src = random_buffer(rng, 16 * sb)
        assert f.write_slots(range(16), src).all_ok
        real_preadv = os.preadv
        truncated = []

        def preadv_after_truncation(fd, bufs, offset):
            if not truncated:  # the file shrinks while the batch is in flight
                os.truncate(f.path, 9 * sb + 4096)
                truncated.append(True)
            return real_preadv(fd, bufs, offset)

        monkeypatch.setattr(os, "preadv", preadv_after_truncation)
        dst = poisoned_buffer(16 * sb)
        result = f.read_slots(range(16), dst)
        assert result.failed_slots == list(range(9, 16))
        assert "short read" in str(result.errors[9]) and result.errors[9].errno == errno.ENODATA
        assert dst[: 9 * sb] == src[: 9 * sb]


def test_deleted_file_fails_every_slot(tmp_path, rng, named, caplog):
    f = DiskBlockFile(tmp_path, 8, 4096)
    src = random_buffer(rng, 8 * 4096)
    assert f.write_slots(range(8), src).all_ok
    os.unlink(f.path)
    dst = poisoned_buffer(8 * 4096)
    with caplog.at_level(logging.WARNING, logger="kvbm.kernels.disk_file"):
        result = f.read_slots(range(8), dst)
        writes = f.write_slots([0, 1], src)
    assert result.failed_slots == list(range(8))
    assert all(e.errno == errno.ENOENT and "was deleted" in str(e) for e in result.errors.values())
    assert dst[:] == bytes([POISON]) * (8 * 4096)
    assert writes.failed_slots == [0, 1] and "was deleted" in str(writes.errors[0])
    deleted = [r for r in caplog.records if "was deleted" in r.getMessage()]
    assert len(deleted) == 1 and deleted[0].levelno == logging.WARNING
    f.close()  # the file is already gone: closing still succeeds
    assert f.closed


def test_closed_descriptor_fails_every_slot(tmp_path, rng):
    f = DiskBlockFile(tmp_path, 8, 4096)
    src = random_buffer(rng, 8 * 4096)
    os.close(f.fileno())  # someone closed our descriptor
    result = f.write_slots([1, 2, 5], src)
    assert result.failed_slots == [1, 2, 5] and result.errors[5].errno == errno.EBADF
    f.close()
    assert not os.path.exists(f.path)


@pytest.mark.parametrize("reading", [True, False])
def test_io_error_fails_only_the_bad_slot_of_a_coalesced_run(tmp_path, rng, monkeypatch, reading):
    sb = 4096
    bad = 7 * sb
    name = "preadv" if reading else "pwritev"
    real = getattr(os, name)

    def failing(fd, bufs, offset):  # an unreadable/unwritable sector inside slot 7
        if offset <= bad < offset + sum(len(b) for b in bufs):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, offset)

    with DiskBlockFile(tmp_path, 16, sb) as f:
        src = random_buffer(rng, 16 * sb)
        if reading:
            assert f.write_slots(range(16), src).all_ok
        monkeypatch.setattr(os, name, failing)
        dst = poisoned_buffer(16 * sb)
        result = f.read_slots(range(16), dst) if reading else f.write_slots(range(16), src)
        assert result.failed_slots == [7] and result.errors[7].errno == errno.EIO
        assert result.ok == [s != 7 for s in range(16)]
        monkeypatch.undo()
        # the fault is gone: the same file serves every slot again
        if not reading:
            assert f.write_slots([7], src, buf_blocks=[7]).all_ok
        dst = poisoned_buffer(16 * sb)
        assert f.read_slots(range(16), dst).all_ok and dst[:] == src[:]


def test_result_object():
    r = SlotIOResult([4, 2, 9], {2: OSError(errno.EIO, "x")})
    assert r.ok == [True, False, True] and r.failed_slots == [2] and not r.all_ok
    assert SlotIOResult([1]).all_ok and ALIGNMENT == 4096


@pytest.mark.parametrize("o_direct", [True, False])
def test_concurrent_batches_after_truncation_keep_rewritten_slots(tmp_path, rng, monkeypatch, o_direct):
    """Two batches at once after a truncation: one has seen the file's size but not yet marked slots lost while the
    other rewrites slots past the cut. The rewritten slots must stay readable (the late mark must not cover them)."""
    sb = 4096
    with DiskBlockFile(tmp_path, 32, sb, use_o_direct=o_direct) as f:
        src = random_buffer(rng, 32 * sb)
        assert f.write_slots(range(32), src).all_ok
        os.truncate(f.path, 8 * sb)
        real_fstat, size_seen, go = os.fstat, threading.Event(), threading.Event()

        def fstat_that_stalls_in_the_late_batch(fd):
            st = real_fstat(fd)
            if threading.current_thread().name == "late" and not size_seen.is_set():
                size_seen.set()  # the size is seen; the slots past it are marked once `go` is set
                go.wait(10)
            return st

        monkeypatch.setattr(os, "fstat", fstat_that_stalls_in_the_late_batch)
        results = {}
        late = threading.Thread(name="late", target=lambda: results.setdefault(
            "late", f.write_slots([20], src, buf_blocks=[20])))
        late.start()
        assert size_seen.wait(10)
        rewrite = threading.Thread(target=lambda: results.setdefault(
            "rewrite", f.write_slots(range(8, 12), src, buf_blocks=range(8, 12))))
        rewrite.start()
        rewrite.join(0.5)  # without ordering, the rewrite finishes here, before the late batch marks slots lost
        go.set()
        late.join(10)
        rewrite.join(10)
        assert results["late"].all_ok and results["rewrite"].all_ok
        dst = poisoned_buffer(32 * sb)
        slots = [0, 7, 8, 9, 10, 11, 20]
        assert f.read_slots(slots, dst, buf_blocks=slots).all_ok
        for s in slots:
            assert block(dst, s, sb) == block(src, s, sb)


# ---------------------------------------------------------------------- the file's safety


@pytest.mark.parametrize("mode,ok", [(0o777, False), (0o1777, True), (0o775, True), (0o700, True)])
def test_world_writable_directory_without_sticky_bit_is_refused(tmp_path, mode, ok):
    d = tmp_path / "cache"
    d.mkdir()
    os.chmod(d, mode)
    if ok:
        DiskBlockFile(d, 1, 4096).close()
        return
    with pytest.raises(PermissionError, match="world-writable without the sticky bit"):
        DiskBlockFile(d, 1, 4096)
    assert cache_files(d) == []


@pytest.mark.parametrize("naming", ["unnamed", "named"])
def test_name_swapped_for_a_symlink_after_creation_is_not_followed(tmp_path, rng, monkeypatch, naming):
    """Another user replaces the cache file's name with a symlink to a victim file between its creation and its
    use: the cache keeps using the file it created, the victim is never written, and close leaves the link."""
    if naming == "named":
        monkeypatch.setattr(disk_file, "O_TMPFILE", 0)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 2048)
    real_fallocate = os.posix_fallocate

    def swap_then_fallocate(fd, offset, length):
        for name in cache_files(tmp_path):
            os.replace(tmp_path / name, tmp_path / "moved-away")
            os.symlink(victim, tmp_path / name)
        return real_fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", swap_then_fallocate)
    f = DiskBlockFile(tmp_path, 4, 4096)
    src = random_buffer(rng, 4 * 4096)
    assert f.write_slots(range(4), src).all_ok
    dst = poisoned_buffer(4 * 4096)
    assert f.read_slots(range(4), dst).all_ok and dst[:] == src[:]
    f.close()
    assert victim.read_bytes() == b"precious" * 2048


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_files_of_dead_processes_are_reclaimed(tmp_path, named, caplog):
    live = DiskBlockFile(tmp_path, 2, 4096)  # locked by a live owner (this process)
    stale = tmp_path / f"kvbm-g3-{dead_pid()}-0123456789ab.blocks"
    stale.write_bytes(bytes(8192))
    old_style = tmp_path / "kvbm-g3-k2j3h4g5.blocks"  # unlocked, no pid: left by a crashed older version
    old_style.write_bytes(bytes(4096))
    other = tmp_path / "kvbm-g3-notes.txt"
    other.write_text("not a cache file")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / f"kvbm-g3-{dead_pid()}-ffffffffffff.blocks"
    os.symlink(victim, link)
    with caplog.at_level(logging.WARNING, logger="kvbm.kernels.disk_file"):
        new = DiskBlockFile(tmp_path, 1, 4096)
    assert not stale.exists() and not old_style.exists()
    assert os.path.exists(live.path) and other.exists() and victim.read_text() == "keep" and link.is_symlink()
    assert "removed stale disk cache file" in caplog.text
    live.close()
    new.close()


def test_file_of_a_live_process_with_a_lock_is_kept_even_under_our_pid(tmp_path, named):
    mine = tmp_path / f"kvbm-g3-{os.getpid()}-000000000000.blocks"
    mine.write_bytes(bytes(4096))
    fd = os.open(mine, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        DiskBlockFile(tmp_path, 1, 4096).close()
        assert mine.exists()
    finally:
        os.close(fd)
    DiskBlockFile(tmp_path, 1, 4096).close()
    assert not mine.exists()  # unlocked and named with our own pid: not ours, a leftover


@pytest.mark.parametrize("naming", ["unnamed", "named"])
def test_kill_9_leaves_nothing_or_a_file_the_next_start_reclaims(tmp_path, naming):
    script = (
        "import os, signal\n"
        "from kvbm.kernels import disk_file\n"
        + ("disk_file.O_TMPFILE = 0\n" if naming == "named" else "")
        + f"f = disk_file.DiskBlockFile({str(tmp_path)!r}, 64, 4096)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    left = cache_files(tmp_path)
    if naming == "unnamed" and disk_file.O_TMPFILE:
        assert left == []
        return
    assert len(left) == 1 and os.path.getsize(tmp_path / left[0]) == 64 * 4096
    DiskBlockFile(tmp_path, 1, 4096).close()
    assert cache_files(tmp_path) == []
