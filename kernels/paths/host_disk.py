"""Host <-> disk: blocks between a CPU cache (G2, an engine's cache on a CPU platform) and a `DiskKVCache` (G3).

The reads and writes run on the disk threads of the `Transfers` object (`disk_executor`), never the caller's, and
so does every copy between the host cache and a chunk. A host cache whose blocks are whole dense runs at exactly
the slot stride, in the disk's inner order and from a 4 KiB-aligned base (G2 when ``block_bytes`` is a multiple of
4096) is written straight from its own memory and read straight into it (O_DIRECT from or into its blocks, one
iovec per stretch of adjacent blocks, no chunk, no copy). Everything else goes through a chunk of the shared pinned
bounce pool (`kvbm.kernels.bounce`), converted per I/O request on that request's I/O thread with a single-threaded
numba copy (`block_copier`: no parallel region, which would abort the process beside the caller's own where numba
has no thread-safe threading layer), so the copies of several requests run at once and beside the other requests'
I/O.

Writes through a chunk: each request converts its blocks from the cache into the chunk, checksums them and writes
them; a copy that fails fails its request's blocks. Reads through a chunk: each request reads its slots into the
chunk, verifies them (I/O result and checksum) and copies the blocks read intact on into the destination, and a
block that failed is never copied: the destination stays untouched. Read straight into a host cache, a failed
block's destination bytes are unspecified (the block is reported failed, never served). Reading one slot into
several destination blocks reads it once and fans out. `bounced_write_steps` / `bounced_read_steps` serve the GPU's
POSIX path (`gpu_disk`): the copy to or from the chunk is then a GPU <-> host transfer issued from the polling
thread.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..block_transfer import SOURCE_READ, BlockTransfer, Steps
from ..bounce import BounceChunk, BouncePool, bounce_pool
from ..disk_cache import DiskKVCache, same_slot_layout
from ..medium import Medium, medium_of
from ..transfers import Transfers, register_path
from .gpu_host import whole_blocks_contiguous

__all__ = ["HostDiskPath", "bounced_read_steps", "bounced_write_steps", "check_tags", "direct_array", "start_transfer"]

_ALIGN = 4096
#: Copies between a cache and a chunk: (src, dst, src_ids, dst_ids) -> BlockTransfer, issued on the polling thread.
StageFn = Callable[[Any, Any, np.ndarray, np.ndarray], BlockTransfer]
#: Disk I/O of one chunk on a disk thread: (slots, chunk block ids, tags or None) -> {position: reason}.
IoFn = Callable[[list, list, "list[int] | None"], dict]


def check_tags(tags: Sequence[int] | None, n: int) -> list[int] | None:
    """``tags`` as a list of n ints (block tags for the disk checksums), or None; raises TypeError/ValueError."""
    if tags is None:
        return None
    try:
        out = [int(t) for t in tags]
    except (TypeError, ValueError):
        raise TypeError(f"tags must be a sequence of ints, got {tags!r:.80}") from None
    if len(out) != n:
        raise ValueError(f"tags has {len(out)} entries but the transfer moves {n} blocks")
    return out


def batch_blocks(transfers: Transfers, disk: DiskKVCache, direct: np.ndarray | None) -> int:
    """Blocks per batch: a bounce chunk's through a chunk; moved straight, no fewer than keep every I/O thread of
    the disk busy with full-size requests where the slots are consecutive (a batch's requests are cut from its
    slots alone, and the disk threads run two batches at a time)."""
    if direct is None:
        return transfers.bounce_blocks
    return max(transfers.bounce_blocks, disk.file.full_batch_slots)


def direct_array(host: Any, disk: DiskKVCache) -> np.ndarray | None:
    """The host cache's bytes as a flat uint8 array of ``num_blocks * slot_bytes`` when its blocks can be moved to
    and from the disk's slots as they are (same layout, dense blocks at the slot stride, 4 KiB-aligned base);
    None otherwise."""
    if not same_slot_layout(host.layout, disk.layout) or not whole_blocks_contiguous(host):
        return None
    base, nbytes = host.first_piece_address(), host.num_blocks * disk.slot_bytes
    if base % _ALIGN or not any(lo <= base and base + nbytes <= hi for lo, hi in host.storage_ranges().tolist()):
        return None
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(base))


class _Batch:
    """Up to one chunk of a disk transfer: its positions in the transfer and what it waits on now."""

    def __init__(self, positions: np.ndarray, chunk: BounceChunk | None) -> None:
        self.positions = positions
        self.chunk = chunk
        self.stage: BlockTransfer | None = None
        self.io: Future | None = None
        self.targets: list[list[int]] = []  # host reads: the positions each slot of the batch feeds

    @classmethod
    def taking_chunk(cls, positions: np.ndarray, pool: BouncePool, needs_chunk: bool) -> _Batch | None:
        """A batch of ``positions``, with a chunk of ``pool`` when ``needs_chunk`` (None: every chunk is taken)."""
        chunk = pool.acquire() if needs_chunk else None
        if needs_chunk and chunk is None:
            return None
        return cls(positions, chunk)

    def retire(self, in_flight: list[_Batch]) -> None:
        """The batch is done: out of ``in_flight``, its chunk (if any) given back."""
        in_flight.remove(self)
        self.io = None
        if self.chunk is not None:
            self.chunk.release()
            self.chunk = None

    def waiting_on(self) -> Any:
        return self.io if self.io is not None else self.stage


def _read_failures(b: _Batch) -> dict[int, str]:
    """The failed blocks of a batch's finished disk read ({index in the batch: reason}); every block when the read
    as a whole raised."""
    try:
        return b.io.result()
    except Exception as e:  # noqa: BLE001 - the read as a whole failed
        return {k: f"disk read failed: {e!r}" for k in range(b.positions.size)}


def _take_write_failures(b: _Batch, errors: dict[int, str]) -> None:
    """Add the failed blocks of a batch's finished disk write to ``errors`` (by position in the transfer); every
    block when the write as a whole raised."""
    try:
        for k, reason in b.io.result().items():
            errors.setdefault(int(b.positions[k]), reason)
    except Exception as e:  # noqa: BLE001 - the write as a whole failed
        _fail(errors, b.positions, f"disk write failed: {e!r}")


def _fail(errors: dict[int, str], positions: Sequence[int], reason: str) -> None:
    for p in positions:
        errors.setdefault(int(p), reason)


def _drain(batches: Sequence[_Batch]) -> None:
    """Wait for what batches abandoned mid-way still have in flight, then give their chunks back."""
    for b in batches:
        if b.io is not None:
            try:
                b.io.result()
            except Exception:  # noqa: BLE001 - the transfer is being abandoned; its outcome is not reported
                pass
        if b.stage is not None:
            b.stage.wait()
        if b.chunk is not None:
            b.chunk.release()
            b.chunk = None


_poking = threading.local()


def poke_holders(pool: BouncePool | None, me: list) -> None:
    """Advance the other transfers holding chunks of ``pool`` (their next step may be on the polling thread and
    free a chunk); never re-entered, and never the caller's own transfer."""
    if pool is None or getattr(_poking, "active", False):
        return
    _poking.active = True
    try:
        for other in list(pool.holders):
            if not me or other is not me[0]:
                other.done()
    finally:
        _poking.active = False


