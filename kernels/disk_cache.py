"""G3 as a paged KV cache: blocks in the 4 KiB-aligned slots of one preallocated file.

`DiskKVCache` is a cache like any other to `Transfers.submit`: it has a geometry, a dtype, a number of blocks and
a `KVLayout` (block-major in KVBM's staging order, block i at byte ``i * slot_bytes`` of the file), so the same
byte-exact conversion rules hold for its blocks as for a host or GPU cache's. Its bytes are only reachable through
the disk paths (`kvbm.kernels.paths.host_disk`, `gpu_disk`), which call `write_slots` / `read_slots` on the disk
threads.

Blocks of a smaller geometry can share the file (`DiskKVCache.view`): a view reads and writes its own blocks at
the start of the same slots, through the same file and checksums (a cache of raw byte blocks holds the blocks of
several geometries this way).

Integrity: every slot written from host memory gets an xxh3-64 checksum of its block bytes, seeded with a digest
of the cache's layout and geometry and, when the writer gives one, the block's tag (its sequence hash); the sums
live in memory and every read is verified against them, so a flipped byte, two swapped slots, a hole punched in
the file or a block read under another tag fails that block ("checksum mismatch") instead of handing over wrong
bytes. A slot written by cuFile straight from GPU memory has no checksum (its bytes never pass through the host)
and is read unverified. Checksums are computed and verified per I/O request on the file's I/O threads (just before
a request's write, right after its read), in one call per request that releases the GIL (`block_checksums`), so in
parallel with the batch's other requests; a writer's ``prepare`` hook fills a request's blocks on the same thread
just before (the host path converts them into a bounce chunk), a reader's ``on_verified`` hook takes a request's
intact blocks on from it (the host path copies them to their destination).

The checksums and slot states are a `SlotTable`, in memory of the cache's own or in memory other processes map:
ranks holding identical KV share one file that one of them writes (`kvbm.worker.shared_disk`), and every other
rank reads it as a cache of its own (`DiskKVCache.attach`: the file adopted from a descriptor, the writer's
records mapped read-only), verifying every read against the writer's checksums; such a cache never writes.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
import xxhash

from kvbm.layouts import KVGeometry, KVLayout

from .block_checksums import checksums, warm_up
from .bounce import slot_cache
from .disk_file import DiskBlockFile, align_up
from .medium import Medium
from .slot_table import SlotTable

__all__ = ["DiskKVCache", "same_slot_layout"]

logger = logging.getLogger(__name__)
_MASK64 = (1 << 64) - 1
_UNVERIFIED, _SUMMED, _WRITE_FAILED = 0, 1, 2


def same_slot_layout(a: KVLayout, b: KVLayout) -> bool:
    """Whether two layouts place every element of a block at the same byte offset from the block's start, with the
    same block stride (compared structurally: strides and pieces, whatever the names and block counts)."""
    return (a.geometry == b.geometry and a.dtype == b.dtype and a.strides == b.strides
            and len(set(a.piece_tensor)) == 1 and len(set(b.piece_tensor)) == 1
            and a.piece_offset == b.piece_offset)


def _check_geometry(geometry: KVGeometry, dtype: torch.dtype) -> None:
    if not isinstance(geometry, KVGeometry):
        raise TypeError(f"geometry must be a KVGeometry, got {type(geometry).__name__}")
    if not isinstance(dtype, torch.dtype) or torch.empty((), dtype=dtype).element_size() != geometry.itemsize:
        raise ValueError(f"dtype {dtype!r} does not have the geometry's element size {geometry.itemsize}")


class DiskKVCache:
    """``num_blocks`` blocks of ``geometry`` / ``dtype`` in a new file in ``directory`` (removed by `close`).

    ``use_o_direct`` and ``zerofill_fallback`` are passed to `DiskBlockFile`; ``table`` holds the slots' records
    (zeroed, e.g. in memory shared with the file's readers), else the cache's own. Raises what `DiskBlockFile`
    raises for a bad directory or a file that does not fit."""

    medium = Medium.DISK

    def __init__(self, directory: str | os.PathLike, geometry: KVGeometry, dtype: torch.dtype, num_blocks: int, *,
                 use_o_direct: bool = True, zerofill_fallback: bool = False, name: str = "G3",
                 table: SlotTable | None = None) -> None:
        _check_geometry(geometry, dtype)
        table = SlotTable(num_blocks) if table is None else table
        if table.num_slots != num_blocks or table.read_only:
            raise ValueError(f"the slot table holds {table.num_slots} {'read-only ' * table.read_only}records, "
                             f"the cache writes {num_blocks}")
        self._file_options = {"use_o_direct": use_o_direct, "zerofill_fallback": zerofill_fallback}
        file = DiskBlockFile(directory, num_blocks, align_up(geometry.block_bytes), lost=table.lost,
                             **self._file_options)
        self._setup(file, geometry, dtype, name, table)

    @classmethod
    def attach(cls, file: DiskBlockFile, geometry: KVGeometry, dtype: torch.dtype, table: SlotTable, *,
               name: str = "G3") -> DiskKVCache:
        """A reader of the cache another process writes: its ``file`` (adopted: `DiskBlockFile.adopt`) and its
        records ``table`` (mapped read-only). The cache reads and verifies, never writes; `close` closes the file
        (the writer removes it). Raises ValueError if the file's slots or the table do not fit ``geometry``."""
        _check_geometry(geometry, dtype)
        if not file.read_only or file.slot_bytes != align_up(geometry.block_bytes) or table.num_slots != file.num_slots:
            raise ValueError(f"{file!r} with {table.num_slots} records cannot be read as blocks of {geometry}")
        self = cls.__new__(cls)
        self._file_options = {}
        self._setup(file, geometry, dtype, name, table)
        return self

    def _setup(self, file: DiskBlockFile, geometry: KVGeometry, dtype: torch.dtype, name: str,
               table: SlotTable) -> None:
        self.geometry = geometry
        self.dtype = dtype
        self.name = name
        self.slot_bytes = file.slot_bytes
        self.file = file
        #: Times the file was replaced after being deleted underneath.
        self.renewals = 0
        self._retired: list[DiskBlockFile] = []  # replaced files, closed with this cache (no descriptor reuse)
        self.num_blocks = self.file.num_slots
        meta = torch.empty(self.num_blocks * self.slot_bytes, dtype=torch.uint8, device="meta")
        self.layout: KVLayout = slot_cache(meta, geometry, dtype, self.num_blocks, self.slot_bytes).layout
        self.layout_digest: bytes = xxhash.xxh3_64_digest(repr((
            "kvbm-g3", geometry, str(dtype), self.slot_bytes, self.layout.strides, self.layout.piece_tensor,
            self.layout.piece_offset)).encode())
        self._table = table
        self._sums, self._tags, self._tagged, self._state = table.sums, table.tags, table.tagged, table.state
        self._lock = threading.Lock()
        warm_up()  # the checksum loop compiles (or loads) now, not inside a first write

    @property
    def read_only(self) -> bool:
        """Whether this cache reads a file another process writes (`attach`)."""
        return self.file.read_only

    def _check_writable(self) -> None:
        if self.read_only:
            raise ValueError(f"{self.name}: the disk cache file is another process's, read only here")

    # ------------------------------------------------------------------ integrity

    def _seed(self, tag: int | None) -> int:
        """The checksum seed: the layout digest, bound to the block's tag when there is one."""
        suffix = b"\x00" * 9 if tag is None else b"\x01" + (int(tag) & _MASK64).to_bytes(8, "little")
        return xxhash.xxh3_64_intdigest(self.layout_digest + suffix)

    def _checksums(self, rows: np.ndarray, index: Sequence[int], tags: Sequence[int | None]) -> list[int]:
        """The checksums of blocks ``rows[index[i]]`` under ``tags[i]``: xxh3-64 of each block's ``block_bytes``
        (the slot's padding excluded), seeded by `_seed`. The one way a slot's checksum is computed."""
        return checksums(rows, self.geometry.block_bytes, [self._seed(t) for t in tags], index).tolist()

    def checksum(self, block: memoryview | np.ndarray, tag: int | None = None) -> int:
        """xxh3-64 of one block's bytes (``block_bytes`` of them, the slot's padding excluded) under ``tag``."""
        return self._checksums(np.frombuffer(block, dtype=np.uint8)[None], [0], [tag])[0]

    def view(self, geometry: KVGeometry, dtype: torch.dtype) -> DiskKVCache:
        """The same slots holding blocks of ``geometry`` / ``dtype`` (no larger than this cache's blocks, at the
        start of each slot): one file, one set of checksums (over this cache's block bytes); only this cache closes
        the file."""
        return _DiskView(self, geometry, dtype)

    def forget(self, slots: Sequence[int], failed: bool = False) -> None:
        """Slots whose bytes changed without a checksum: read unverified (cuFile writes), or, with ``failed``,
        refused until rewritten (a write that failed may have left any bytes). Raises ValueError on a reader."""
        self._check_writable()
        with self._lock:
            self._state[np.asarray(slots, dtype=np.int64)] = _WRITE_FAILED if failed else _UNVERIFIED

    def _verify(self, slots: Sequence[int], rows: np.ndarray, index: Sequence[int],
                tags: Sequence[int | None]) -> list[str | None]:
        """Per slot ``slots[i]``, read into ``rows[index[i]]`` and asked for under ``tags[i]`` (None: the writer's
        tag), why its bytes are not the block written there; None where they are (or the slot is unverified)."""
        reasons: list[str | None] = [None] * len(slots)
        summed: list[tuple[int, int | None, int | None]] = []  # (i, stored tag, wanted tag)
        for i, (slot, tag) in enumerate(zip(slots, tags)):
            state = int(self._state[slot])
            if state == _WRITE_FAILED:
                reasons[i] = f"slot {slot} of {self.name} is not readable: its last write failed"
            elif state != _UNVERIFIED:
                stored_tag = int(self._tags[slot]) if self._tagged[slot] else None
                summed.append((i, stored_tag, stored_tag if tag is None else int(tag) & _MASK64))
        sums = self._checksums(rows, [index[i] for i, _, _ in summed], [want for _, _, want in summed])
        for (i, stored_tag, want_tag), got in zip(summed, sums):
            slot = slots[i]
            if got != int(self._sums[slot]):
                why = "" if want_tag == stored_tag else f" (written under tag {stored_tag}, read under tag {want_tag})"
                reasons[i] = (f"checksum mismatch in slot {slot} of {self.name}{why}: the bytes on disk are not the "
                              f"block written")
        return reasons

    # ------------------------------------------------------------------ I/O (disk threads)

    def _blocks(self, buffer: np.ndarray) -> np.ndarray:
        return buffer.reshape(-1)[: (buffer.size // self.slot_bytes) * self.slot_bytes].reshape(-1, self.slot_bytes)

    def _renew_if_deleted(self) -> None:
        """A file deleted underneath loses every block: start a new one in the same directory, every slot
        unreadable until rewritten (reads fail, so the index drops the blocks; writes fill the new file). A reader
        keeps failing every read of the deleted file: the writer's new file is not handed to it."""
        if self.read_only or not self.file.deleted():
            return
        with self._lock:
            if not self.file.deleted():
                return
            old = self.file
            self._state[:] = _WRITE_FAILED
            self._table.lost[:] = 0
            self.file = DiskBlockFile(old.directory, self.num_blocks, self.slot_bytes, lost=self._table.lost,
                                      **self._file_options)
            self._retired.append(old)
            self.renewals += 1
        logger.warning("%s: disk cache file %s was deleted; its blocks are lost, continuing in a new file %s",
                       self.name, old.path, self.file.path)

    def write_slots(self, slots: Sequence[int], buffer: np.ndarray, buf_blocks: Sequence[int],
                    tags: Sequence[int] | None = None,
                    prepare: Callable[[list[tuple[int, int]]], None] | None = None) -> dict[int, str]:
        """Write blocks ``buf_blocks`` of the flat uint8 ``buffer`` (one block per ``slot_bytes``) into ``slots``
        and record their checksums; return {position: reason} of the writes that failed. Slots must be distinct.

        ``prepare``, if given, is called on the I/O thread of each request, before its checksums and its write,
        with the request's (position, buffer block) pairs (e.g. to fill those blocks from a cache of another
        layout while the other requests are in flight); if it raises, the request's blocks fail. Raises ValueError
        on a reader."""
        self._check_writable()
        self._renew_if_deleted()
        rows = self._blocks(buffer)
        position = {int(s): k for k, s in enumerate(slots)}
        sums = [0] * len(position)

        def checksum_request(run: list[tuple[int, int]]) -> None:  # on the request's I/O thread, before its write
            if prepare is not None:
                prepare([(position[s], b) for s, b in run])
            ks = [position[s] for s, _ in run]
            run_sums = self._checksums(rows, [b for _, b in run], [None if tags is None else tags[k] for k in ks])
            for k, value in zip(ks, run_sums):
                sums[k] = value

        self.forget(slots, failed=True)  # until the write is known good
        result = self.file.write_slots(slots, buffer, buf_blocks=buf_blocks, before_write=checksum_request)
        errors = {k: f"disk write failed: {result.errors[s]}" for k, s in enumerate(slots) if s in result.errors}
        with self._lock:
            for k, s in enumerate(slots):
                if k not in errors:
                    self._sums[s] = sums[k]
                    self._tagged[s] = tags is not None
                    self._tags[s] = 0 if tags is None else int(tags[k]) & _MASK64
                    self._state[s] = _SUMMED
        return errors

    def read_slots(self, slots: Sequence[int], buffer: np.ndarray, buf_blocks: Sequence[int],
                   tags: Sequence[int] | None = None,
                   on_verified: Callable[[list[tuple[int, int]]], None] | None = None) -> dict[int, str]:
        """Read ``slots`` into blocks ``buf_blocks`` of the flat uint8 ``buffer`` and verify their checksums (under
        ``tags`` when given, else the writer's); return {position: reason} of the blocks not read intact.

        ``on_verified``, if given, is called on the I/O thread of each request, right after the request's read and
        checks, with the (position, buffer block) pairs of its blocks read intact (e.g. to copy them on while the
        other requests are in flight); if it raises, those blocks fail."""
        self._renew_if_deleted()
        rows = self._blocks(buffer)
        position = {int(s): k for k, s in enumerate(slots)}
        errors: dict[int, str] = {}

        def verify_request(run: list[tuple[int, int]]) -> None:  # on the request's I/O thread, after its read
            intact = []
            ks = [position[s] for s, _ in run]
            reasons = self._verify([s for s, _ in run], rows, [b for _, b in run],
                                   [None if tags is None else tags[k] for k in ks])
            for k, (_, b), bad in zip(ks, run, reasons):
                if bad is None:
                    intact.append((k, b))
                else:
                    errors[k] = f"disk read failed: {bad}"
            if on_verified is not None and intact:
                try:
                    on_verified(intact)
                except Exception as e:  # noqa: BLE001 - the caller's failure fails the blocks it was given
                    for k, _ in intact:
                        errors[k] = f"handling the blocks read failed: {e!r}"

        result = self.file.read_slots(slots, buffer, buf_blocks=buf_blocks, on_read=verify_request)
        for s, e in result.errors.items():
            errors[position[s]] = f"disk read failed: {e}"
        return dict(sorted(errors.items()))

    def close(self) -> None:
        """Close and delete the file (idempotent); no transfer may still use it."""
        self.file.close(remove=True)
        for old in self._retired:
            old.close(remove=True)

    def __enter__(self) -> DiskKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        g = self.geometry
        return (f"{type(self).__name__}({self.name!r}, blocks={self.num_blocks}, slot_bytes={self.slot_bytes}, "
                f"layers={g.num_layers}, kv={g.num_kv}, block_size={g.block_size}, heads={g.num_heads}, "
                f"head_dim={g.head_dim}, dtype={self.dtype}, file={self.file.path!r})")


class _DiskView(DiskKVCache):
    """A `DiskKVCache`'s slots seen as blocks of another geometry (`DiskKVCache.view`): its own layout, the base's
    file, checksums and I/O (a block written through one view and read through another fails no checksum: keys
    keep blocks of different geometries apart, not the disk)."""

    def __init__(self, base: DiskKVCache, geometry: KVGeometry, dtype: torch.dtype) -> None:
        _check_geometry(geometry, dtype)
        if geometry.block_bytes > base.geometry.block_bytes or base.slot_bytes % geometry.itemsize:
            raise ValueError(f"blocks of {geometry.block_bytes} bytes do not fit the {base.geometry.block_bytes}-byte "
                             f"blocks of {base.name}'s slots")
        self._base = base
        self.geometry, self.dtype, self.name = geometry, dtype, base.name
        self.slot_bytes, self.num_blocks = base.slot_bytes, base.num_blocks
        meta = torch.empty(self.num_blocks * self.slot_bytes, dtype=torch.uint8, device="meta")
        self.layout = slot_cache(meta, geometry, dtype, self.num_blocks, self.slot_bytes).layout

    file = property(lambda self: self._base.file)
    renewals = property(lambda self: self._base.renewals)
    layout_digest = property(lambda self: self._base.layout_digest)

    def _checksums(self, rows: np.ndarray, index: Sequence[int], tags: Sequence[int | None]) -> list[int]:
        return self._base._checksums(rows, index, tags)

    def forget(self, slots: Sequence[int], failed: bool = False) -> None:
        self._base.forget(slots, failed)

    def _verify(self, slots: Sequence[int], rows: np.ndarray, index: Sequence[int],
                tags: Sequence[int | None]) -> list[str | None]:
        return self._base._verify(slots, rows, index, tags)

    def write_slots(self, slots: Sequence[int], buffer: np.ndarray, buf_blocks: Sequence[int],
                    tags: Sequence[int] | None = None,
                    prepare: Callable[[list[tuple[int, int]]], None] | None = None) -> dict[int, str]:
        return self._base.write_slots(slots, buffer, buf_blocks, tags, prepare)

    def read_slots(self, slots: Sequence[int], buffer: np.ndarray, buf_blocks: Sequence[int],
                   tags: Sequence[int] | None = None,
                   on_verified: Callable[[list[tuple[int, int]]], None] | None = None) -> dict[int, str]:
        return self._base.read_slots(slots, buffer, buf_blocks, tags, on_verified)

    def view(self, geometry: KVGeometry, dtype: torch.dtype) -> DiskKVCache:
        return self._base.view(geometry, dtype)

    def close(self) -> None:
        """Nothing: the base cache owns the file."""
