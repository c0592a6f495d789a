"""A reader of a disk cache another process writes (`DiskBlockFile.adopt`, `DiskKVCache.attach`): the writer's
file through a read-only descriptor, the writer's slot records (`SlotTable`) through a read-only mapping of the same
memfd. It reads the writer's blocks byte-exact, fails every block the writer's records or the bytes on disk do not
prove right (a flipped byte, a failed write, a slot lost to a truncation, a deleted file), and never writes."""
from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import pytest
import torch

from disk_faults import flip_byte, rng  # noqa: F401  (rng is a fixture)
from test_disk_cache import POISON, poisoned, random_slots

from kvbm.kernels import disk_file
from kvbm.kernels.disk_cache import DiskKVCache
from kvbm.kernels.disk_file import DiskBlockFile
from kvbm.kernels.slot_table import SlotTable
from kvbm.layouts import KVGeometry

PADDED = KVGeometry(3, 2, 4, 2, 40, 2)  # 3840-byte blocks in 4096-byte slots
OTHER = KVGeometry(3, 2, 4, 2, 36, 2)  # 3456-byte blocks: the same slots, another layout
SLOTS = 8


class Pair:
    """A writer cache with its records in a memfd, and a reader of it as another process would hold it."""

    def __init__(self, directory, geometry: KVGeometry = PADDED) -> None:
        size = -(-SlotTable.nbytes(SLOTS) // mmap.PAGESIZE) * mmap.PAGESIZE
        records = os.memfd_create("kvbm-test-records")
        os.ftruncate(records, size)
        self.writer = DiskKVCache(directory, geometry, torch.bfloat16, SLOTS,
                                  table=SlotTable(SLOTS, mmap.mmap(records, size)))
        table = SlotTable(SLOTS, mmap.mmap(records, size, prot=mmap.PROT_READ))
        os.close(records)
        flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if self.writer.file.o_direct else 0)
        fd = os.open(f"/proc/self/fd/{self.writer.file.fileno()}", flags)
        file = DiskBlockFile.adopt(fd, directory, SLOTS, self.writer.slot_bytes, lost=table.lost)
        self.reader = DiskKVCache.attach(file, geometry, torch.bfloat16, table)
        self.bb, self.sb = geometry.block_bytes, self.writer.slot_bytes

    def write(self, rng, slots: list[int], tags: list[int] | None = None) -> np.ndarray:
        src = random_slots(rng, len(slots), self.sb)
        assert self.writer.write_slots(slots, src, list(range(len(slots))), tags) == {}
        return src

    def read(self, cache: DiskKVCache, slots: list[int], tags: list[int] | None = None
             ) -> tuple[dict[int, str], np.ndarray]:
        dst = poisoned(len(slots), self.sb)
        return cache.read_slots(slots, dst, list(range(len(slots))), tags), dst

    def block(self, buf: np.ndarray, k: int) -> bytes:
        return buf[k * self.sb:k * self.sb + self.bb].tobytes()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.close()


def test_the_reader_reads_the_writers_blocks_byte_exact(pair, rng):
    slots, tags = [6, 0, 3, 7], [11, 12, 13, 14]
    src = pair.write(rng, slots, tags)
    errors, dst = pair.read(pair.reader, [3, 7, 6, 0], [13, 14, 11, 12])
    assert errors == {}
    for k, i in enumerate([2, 3, 0, 1]):
        assert pair.block(dst, k) == pair.block(src, i)
    errors, _ = pair.read(pair.reader, [3], [99])  # another block's hash: not the block written
    assert "checksum mismatch" in errors[0] and "written under tag 13, read under tag 99" in errors[0]
    assert pair.reader.layout_digest == pair.writer.layout_digest and pair.reader.read_only


def test_a_corrupted_slot_fails_on_the_writer_and_the_reader(pair, rng):
    src = pair.write(rng, list(range(SLOTS)))
    flip_byte(pair.writer.file.path, 5 * pair.sb + int(rng.integers(0, pair.bb)))
    for cache in (pair.writer, pair.reader):
        errors, dst = pair.read(cache, list(range(SLOTS)))
        assert list(errors) == [5] and "checksum mismatch in slot 5" in errors[5]
        assert all(pair.block(dst, k) == pair.block(src, k) for k in range(SLOTS) if k != 5)