def settle_copy(b: Any, errors: dict[int, str], in_flight: list) -> bool:
    """A read batch's last step: once its copy on from the chunk is done, note the copy's failed blocks and give
    the chunk back; False while the copy runs."""
    if not b.stage.done():
        return False
    for k, reason in b.stage.reasons.items():
        errors.setdefault(int(b.positions[k]), reason)
    in_flight.remove(b)
    b.stage = None
    b.chunk.release()
    return True


def run_batches(pending: deque, start: Any, advance: Any, in_flight: list, pool: BouncePool | None, me: list, *,
                wait_on: Callable[[list], Any] | None = None, starved: Callable[[], bool] | None = None,
                drain: Callable[[list], None] = _drain, source_read: Callable[[], bool] | None = None) -> Steps:
    """The scheduling loop of a chunked transfer (disk reads and writes, remote reads): start batches while
    ``start`` can (it returns False when no chunk is free), advance each without blocking (starting more batches
    as soon as one that advanced may have given its chunk back, so the disk never waits on the copies of the other
    batches), and when nothing moved
    wait on ``wait_on(in_flight)`` (default: the oldest batch's `waiting_on`). A transfer with no chunk at all
    stops if ``starved()`` says no chunk will come back, else advances the other holders of the pool before asking
    again: a chunk another transfer holds may wait for a step only a poll runs. ``drain`` settles the batches
    left in flight when the steps end early. ``source_read`` (checked after each pass) says when the batches no
    longer read the transfer's source: the steps then yield `SOURCE_READ`, once."""
    told = source_read is None
    def start_all() -> bool:
        started = False
        while pending and start(pending[0]):
            pending.popleft()
            started = True
        return started

    try:
        while pending or in_flight:
            moved = start_all()
            for b in list(in_flight):
                if advance(b):  # a chunk it gave back starts the next batch before the next one's copy
                    moved = True
                    start_all()
            if not told and source_read():
                told = True
                yield SOURCE_READ
            if moved:
                continue
            if in_flight:
                yield in_flight[0].waiting_on() if wait_on is None else wait_on(in_flight)
                continue
            if starved is not None and starved():
                break
            poke_holders(pool, me)
            if not (pending and start(pending[0])):
                yield None
            else:
                pending.popleft()
    finally:
        drain(in_flight)


