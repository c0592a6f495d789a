"""One disk tier for ranks that hold identical KV: the replica group's G3 file, written by its writer rank only and
read by every rank.

The writer creates the tier as any disk tier (`DiskKVCache`: an unnamed file where the filesystem allows, nothing
left behind on any exit), its slot records (checksums, tags, states, lost flags: `SlotTable`) in a sealed memfd
it maps, and hands the group's other ranks a read-only descriptor of each (`DescriptorServer`, same user only). A
reader checks what it receives (the number of slots, their size and the layout digest the checksums are seeded
with; a regular file of its user, of the tier's size, opened read-only; a sealed memfd of the records' size), maps
the records read-only and reads the file as a cache of its own (`DiskKVCache.attach`), every block verified
against the writer's checksums.

Who writes what is the caller's rule (`kvbm.connectors.worker`): moves into the tier run on the writer only. A
reader that cannot attach keeps a file of its own, which is always correct, only larger.
"""
from __future__ import annotations

import mmap
import os
import struct

import torch

from kvbm.kernels.disk_cache import DiskKVCache
from kvbm.kernels.disk_file import DiskBlockFile, align_up
from kvbm.kernels.slot_table import SlotTable
from kvbm.layouts import KVGeometry
from kvbm.tiers import TierSpec
from kvbm.worker.replica_group import (
    DescriptorServer,
    ReplicaGroup,
    ShareError,
    page_bytes,
    receive_descriptors,
    sealed_memfd,
    sealed_size_error,
)
from kvbm.worker.tier_memory import allocate_tier, close_tier

__all__ = ["SharedDiskTier", "attach_disk_tier"]

_TIER = "g3"
_MAGIC = b"kvbm-shared-g3\0\0"
_HEADER = struct.Struct("<16sQQ8s")  # magic, slots, slot bytes, layout digest


def _reopen_read_only(fd: int, direct: bool) -> int:
    """A new read-only descriptor of the file open as ``fd`` in this process (O_DIRECT where ``direct``); raises
    `ShareError` saying why not."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    try:
        new = os.open(f"/proc/self/fd/{fd}", flags)
    except OSError as e:
        raise ShareError(f"cannot reopen descriptor {fd} read-only: {e}") from None
    mine, there = os.fstat(fd), os.fstat(new)
    if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
        os.close(new)
        raise ShareError(f"reopening descriptor {fd} read-only gave another file")
    return new


class SharedDiskTier:
    """The writer's side: ``cache``, the disk tier whose file and records `serve` hands to the group's readers;
    `close` stops handing them out (the cache is closed by its owner, the store)."""

    def __init__(self, cache: DiskKVCache, server: DescriptorServer) -> None:
        self.cache = cache
        self._server = server

    @property
    def served(self) -> int:
        """Readers the tier was handed to."""
        return self._server.served

    @classmethod
    def create(cls, group: ReplicaGroup, spec: TierSpec, geometry: KVGeometry, dtype: torch.dtype) -> SharedDiskTier:
        """The tier of ``spec`` for blocks of ``geometry`` / ``dtype``, its records in a sealed memfd (not yet
        handed out). Raises what allocating a disk tier raises, or `ShareError`."""
        nbytes = SlotTable.nbytes(spec.num_blocks)
        records_fd = sealed_memfd(f"{group.name}-g3", nbytes)
        cache = None
        try:
            records = mmap.mmap(records_fd, page_bytes(nbytes))
            cache = allocate_tier(spec, geometry, dtype, table=SlotTable(spec.num_blocks, records))
            file_fd = _reopen_read_only(cache.file.fileno(), cache.file.o_direct)
            try:
                table_fd = _reopen_read_only(records_fd, False)
                try:
                    message = _HEADER.pack(_MAGIC, cache.num_blocks, cache.slot_bytes, cache.layout_digest)
                    server = DescriptorServer(group, _TIER, message, [file_fd, table_fd])
                finally:
                    os.close(table_fd)
            finally:
                os.close(file_fd)
        except BaseException:
            if cache is not None:
                close_tier(cache)
            raise
        finally:
            os.close(records_fd)  # the mapping keeps the records
        return cls(cache, server)

    def serve(self) -> None:
        """Hand the tier to the group's readers from a background thread, until all attached or ``timeout_s``
        passed. Raises `ShareError` if the name is taken (the readers then keep files of their own)."""
        self._server.start()

    def close(self) -> None:
        """Stop handing the tier out (idempotent); readers that attached keep reading it."""
        self._server.close()


def attach_disk_tier(group: ReplicaGroup, spec: TierSpec, geometry: KVGeometry, dtype: torch.dtype) -> DiskKVCache:
    """The writer's tier of ``spec`` as a read-only cache of blocks of ``geometry`` / ``dtype``, checked; raises
    `ShareError` saying why not."""
    if spec.directory is None:
        raise ValueError(f"disk tier {spec.name} needs a directory")
    message, (file_fd, table_fd) = receive_descriptors(group, _TIER, _HEADER.size, 2)
    n, nbytes = spec.num_blocks, SlotTable.nbytes(spec.num_blocks)
    try:
        magic, slots, slot_bytes, digest = _HEADER.unpack(message)
        why = ("bad greeting" if magic != _MAGIC else f"{slots} slots, this rank needs {n}" if slots != n else
               f"slots of {slot_bytes} bytes, this rank's need {align_up(geometry.block_bytes)}"
               if slot_bytes != align_up(geometry.block_bytes) else sealed_size_error(table_fd, nbytes))
        if why is not None:
            raise ShareError(f"the writer rank's disk tier does not fit: {why}")
        try:
            records = mmap.mmap(table_fd, page_bytes(nbytes), prot=mmap.PROT_READ)
        except OSError as e:
            raise ShareError(f"mapping the writer rank's slot records failed: {e}") from None
        table = SlotTable(n, records)
    except BaseException:
        os.close(file_fd)
        raise
    finally:
        os.close(table_fd)  # the mapping keeps the records
    try:
        file = DiskBlockFile.adopt(file_fd, spec.directory, n, slot_bytes, use_o_direct=spec.use_o_direct,
                                   lost=table.lost)
    except (ValueError, OSError) as e:
        raise ShareError(str(e)) from None
    try:
        cache = DiskKVCache.attach(file, geometry, dtype, table)
    except ValueError as e:
        file.close()
        raise ShareError(str(e)) from None
    if cache.layout_digest != digest:
        cache.close()
        raise ShareError("the writer rank's disk tier holds blocks of another layout (its checksums' digest differs)")
    return cache