def test_the_reader_never_writes(pair, rng):
    pair.write(rng, [1])
    with pytest.raises(ValueError, match="read only"):
        pair.reader.write_slots([2], random_slots(rng, 1, pair.sb), [0])
    with pytest.raises(ValueError, match="read only"):
        pair.reader.forget([1])
    with pytest.raises(ValueError, match="read only"):
        pair.reader.file.write_slots([2], random_slots(rng, 1, pair.sb))
    with pytest.raises(ValueError, match="read-only"):
        pair.reader._sums[1] = 0
    with pytest.raises(OSError) as e:
        os.pwrite(pair.reader.file.fileno(), b"x" * 4096, 0)
    assert e.value.errno == errno.EBADF


def test_failed_and_rewritten_slots_as_the_writer_records_them(pair, rng, monkeypatch):
    pair.write(rng, [2])
    real = os.pwritev

    def failing(fd, bufs, offset):
        if offset == 2 * pair.sb:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", failing)
    assert 0 in pair.writer.write_slots([2], random_slots(rng, 1, pair.sb), [0])
    monkeypatch.undo()
    errors, _ = pair.read(pair.reader, [2])
    assert "last write failed" in errors[0]
    src = pair.write(rng, [2])
    errors, dst = pair.read(pair.reader, [2])
    assert errors == {} and pair.block(dst, 0) == pair.block(src, 0)


def test_a_slot_lost_to_a_truncation_fails_on_the_reader(pair, rng):
    """An unverified slot (written by cuFile) past a truncation reads back as zeros once the writer's next write
    extends the file again: the writer marks it lost in the flags both map, so the reader refuses it too."""
    pair.write(rng, list(range(SLOTS)))
    pair.writer.forget([5])
    os.truncate(pair.writer.file.path, 2 * pair.sb)
    pair.write(rng, [7])  # re-extends the file over a hole
    for cache in (pair.writer, pair.reader):
        errors, _ = pair.read(cache, [5])
        assert "lost when the file was truncated" in errors[0]
    assert pair.reader.file._lost[2:7].all()


def test_a_deleted_file_fails_every_read_of_the_reader(tmp_path, rng, monkeypatch):
    """The writer continues in a new file it does not hand out; the reader's file is gone, so it fails every
    read (a block never comes from the deleted file, even where the writer's records prove the new one's)."""
    monkeypatch.setattr(disk_file, "O_TMPFILE", 0)
    p = Pair(tmp_path)
    p.write(rng, [1, 2])
    os.unlink(p.writer.file.path)
    src = p.write(rng, [1])  # the writer renews its file
    assert p.writer.renewals == 1
    errors, dst = p.read(p.writer, [1])
    assert errors == {} and p.block(dst, 0) == p.block(src, 0)
    errors, dst = p.read(p.reader, [1, 2])
    assert set(errors) == {0, 1} and all("was deleted" in r for r in errors.values())
    assert dst.tobytes() == bytes([POISON]) * dst.size
    p.close()
    assert os.listdir(tmp_path) == []


def test_adopt_and_attach_refuse_what_does_not_fit(tmp_path):
    with DiskKVCache(tmp_path, PADDED, torch.bfloat16, SLOTS) as writer:
        path = f"/proc/self/fd/{writer.file.fileno()}"
        cases = [(os.open(path, os.O_RDWR), SLOTS, "not opened read-only"),
                 (os.open(path, os.O_RDONLY), SLOTS + 1, f"{SLOTS * 4096} bytes, not {(SLOTS + 1) * 4096}"),
                 (os.open(tmp_path, os.O_RDONLY), SLOTS, "not a regular file")]
        for fd, slots, why in cases:
            with pytest.raises(ValueError, match=why):
                DiskBlockFile.adopt(fd, tmp_path, slots, 4096)
            with pytest.raises(OSError):
                os.fstat(fd)  # closed by adopt
        file = DiskBlockFile.adopt(os.open(path, os.O_RDONLY), tmp_path, SLOTS, 4096)
        with pytest.raises(ValueError, match="cannot be read as blocks"):
            DiskKVCache.attach(file, PADDED, torch.bfloat16, SlotTable(SLOTS + 1))
        other = DiskKVCache.attach(file, OTHER, torch.bfloat16, SlotTable(SLOTS))
        assert other.layout_digest != writer.layout_digest  # what a reader compares before trusting the records
        other.close()
        with pytest.raises(ValueError, match="read-only records"):
            DiskKVCache(tmp_path, PADDED, torch.bfloat16, SLOTS, table=SlotTable(SLOTS, bytes(SlotTable.nbytes(SLOTS))))