def bounced_write_steps(transfers: Transfers, src: Any, disk: DiskKVCache, src_ids: np.ndarray,
                        dst_ids: np.ndarray, tags: list[int] | None, pool: BouncePool,
                        stage: StageFn | None = None, io: IoFn | None = None, me: list | None = None) -> Steps:
    """Steps of writing blocks ``src_ids`` of ``src`` (a GPU cache) into slots ``dst_ids``: per chunk, ``src`` ->
    chunk by ``stage`` (default ``transfers.submit``; on the polling thread), then ``io(slots, chunk blocks, tags)``
    on a disk thread (default: `DiskKVCache.write_slots` from the pool's bytes). Once every chunk holds its blocks
    the steps yield `SOURCE_READ`: ``src``'s blocks may be reused while the writes go on. ``me`` holds the
    `BlockTransfer` these steps run in once it exists (see `start_transfer`)."""
    executor = transfers.disk_executor()
    stage = stage or transfers.submit
    errors: dict[int, str] = {}
    order = np.argsort(dst_ids, kind="stable")  # chunk blocks in slot order: consecutive slots, one request
    size = transfers.bounce_blocks
    pending = deque(order[i:i + size] for i in range(0, order.size, size))
    in_flight: list[_Batch] = []

    io = io or (lambda s, bb, t: disk.write_slots(s, pool.array, bb, t))

    def start(pos: np.ndarray) -> bool:
        b = _Batch.taking_chunk(pos, pool, True)
        if b is None:
            return False
        chunk = b.chunk
        in_flight.append(b)
        try:
            b.stage = stage(src, chunk.cache, src_ids[pos], chunk.ids[: pos.size])
        except Exception as e:  # noqa: BLE001 - the copy could not start: this batch's blocks fail
            _fail(errors, pos, f"copy to the bounce buffer failed: {e!r}")
            b.positions = pos[:0]
            b.io = _done_future({})
        return True

    def advance(b: _Batch) -> bool:
        if b.io is None:
            if not b.stage.done():
                return False
            bad = b.stage.reasons
            for k, reason in bad.items():
                errors.setdefault(int(b.positions[k]), reason)
            keep = np.array([k for k in range(b.positions.size) if k not in bad], dtype=np.int64)
            b.stage = None
            b.positions = good = b.positions[keep]
            b.io = executor.submit(io, dst_ids[good].tolist(), b.chunk.ids[keep].tolist(),
                                   None if tags is None else [tags[p] for p in good])
            return True
        if not b.io.done():
            return False
        _take_write_failures(b, errors)
        b.retire(in_flight)
        return True

    def source_read() -> bool:  # every batch copied into its chunk (or failed before): the writes go on alone
        return not pending and all(b.stage is None for b in in_flight)

    def wait_on(batches: list[_Batch]) -> Any:
        """A copy still running before the oldest batch's write: the source is read once the copies end, however
        long an earlier chunk's write takes."""
        return next((b.stage for b in batches if b.stage is not None), batches[0].waiting_on())

    yield from run_batches(pending, start, advance, in_flight, pool, [] if me is None else me, wait_on=wait_on,
                           source_read=source_read)
    return errors


def host_write_steps(transfers: Transfers, src: Any, disk: DiskKVCache, src_ids: np.ndarray, dst_ids: np.ndarray,
                     tags: list[int] | None, pool: BouncePool, direct: np.ndarray | None,
                     me: list | None = None) -> Steps:
    """Steps of writing blocks ``src_ids`` of the host cache ``src`` into slots ``dst_ids``, every byte moved on
    the disk threads: per batch of blocks (in slot order: consecutive slots make one request),
    `DiskKVCache.write_slots` on a disk thread, straight from the source blocks with ``direct`` (``src``'s bytes,
    see `direct_array`), else from a bounce chunk that each I/O request fills with its own blocks on its I/O thread
    just before their checksums and write (`block_copier`). Returns {position: reason} of the blocks not
    written."""
    executor = transfers.disk_executor()
    errors: dict[int, str] = {}
    order = np.argsort(dst_ids, kind="stable")
    size = batch_blocks(transfers, disk, direct)
    pending = deque(order[i:i + size] for i in range(0, order.size, size))
    copy = block_copier(src, pool.cache) if direct is None else None
    in_flight: list[_Batch] = []

    def fill(pos: np.ndarray, run: list[tuple[int, int]]) -> None:  # a request's blocks into the chunk, on its thread
        copy(src_ids[pos[[k for k, _ in run]]], np.array([c for _, c in run], dtype=np.int64))

    def start(pos: np.ndarray) -> bool:
        b = _Batch.taking_chunk(pos, pool, direct is None)
        if b is None:
            return False
        chunk = b.chunk
        if chunk is None:
            buffer, blocks, prepare = direct, src_ids[pos], None
        else:
            buffer, blocks, prepare = pool.array, chunk.ids[: pos.size], functools.partial(fill, pos)
        b.io = executor.submit(disk.write_slots, dst_ids[pos].tolist(), buffer, blocks.tolist(),
                               None if tags is None else [tags[p] for p in pos.tolist()], prepare)
        in_flight.append(b)
        return True

    def advance(b: _Batch) -> bool:
        if not b.io.done():
            return False
        _take_write_failures(b, errors)
        b.retire(in_flight)
        return True

    yield from run_batches(pending, start, advance, in_flight, pool, [] if me is None else me)
    return errors


class _Reads:
    """The distinct slots of a read (each is read once, checked under its first block's tag) and, per batch of
    them, the destination positions each one feeds (the slot's first position first)."""

    def __init__(self, src_ids: np.ndarray, tags: list[int] | None, size: int) -> None:
        self.src_ids, self.tags = src_ids, tags
        self.slots, self.first, self.inverse = np.unique(src_ids, return_index=True, return_inverse=True)
        n = self.slots.size
        self.batches = deque(np.arange(i, min(i + size, n)) for i in range(0, n, size))

    def read_tags(self, uniq: np.ndarray) -> list[int] | None:
        """The tags the slots of a batch are checked under."""
        return None if self.tags is None else [self.tags[f] for f in self.first[uniq].tolist()]

    def targets(self, uniq: np.ndarray) -> list[list[int]]:
        """Per slot of a batch (``uniq``: consecutive distinct-slot indices), the positions it feeds."""
        if self.slots.size == self.src_ids.size:  # no slot read twice
            return [[p] for p in self.first[uniq].tolist()]
        out: list[list[int]] = [[] for _ in range(uniq.size)]
        lo = int(uniq[0])
        for p in np.flatnonzero((self.inverse >= lo) & (self.inverse <= int(uniq[-1]))).tolist():
            out[int(self.inverse[p]) - lo].append(p)
        return out

    def recheck(self, disk: DiskKVCache, u: int, p: int, row: np.ndarray) -> str | None:
        """Why position ``p``, fed by slot ``u`` read and checked under its first position's tag, fails under its
        own tag (a block asked for under another tag than the one it was written under); None if it does not."""
        if self.tags is None or self.tags[p] == self.tags[int(self.first[u])]:
            return None
        reason = disk._verify([int(self.slots[u])], row[None], [0], [self.tags[p]])[0]
        return None if reason is None else f"disk read failed: {reason}"


def bounced_read_steps(transfers: Transfers, disk: DiskKVCache, dst: Any, src_ids: np.ndarray,
                       dst_ids: np.ndarray, tags: list[int] | None, pool: BouncePool,
                       stage: StageFn | None = None, io: IoFn | None = None, me: list | None = None) -> Steps:
    """Steps of reading slots ``src_ids`` into blocks ``dst_ids`` of ``dst`` (a GPU cache): per chunk of
    distinct slots, ``io(slots, chunk blocks, tags)`` on a disk thread (default: `DiskKVCache.read_slots` into the
    pool's bytes, checksums verified), then chunk -> ``dst`` of the blocks read intact by ``stage`` (default
    ``transfers.submit``) on the polling thread. A slot asked for by several blocks is read once. Returns
    ``(failed, lost)``: ``lost`` the failed blocks whose slot could not be read intact."""
    executor = transfers.disk_executor()
    stage = stage or transfers.submit
    io = io or (lambda s, bb, t: disk.read_slots(s, pool.array, bb, t))
    errors: dict[int, str] = {}
    lost: set[int] = set()  # failed because the slot's bytes are bad (read error, checksum), not the copy
    reads = _Reads(src_ids, tags, transfers.bounce_blocks)
    in_flight: list[_Batch] = []

    def start(uniq: np.ndarray) -> bool:
        b = _Batch.taking_chunk(uniq, pool, True)
        if b is None:
            return False
        chunk = b.chunk
        in_flight.append(b)
        b.io = executor.submit(io, reads.slots[uniq].tolist(), chunk.ids[: uniq.size].tolist(), reads.read_tags(uniq))
        return True

    def advance(b: _Batch) -> bool:
        if b.stage is None:
            if not b.io.done():
                return False
            bad = _read_failures(b)
            b.io = None
            good = []
            for k, positions in enumerate(reads.targets(b.positions)):
                block = int(b.chunk.ids[k])
                for p in positions:
                    reason = bad.get(k)
                    if reason is None and pool.array is not None:
                        row = pool.array[block * pool.slot_bytes:(block + 1) * pool.slot_bytes]
                        reason = reads.recheck(disk, int(b.positions[k]), p, row)
                    if reason is None:
                        good.append((p, block))
                    else:
                        errors.setdefault(p, reason)
                        lost.add(p)
            b.positions = np.array([p for p, _ in good], dtype=np.int64)
            if not good:
                b.stage = BlockTransfer.completed(0, "none")
                return True
            try:
                b.stage = stage(pool.cache, dst, np.array([c for _, c in good], dtype=np.int64), dst_ids[b.positions])
            except Exception as e:  # noqa: BLE001 - the copy could not start: this batch's blocks fail
                _fail(errors, b.positions, f"copy from the bounce buffer failed: {e!r}")
                b.stage = BlockTransfer.completed(0, "none")
                b.positions = b.positions[:0]
            settle_copy(b, errors, in_flight)  # a copy done at once gives its chunk back now
            return True
        return settle_copy(b, errors, in_flight)

    yield from run_batches(reads.batches, start, advance, in_flight, pool, [] if me is None else me)
    return errors, lost & set(errors)


def host_read_steps(transfers: Transfers, disk: DiskKVCache, dst: Any, src_ids: np.ndarray, dst_ids: np.ndarray,
                    tags: list[int] | None, pool: BouncePool, direct: np.ndarray | None,
                    me: list | None = None) -> Steps:
    """Steps of reading slots ``src_ids`` into blocks ``dst_ids`` of the host cache ``dst``, every byte moved on
    the disk threads: per batch of distinct slots, `DiskKVCache.read_slots` on a disk thread, straight into the
    destination blocks with ``direct`` (``dst``'s bytes, see `direct_array`), else into a bounce chunk. Right after
    each I/O request's read and checks, its I/O thread copies the request's intact blocks on (`block_copier`: a
    single-threaded copy, so copies of several requests run at once and beside the other requests' reads): from
    the chunk into their destination blocks, or, read straight, into the other blocks that asked for the same
    slot. A slot asked for by several blocks is read once. Returns ``(failed, lost)`` as `bounced_read_steps`."""
    executor = transfers.disk_executor()
    errors: dict[int, str] = {}
    lost: set[int] = set()
    lock = threading.Lock()  # the I/O threads of several requests report into errors and lost
    reads = _Reads(src_ids, tags, batch_blocks(transfers, disk, direct))
    source = dst if direct is not None else pool.cache
    buffer = direct if direct is not None else pool.array
    sb = disk.slot_bytes
    copies = direct is None or reads.slots.size < src_ids.size  # through a chunk, or a slot read into several
    copy = block_copier(source, dst) if copies else None
    in_flight: list[_Batch] = []

    def start(uniq: np.ndarray) -> bool:
        b = _Batch.taking_chunk(uniq, pool, direct is None)
        if b is None:
            return False
        chunk = b.chunk
        b.targets = targets = reads.targets(uniq)
        into = reads.first[uniq] if chunk is None else None
        blocks = dst_ids[into] if chunk is None else chunk.ids[: uniq.size]

        def land(run: list[tuple[int, int]]) -> None:  # a request's intact slots, on its I/O thread
            froms, tos, fed, bad = [], [], [], []
            for k, block in run:
                row = buffer[block * sb:(block + 1) * sb]
                for p in targets[k]:
                    reason = reads.recheck(disk, int(uniq[k]), p, row)
                    if reason is not None:
                        bad.append((p, reason))
                    elif chunk is not None or p != into[k]:  # read straight: the first block already holds it
                        froms.append(block)
                        tos.append(int(dst_ids[p]))
                        fed.append(p)
            if fed:
                try:
                    copy(np.array(froms, dtype=np.int64), np.array(tos, dtype=np.int64))
                except Exception as e:  # noqa: BLE001 - the copy failed: its blocks fail, the slots are intact
                    with lock:
                        _fail(errors, fed, f"copy of the blocks read failed: {e!r}")
            if bad:
                with lock:
                    for p, reason in bad:
                        errors.setdefault(p, reason)
                        lost.add(p)

        b.io = executor.submit(disk.read_slots, reads.slots[uniq].tolist(), buffer, blocks.tolist(),
                               reads.read_tags(uniq), land)
        in_flight.append(b)
        return True

    def advance(b: _Batch) -> bool:
        if not b.io.done():
            return False
        bad = _read_failures(b)
        with lock:
            for k, reason in bad.items():
                for p in b.targets[k]:
                    errors.setdefault(p, reason)
                    lost.add(p)
        b.retire(in_flight)
        return True

    yield from run_batches(reads.batches, start, advance, in_flight, pool, [] if me is None else me)
    return errors, lost & set(errors)


def block_copier(src: Any, dst: Any) -> Callable[[np.ndarray, np.ndarray], None]:
    """Copies of blocks between two host caches (a cache and a chunk) on a disk thread
    (`numba_copy.serial_copier`: never a numba parallel region off the caller's thread)."""
    from ..numba_copy import serial_copier

    return serial_copier(src, dst)


def start_transfer(num_blocks: int, name: str, steps: Steps, pool: BouncePool, me: list) -> BlockTransfer:
    """The `BlockTransfer` of ``steps``, known to ``pool`` as a holder of chunks while it runs."""
    transfer = BlockTransfer(num_blocks, name, steps)
    me.append(transfer)
    if not transfer.done():
        pool.holders.add(transfer)
    return transfer


def _done_future(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class HostDiskPath:
    """Moves blocks between a CPU cache and a `DiskKVCache`, in either direction."""

    name = "host-disk"

    def __init__(self, transfers: Transfers) -> None:
        from ..numba_copy import warm_up

        self._transfers = transfers
        warm_up()  # the layout conversions compile now, not inside a first (timed) read

    def submit(self, src: Any, dst: Any, src_ids: np.ndarray, dst_ids: np.ndarray, *,
               tags: Sequence[int] | None = None) -> BlockTransfer:
        """Start the transfer; ``tags`` (one int per block, e.g. its sequence hash) bind the disk checksums to
        the blocks: a read under another tag than the write's fails the block. Raises ValueError/TypeError for
        caches this path cannot move."""
        reading = medium_of(src) is Medium.DISK
        disk, host = (src, dst) if reading else (dst, src)
        if not isinstance(disk, DiskKVCache) or medium_of(host) is not Medium.HOST:
            raise ValueError(f"{self.name} moves blocks between a host cache and a DiskKVCache, got "
                             f"{type(src).__name__} -> {type(dst).__name__}")
        tag_list = check_tags(tags, src_ids.size)
        pool = bounce_pool(self._transfers, disk.geometry, disk.dtype, disk.slot_bytes)
        me: list = []
        direct = direct_array(host, disk)
        if reading:
            steps = host_read_steps(self._transfers, disk, host, src_ids, dst_ids, tag_list, pool, direct, me=me)
        else:
            steps = host_write_steps(self._transfers, host, disk, src_ids, dst_ids, tag_list, pool, direct, me=me)
        return start_transfer(src_ids.size, self.name, steps, pool, me)

    def close(self) -> None:
        """The bounce pool and the disk threads are shared resources of the `Transfers` object."""


register_path(Medium.HOST, Medium.DISK, HostDiskPath)
register_path(Medium.DISK, Medium.HOST, HostDiskPath)
