"""The block manager: keeps the engine's full KV blocks in G2 (pinned host) and G3 (disk), finds and returns them.

Standalone use, no engine (the connectors call the same methods)::

    mgr = BlockManager(gpu_cache, KvbmConfig.from_env())
    hashes = mgr.sequence_hashes(tokens)                 # full blocks only
    t = mgr.offload(hashes, gpu_block_ids)               # write-through G1 -> G2 (G1 -> G3 in disk-only mode)
    mgr.poll()                                           # finished tickets; registers blocks, cascades G2 -> G3
    m = mgr.lookup(hashes)                               # Match(num_blocks, host_hits, disk_hits)
    t = mgr.onboard(hashes[:m.num_blocks], free_gpu_ids) # G2 -> G1, G3 -> G1 through a pinned bounce buffer
    mgr.wait(t); t.results                               # per block: OK / FAILED / SKIPPED
    mgr.close()                                          # removes the disk file

Moves are batches of at most ``DYN_KVBM_MAX_TRANSFER_BATCH_SIZE`` blocks, at most ``DYN_KVBM_MAX_CONCURRENT_
TRANSFERS`` in flight; further batches wait in a queue that ``poll`` starts as transfers finish, so ``offload`` and
``onboard`` do not block (except an offload that finds every slot of its tier pending or held: it waits for the
oldest batch to land). On a GPU, G1 <-> host copies run on the transfer engine's streams and complete through CUDA
events that ``poll`` queries without blocking; on CPU they run synchronously when the batch starts. Disk reads and
writes run on the manager's disk I/O threads, never on the caller's: G3 -> G1 reads the slots into a pinned bounce
chunk in the background, then (at a later ``poll``) copies only the slots read intact into G1, so a failed load never
writes a byte into G1 and is never counted as moved; G1 -> G3 and the G2 -> G3 cascade write in the background once
their bytes are in host memory, and the G3 slots become visible when ``poll`` sees the write finished. A copy that
fails is reported FAILED for every block of its batch; a copy kernel that fails part-way may have written some of
those G1 blocks, which the engine recomputes as for any failed load.

Block life: ``offload`` allocates PENDING slots (evicting inactive blocks, lowest priority then least recently
used); the batch's completion commits them (visible to ``lookup``) or discards them on failure. A block being read
(onboarded, or admitted to G3 and not yet written there) is held and cannot be evicted. G2 blocks go down to G3 when
the disk admission filter admits them: a block's first registration in G2 counts as its first sighting, each later
lookup hit in G2 as a hit (``DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER`` admits every block at once). A G3 slot that
fails a read is dropped from G3. The engine's side of the contract: G1 blocks passed to ``offload`` are not
overwritten, and G1 blocks passed to ``onboard`` are not used, until their ticket is done.

Not thread-safe: one thread (the engine's scheduler or worker) drives a manager; its disk threads only read and
write the disk file and the buffers of the batches they were handed.
"""
from __future__ import annotations

import enum
import logging
import operator
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Sequence

import torch

from kvbm.config import KvbmConfig, KvbmConfigError
from kvbm.disk_filter import DiskAdmissionFilter
from kvbm.hashing import salt_hash, sequence_hashes
from kvbm.kernels.disk_file import align_up
from kvbm.kernels.gds import probe_gds
from kvbm.kernels.transfer import TransferHandle
from kvbm.layouts import PagedKVCache, copy_blocks
from kvbm.metrics import KvbmMetrics
from kvbm.tiers import PADDED_LAYOUT, BounceBuffer, DiskTier, HostTier

__all__ = ["BlockManager", "BlockResult", "Match", "Ticket", "ManagerInvariantError"]

log = logging.getLogger(__name__)

#: Threads that run the G3 reads and writes, so the engine's thread never waits for the disk.
DISK_IO_THREADS = 2


class ManagerInvariantError(RuntimeError):
    """The manager's bookkeeping disagrees with its pools or buffers (a bug)."""


class BlockResult(enum.Enum):
    """Outcome of one block of a ticket."""

    PENDING = "pending"  #: its batch is still in flight
    OK = "ok"  #: stored (offload) or loaded into G1 byte-exact (onboard)
    FAILED = "failed"  #: the transfer or I/O failed; for an onboard, the G1 block must be recomputed
    SKIPPED = "skipped"  #: nothing to do or no room (already stored, below the priority floor, tier full)


@dataclass(frozen=True)
class Match:
    """Result of a prefix lookup: the first ``num_blocks`` blocks can be onboarded, ``host_hits`` of them from G2
    and then ``disk_hits`` from G3."""

    num_blocks: int
    host_hits: int
    disk_hits: int


@dataclass
class Ticket:
    """One ``offload`` or ``onboard`` call: per-block ``results`` and, for failed or skipped blocks, ``reasons``."""

    kind: str
    seq_hashes: list[int]
    gpu_block_ids: list[int]
    results: list[BlockResult]
    reasons: dict[int, str] = field(default_factory=dict)
    _open_batches: int = field(default=0, repr=False)

    @property
    def done(self) -> bool:
        """True once every block has its final result."""
        return self._open_batches == 0

    @property
    def ok_blocks(self) -> list[int]:
        """Indices (into ``seq_hashes``) of the blocks that succeeded."""
        return [i for i, r in enumerate(self.results) if r is BlockResult.OK]

    @property
    def failed_blocks(self) -> list[int]:
        """Indices of the blocks that failed."""
        return [i for i, r in enumerate(self.results) if r is BlockResult.FAILED]


@dataclass
class _Batch:
    """One transfer batch in flight: blocks ``positions`` of ``ticket`` moving ``direction`` through tier ``slots``."""

    ticket: Ticket
    direction: str  # a kvbm.metrics direction: g1_to_g2, g1_to_g3, g2_to_g1, g3_to_g1
    positions: list[int]
    slots: list[int]
    handle: TransferHandle
    started: float
    chunk: int | None = None
    read_errors: dict[int, str] = field(default_factory=dict)  # index into positions -> error (G3 reads)
    elapsed: float | None = None  # seconds, when the batch completed synchronously
    io: Future | None = None  # disk I/O in flight: the G3 read before the copy, or the G3 write after it


@dataclass
class _CascadeWrite:
    """A G2 -> G3 batch being written in the background: G2 slots held, G3 slots pending until it finishes."""

    part: list[tuple[int, int, int]]  # (hash, G2 slot, G3 slot)
    io: Future
    started: float


@dataclass
class _Plan:
    """A batch waiting for a transfer slot: its tier slots are already allocated (offload) or held (onboard)."""

    ticket: Ticket
    direction: str
    positions: list[int]
    slots: list[int]


def _done_handle(num_blocks: int, nbytes: int, error: BaseException | None = None) -> TransferHandle:
    """A completed handle (CPU copies run synchronously)."""
    return TransferHandle(path="cpu", num_blocks=num_blocks, nbytes=nbytes, error=error)


def _as_ids(name: str, ids: Sequence[int], limit: int) -> list[int]:
    """Validate block ids: ints in [0, limit), distinct."""
    try:
        out = [operator.index(i) for i in ids]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {ids!r}") from None
    bad = [i for i in out if not 0 <= i < limit]
    if bad:
        raise IndexError(f"{name} holds {bad[0]}, out of range for a cache of {limit} blocks [0, {limit})")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must be distinct, got duplicates in {out}")
    return out


def _as_hashes(seq_hashes: Sequence[int]) -> list[int]:
    """Validate sequence hashes: ints in [0, 2**64)."""
    try:
        out = [operator.index(h) for h in seq_hashes]
    except TypeError:
        raise TypeError(f"seq_hashes must be a sequence of int hashes, got {seq_hashes!r}") from None
    for h in out:
        if not 0 <= h < 2**64:
            raise ValueError(f"seq_hashes must be in [0, 2**64), got {h}")
    return out


class BlockManager:
    """Offload tiers G2 (host) and G3 (disk) for one engine cache G1 (see the module docstring)."""

    def __init__(self, gpu_cache: PagedKVCache, config: KvbmConfig, *, metrics: KvbmMetrics | None = None,
                 disk_filter: DiskAdmissionFilter | None = None) -> None:
        """Size and allocate the tiers from ``config`` (validated with ``check_fits`` first).

        ``gpu_cache`` is the engine's cache (on CPU for tests and CPU engines); ``metrics`` defaults to a private
        ``KvbmMetrics``, served on ``DYN_KVBM_METRICS_PORT`` while the manager is open when ``DYN_KVBM_METRICS`` is
        true (a ``metrics`` object passed in is served by its owner); ``disk_filter`` defaults to KVBM's filter (disabled by
        ``DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER``). Raises KvbmConfigError when no tier is configured or a tier
        does not fit.
        """
        if not isinstance(gpu_cache, PagedKVCache):
            raise TypeError(f"gpu_cache must be a PagedKVCache, got {type(gpu_cache).__name__}")
        if not isinstance(config, KvbmConfig):
            raise TypeError(f"config must be a KvbmConfig, got {type(config).__name__}")
        if not (config.host_enabled or config.disk_enabled):
            raise KvbmConfigError("no offload tier configured: set DYN_KVBM_CPU_CACHE_GB and/or "
                                  "DYN_KVBM_DISK_CACHE_GB (or their *_OVERRIDE_NUM_BLOCKS)")
        self.gpu = gpu_cache
        self.config = config
        self.geometry = gpu_cache.geometry
        self.block_bytes = self.geometry.block_bytes
        self.metrics = metrics if metrics is not None else KvbmMetrics()
        self._serving = metrics is None and config.metrics
        self.filter = disk_filter if disk_filter is not None else DiskAdmissionFilter(
            enabled=not config.disable_disk_offload_filter)
        self.batch_size = config.max_transfer_batch_size
        self.max_in_flight = config.max_concurrent_transfers
        slot_bytes = align_up(self.block_bytes)
        config.check_fits(self.block_bytes, disk_bytes_per_block=slot_bytes)
        host_blocks, disk_blocks = config.resolve_num_blocks(self.block_bytes, disk_bytes_per_block=slot_bytes)

        self.host: HostTier | None = None
        self.disk: DiskTier | None = None
        self.bounce: BounceBuffer | None = None
        self._engine = None
        self._disk_io: ThreadPoolExecutor | None = None
        try:
            if gpu_cache.device.type == "cuda":
                from kvbm.kernels.transfer import TransferEngine

                self._engine = TransferEngine(gpu_cache.device)
                self._side_stream = torch.cuda.Stream(gpu_cache.device)
            if host_blocks:
                self.host = HostTier(self.geometry, gpu_cache.dtype, host_blocks)
            if disk_blocks:
                probe = probe_gds()
                if probe.available:
                    log.warning("GPUDirect Storage is available here, but the G3 tier has only its O_DIRECT POSIX "
                                "path through pinned bounce buffers so far: using that")
                log.info("G3 disk tier in %s: I/O path posix-o-direct%s (GDS probe: %s)", config.disk_cache_dir,
                         "" if not config.disk_disable_o_direct else " with O_DIRECT disabled", probe.reason)
                self.disk = DiskTier(str(config.disk_cache_dir), disk_blocks, self.block_bytes,
                                     use_o_direct=not config.disk_disable_o_direct,
                                     zerofill_fallback=config.disk_zerofill_fallback)
                self.bounce = BounceBuffer(self.geometry, gpu_cache.dtype, config.bounce_chunks(), self.batch_size)
                self._cascade_chunk = self.bounce.acquire()
                self._disk_io = ThreadPoolExecutor(DISK_IO_THREADS, thread_name_prefix="kvbm-disk")
            if self._serving:
                port = self.metrics.start_server(config.metrics_port)
                log.info("kvbm metrics served on port %d", port)
        except BaseException:
            self._release_storage()
            raise
        log.info("block manager: G2 %d blocks, G3 %d blocks of %d bytes%s; batches of %d, %d in flight",
                 host_blocks, disk_blocks, self.block_bytes, " (disk-only mode)" if config.disk_only else "",
                 self.batch_size, self.max_in_flight)
        self._queue: deque[_Plan] = deque()
        self._in_flight: list[_Batch] = []
        self._finished: list[Ticket] = []
        self._cascade: dict[int, int] = {}  # G2 hash -> its (held) G2 slot, admitted to G3, in admission order
        self._bad_g3: set[int] = set()  # G3 slots that failed a read, dropped once unheld
        self._cascading: list[_CascadeWrite] = []  # G2 -> G3 writes in flight
        self._closed = False

    # -- public API ------------------------------------------------------------------------------------------

    def sequence_hashes(self, tokens: Sequence[int], cache_salt: str | None = None,
                        lora_name: str | None = None) -> list[int]:
        """Sequence hashes of the full blocks of ``tokens`` (KVBM-compatible, salted by cache salt and LoRA)."""
        return sequence_hashes(tokens, self.geometry.block_size, salt_hash(cache_salt, lora_name))

    def offload(self, seq_hashes: Sequence[int], gpu_block_ids: Sequence[int], priority: int = 0) -> Ticket:
        """Copy G1 blocks ``gpu_block_ids`` (holding ``seq_hashes``) to G2, or to G3 in disk-only mode.

        Blocks already stored (or on their way), repeated in the call, below
        ``DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY``, or finding every slot busy are SKIPPED. The blocks become
        visible to ``lookup`` when ``poll`` finishes their batch.
        """
        self._check_open()
        hashes, gpu_ids = self._block_pairs(seq_hashes, gpu_block_ids)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {type(priority).__name__} {priority!r}")
        # One open "batch" stands for the planning itself: the ticket cannot finish while batches are added.
        ticket = Ticket("offload", hashes, gpu_ids, [BlockResult.PENDING] * len(hashes), _open_batches=1)
        tier = self.host if self.host is not None else self.disk
        direction = "g1_to_g2" if tier is self.host else "g1_to_g3"
        part: list[tuple[int, int]] = []  # (position, slot) of the batch being built
        seen: set[int] = set()
        for i, h in enumerate(hashes):
            reason = None
            if priority < self.config.host_offload_prefix_min_priority:
                reason = (f"priority {priority} is below DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY="
                          f"{self.config.host_offload_prefix_min_priority}")
            elif h in seen or tier.pool.contains(h):
                reason = f"already stored in {tier.name}"
            else:
                alloc = tier.pool.allocate(h, priority)
                if alloc is None and (part or self._in_flight or self._queue or self._cascading or self._cascade):
                    # Every slot is pending or held: plan what is built, let the oldest batch land, retry.
                    if part:
                        self._plan(ticket, direction, part)
                        part = []
                    while alloc is None and (self._in_flight or self._queue or self._cascading or self._cascade):
                        self._run_cascade()  # admitted blocks are held in G2 until written to G3
                        self._finish_oldest()
                        alloc = tier.pool.allocate(h, priority)
                if alloc is None:
                    reason = f"{tier.name} is full: every block is being read"
                else:
                    part.append((i, alloc.slot))
                    if len(part) == self.batch_size:
                        self._plan(ticket, direction, part)
                        part = []
            seen.add(h)
            if reason is not None:
                ticket.results[i] = BlockResult.SKIPPED
                ticket.reasons[i] = reason
        if part:
            self._plan(ticket, direction, part)
        ticket._open_batches -= 1
        self._settle(ticket)
        return ticket

    def poll(self) -> list[Ticket]:
        """Finish every batch whose copy has completed (never blocks on the GPU), start queued batches in the
        freed transfer slots, cascade admitted G2 blocks to G3, and return the tickets finished since the last
        call."""
        self._check_open()
        while True:
            ready = [b for b in self._in_flight if self._ready(b)]
            for batch in ready:
                self._advance(batch)
            if not self._launch_queued() and not ready:
                break
        self._collect_cascades(block=False)
        self._run_cascade()
        finished, self._finished = self._finished, []
        return finished

    def wait(self, ticket: Ticket | None = None) -> list[Ticket]:
        """Block until ``ticket`` (default: every batch queued or in flight, and the G2 -> G3 writes they lead
        to) is done, then ``poll``."""
        self._check_open()
        while (self._in_flight or self._queue) and (ticket is None or not ticket.done):
            self._finish_oldest()
        if ticket is None:
            self._run_cascade()
            while self._cascading:
                self._collect_cascades(block=True)
                self._run_cascade()
        return self.poll()

    def lookup(self, seq_hashes: Sequence[int], *, num_tokens: int | None = None) -> Match:
        """Longest stored prefix of ``seq_hashes``: blocks in G2 first, then G3 from where G2 stopped.

        When the whole prompt matched, the last block is not reported (the engine must compute at least one
        token). ``num_tokens`` is the prompt's length: when it goes past the full blocks, a match of every full
        block is not a whole-prompt match. Call once per request: it feeds the hit-rate window and the filter.
        """
        self._check_open()
        self._collect_cascades(block=False)  # G2 -> G3 writes that landed since the last poll count
        hashes = _as_hashes(seq_hashes)
        n = 0
        if self.host is not None:
            while n < len(hashes) and self.host.pool.lookup(hashes[n]) is not None:
                self._hit(hashes[n])
                n += 1
        host_hits = n
        if self.disk is not None:
            while n < len(hashes) and self.disk.pool.lookup(hashes[n]) is not None:
                n += 1
        disk_hits = n - host_hits
        whole = num_tokens is None or num_tokens <= len(hashes) * self.geometry.block_size
        if n and n == len(hashes) and whole:
            if disk_hits:
                disk_hits -= 1
            else:
                host_hits -= 1
        self.metrics.record_request_lookup(len(hashes), host_hits, disk_hits)
        self.metrics.record_matched_tokens((host_hits + disk_hits) * self.geometry.block_size)
        return Match(host_hits + disk_hits, host_hits, disk_hits)

    def onboard(self, seq_hashes: Sequence[int], gpu_block_ids: Sequence[int]) -> Ticket:
        """Load stored blocks ``seq_hashes`` into G1 blocks ``gpu_block_ids``: from G2 when there, else from G3.

        A block found in neither tier, or whose read or copy fails, is FAILED; a failed block's G1 bytes are not
        written by a failed disk read (the bounce buffer takes them) and the block is never reported OK.
        """
        self._check_open()
        hashes, gpu_ids = self._block_pairs(seq_hashes, gpu_block_ids)
        # One open "batch" stands for the planning itself: the ticket cannot finish while batches are added.
        ticket = Ticket("onboard", hashes, gpu_ids, [BlockResult.PENDING] * len(hashes), _open_batches=1)
        from_host: list[tuple[int, int]] = []
        from_disk: list[tuple[int, int]] = []
        for i, h in enumerate(hashes):
            slot = self.host.pool.lookup(h) if self.host is not None else None
            if slot is not None:
                self.host.pool.hold(slot)
                from_host.append((i, slot))
                continue
            slot = self.disk.pool.lookup(h) if self.disk is not None else None
            if slot is not None:
                self.disk.pool.hold(slot)
                from_disk.append((i, slot))
                continue
            ticket.results[i] = BlockResult.FAILED
            ticket.reasons[i] = "block is in no tier (never stored, or evicted)"
        for direction, blocks in (("g2_to_g1", from_host), ("g3_to_g1", from_disk)):
            for start in range(0, len(blocks), self.batch_size):
                self._plan(ticket, direction, blocks[start:start + self.batch_size])
        ticket._open_batches -= 1
        self._settle(ticket)
        return ticket

    def _block_pairs(self, seq_hashes: Sequence[int], gpu_block_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Checked (hashes, G1 block ids) of an offload or onboard call, equal in length."""
        hashes = _as_hashes(seq_hashes)
        gpu_ids = _as_ids("gpu_block_ids", gpu_block_ids, self.gpu.num_blocks)
        if len(hashes) != len(gpu_ids):
            raise ValueError(f"seq_hashes and gpu_block_ids must have the same length, got {len(hashes)} and "
                             f"{len(gpu_ids)}")
        return hashes, gpu_ids

    def check_invariants(self) -> None:
        """Verify pools, holds, pending slots and bounce chunks against the planned batches (O(size), for tests)."""
        tiers = [t for t in (self.host, self.disk) if t is not None]
        for tier in tiers:
            tier.pool.check_invariants()
        pending: dict[str, set[int]] = {"G2": set(), "G3": set()}
        reading: dict[str, Counter[int]] = {"G2": Counter(), "G3": Counter()}
        chunks: list[int] = []
        for b in [*self._in_flight, *self._queue]:
            tier_name = "G2" if b.direction in ("g1_to_g2", "g2_to_g1") else "G3"
            if b.direction.startswith("g1_to"):
                pending[tier_name].update(b.slots)
            else:
                reading[tier_name].update(b.slots)
            if isinstance(b, _Batch) and b.chunk is not None:
                chunks.append(b.chunk)
        for c in self._cascading:
            for _, g2_slot, g3_slot in c.part:
                pending["G3"].add(g3_slot)
                reading["G2"][g2_slot] += 1
        reading["G2"].update(self._cascade.values())  # admitted to G3, held until written
        for tier in tiers:
            pool = tier.pool
            held_slots = 0
            for slot in range(pool.num_blocks):
                held = pool.holds(slot)
                held_slots += held > 0
                if held != reading[tier.name][slot]:
                    raise ManagerInvariantError(f"{tier.name} slot {slot}: pool has {held} holds, batches "
                                                f"queued or in flight read it {reading[tier.name][slot]} times")
            for slot in pending[tier.name]:
                if pool.hash_of(slot) is None or pool.holds(slot):
                    raise ManagerInvariantError(f"{tier.name} slot {slot} is written by a planned batch but is "
                                                f"free or held in the pool")
            num_pending = pool.num_blocks - pool.num_free() - pool.num_evictable() - held_slots
            if num_pending != len(pending[tier.name]):
                raise ManagerInvariantError(f"{tier.name} has {num_pending} pending slots, planned batches write "
                                            f"{len(pending[tier.name])}")
        if any(not reading["G3"][slot] for slot in self._bad_g3):
            raise ManagerInvariantError(f"G3 slots {sorted(self._bad_g3)} failed a read but were not dropped")
        if self.bounce is not None:
            if len(set(chunks)) != len(chunks) or self._cascade_chunk in chunks:
                raise ManagerInvariantError(f"a bounce chunk is used by two batches: {chunks}")
            if self.bounce.num_free() + len(chunks) + 1 != self.bounce.num_chunks:
                raise ManagerInvariantError(f"bounce chunks leaked: {self.bounce.num_free()} free + {len(chunks)} in "
                                            f"flight + 1 cascade != {self.bounce.num_chunks}")
        if len(self._in_flight) > self.max_in_flight:
            raise ManagerInvariantError(f"{len(self._in_flight)} batches in flight, limit {self.max_in_flight}")

    def close(self) -> None:
        """Finish every batch in flight, then free host memory and delete the disk file (idempotent)."""
        if self._closed:
            return
        while self._in_flight or self._queue:
            self._finish_oldest()
        while self._cascading:
            self._collect_cascades(block=True)
        self._closed = True
        self._release_storage()

    def __enter__(self) -> BlockManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transfers -------------------------------------------------------------------------------------------

    def _copy(self, src: PagedKVCache, dst: PagedKVCache, src_ids: list[int], dst_ids: list[int]) -> TransferHandle:
        """Start copying blocks between G1 and a host cache; errors are captured in the handle, never raised."""
        n = len(src_ids)
        if self._engine is None:
            try:
                copy_blocks(src, dst, src_ids, dst_ids)
            except Exception as e:  # noqa: BLE001 - reported per block through the ticket
                return _done_handle(n, n * self.block_bytes, e)
            return _done_handle(n, n * self.block_bytes)
        host = dst if src is self.gpu else src
        if host.name != PADDED_LAYOUT:
            try:
                move = self._engine.offload if src is self.gpu else self._engine.onboard
                return move(src, dst, src_ids, dst_ids)
            except Exception as e:  # noqa: BLE001 - bad input caught before anything was enqueued
                return _done_handle(n, n * self.block_bytes, e)
        # A padded bounce buffer is not dense: the copy kernel reads/writes it over UVA on a side stream.
        handle = TransferHandle(path="zero_copy", num_blocks=n, nbytes=n * self.block_bytes)
        try:
            self._side_stream.wait_stream(torch.cuda.current_stream(self.gpu.device))
            with torch.cuda.stream(self._side_stream):
                copy_blocks(src, dst, src_ids, dst_ids, backend="triton")
                handle.event = torch.cuda.Event()
                handle.event.record(self._side_stream)
        except Exception as e:  # noqa: BLE001
            handle.error = e
        return handle

    def _plan(self, ticket: Ticket, direction: str, part: list[tuple[int, int]]) -> None:
        """Queue one batch of (position in ticket, tier slot) pairs and start it if a transfer slot is free."""
        ticket._open_batches += 1
        self._queue.append(_Plan(ticket, direction, [p for p, _ in part], [s for _, s in part]))
        self._launch_queued()

    def _launch_queued(self) -> int:
        """Start queued batches while fewer than ``max_in_flight`` are in flight; return how many started."""
        started = 0
        while self._queue and len(self._in_flight) < self.max_in_flight:
            batch = self._start(self._queue.popleft())
            if batch.io is None and batch.handle.done():
                batch.elapsed = time.perf_counter() - batch.started
            self._in_flight.append(batch)
            started += 1
        return started

    def _start(self, plan: _Plan) -> _Batch:
        """Start a planned batch: its copy (G1 <-> G2, G1 -> bounce chunk, then the G3 write on a disk thread), or
        for G3 -> G1 the read of its slots into a bounce chunk on a disk thread (the copy follows in ``_advance``)."""
        started = time.perf_counter()
        gpu_ids = [plan.ticket.gpu_block_ids[p] for p in plan.positions]
        chunk = None if plan.direction in ("g1_to_g2", "g2_to_g1") else self._acquire_chunk()
        io = None
        if plan.direction == "g1_to_g2":
            handle = self._copy(self.gpu, self.host.cache, gpu_ids, plan.slots)
        elif plan.direction == "g2_to_g1":
            handle = self._copy(self.host.cache, self.gpu, plan.slots, gpu_ids)
        elif plan.direction == "g1_to_g3":
            ids = self.bounce.block_ids(chunk, len(gpu_ids))
            handle = self._copy(self.gpu, self.bounce.cache, gpu_ids, ids)
            io = self._disk_io.submit(self._write_after_copy, handle, plan.slots, ids)
        else:  # g3_to_g1
            handle = _done_handle(0, 0)  # replaced by the copy once the read is done
            io = self._disk_io.submit(self.disk.file.read_slots, plan.slots, self.bounce.array,
                                      buf_blocks=self.bounce.block_ids(chunk, len(gpu_ids)))
        return _Batch(plan.ticket, plan.direction, plan.positions, plan.slots, handle, started, chunk, io=io)

    def _write_after_copy(self, handle: TransferHandle, slots: list[int], buf_blocks: list[int]):
        """Disk thread: wait for the G1 -> bounce copy, then write its blocks to their G3 slots (None if the copy
        failed; ``_finish`` reports that)."""
        if handle.event is not None and handle.error is None:
            handle.event.synchronize()
        if handle.error is not None:
            return None
        return self.disk.file.write_slots(slots, self.bounce.array, buf_blocks=buf_blocks)

    @staticmethod
    def _ready(batch: _Batch) -> bool:
        """Whether a batch's current step (disk I/O, else its copy) has finished; never blocks."""
        return batch.io.done() if batch.io is not None else batch.handle.done()

    def _advance(self, batch: _Batch) -> None:
        """Move a ready batch on: a finished G3 read starts the copy of the slots read intact into G1; any other
        ready batch is finished."""
        if batch.direction != "g3_to_g1" or batch.io is None:
            self._finish(batch)
            return
        io, batch.io = batch.io, None
        try:
            read_errors = {s: str(e) for s, e in io.result().errors.items()}
        except Exception as e:  # noqa: BLE001 - the read as a whole failed: every block of the batch fails
            read_errors = {s: repr(e) for s in batch.slots}
        batch.read_errors = {k: read_errors[s] for k, s in enumerate(batch.slots) if s in read_errors}
        ids = self.bounce.block_ids(batch.chunk, len(batch.slots))
        good = [k for k in range(len(ids)) if k not in batch.read_errors]
        if good:
            gpu_ids = [batch.ticket.gpu_block_ids[batch.positions[k]] for k in good]
            batch.handle = self._copy(self.bounce.cache, self.gpu, [ids[k] for k in good], gpu_ids)

    def _finish_oldest(self) -> None:
        """Wait for the oldest batch in flight (else the oldest G2 -> G3 write) and finish it, then start queued
        batches."""
        if self._in_flight:
            batch = self._in_flight[0]
            while batch in self._in_flight:
                if batch.io is not None:
                    wait_futures([batch.io])
                elif batch.handle.event is not None and batch.handle.error is None:
                    batch.handle.event.synchronize()
                self._advance(batch)
        elif self._cascading:
            self._collect_cascades(block=True)
        self._launch_queued()

    def _finish(self, batch: _Batch) -> None:
        """Account a batch whose copy completed: commit or discard slots, release holds and chunks, set results."""
        self._in_flight.remove(batch)
        t0 = time.perf_counter()
        copy_error = None if batch.handle.ok else f"transfer failed: {batch.handle.error!r}"
        errors: dict[int, str] = {}  # index into batch.positions -> reason
        if batch.direction == "g1_to_g2":
            for k, slot in enumerate(batch.slots):
                if copy_error is None:
                    self.host.pool.commit(slot)
                    self._registered(batch.ticket.seq_hashes[batch.positions[k]])
                else:
                    self.host.pool.discard(slot)
                    errors[k] = copy_error
        elif batch.direction == "g1_to_g3":
            if copy_error is None:
                try:
                    res = batch.io.result()
                except Exception as e:  # noqa: BLE001 - the write as a whole failed
                    errors = {k: f"disk write failed: {e!r}" for k in range(len(batch.slots))}
                else:
                    errors = {k: f"disk write failed: {res.errors[s]}" for k, s in enumerate(batch.slots)
                              if s in res.errors}
            else:
                errors = {k: copy_error for k in range(len(batch.slots))}
            for k, slot in enumerate(batch.slots):
                (self.disk.pool.discard if k in errors else self.disk.pool.commit)(slot)
        elif batch.direction == "g2_to_g1":
            for slot in batch.slots:
                self._release(self.host, slot)
            if copy_error is not None:
                errors = {k: copy_error for k in range(len(batch.slots))}
        else:  # g3_to_g1
            errors = {k: f"disk read failed: {e}" for k, e in batch.read_errors.items()}
            if copy_error is not None:
                errors.update({k: copy_error for k in range(len(batch.slots)) if k not in errors})
            for k, slot in enumerate(batch.slots):
                if k in batch.read_errors:
                    self._bad_g3.add(slot)
                self._release(self.disk, slot)
        if batch.chunk is not None:
            self.bounce.release(batch.chunk)
        ticket = batch.ticket
        for k, pos in enumerate(batch.positions):
            if k in errors:
                ticket.results[pos] = BlockResult.FAILED
                ticket.reasons[pos] = errors[k]
            else:
                ticket.results[pos] = BlockResult.OK
        n_ok = len(batch.positions) - len(errors)
        elapsed = (batch.elapsed if batch.elapsed is not None else t0 - batch.started) + time.perf_counter() - t0
        self.metrics.record_transfer(batch.direction, blocks_ok=n_ok, blocks_failed=len(errors),
                                     num_bytes=n_ok * self.block_bytes, seconds=elapsed)
        for k in errors:
            log.debug("%s of block %#x failed: %s", batch.direction, ticket.seq_hashes[batch.positions[k]],
                      errors[k])
        ticket._open_batches -= 1
        self._settle(ticket)

    def _settle(self, ticket: Ticket) -> None:
        """Queue a ticket for ``poll`` once its last batch finished."""
        if ticket.done:
            self._finished.append(ticket)

    # -- G2 -> G3 cascade ------------------------------------------------------------------------------------

    def _registered(self, seq_hash: int) -> None:
        """A block was committed to G2: its first sighting for the admission filter."""
        if self.disk is not None and self.filter.admit(seq_hash):
            self._admit(seq_hash)

    def _hit(self, seq_hash: int) -> None:
        """A lookup found a block in G2: count the hit and queue it for G3 if the filter now admits it."""
        if self.disk is None:
            return
        self.filter.record_hit(seq_hash)
        if self.filter.admit(seq_hash):
            self._admit(seq_hash)

    def _admit(self, seq_hash: int) -> None:
        """Queue a G2 block for G3, holding its G2 slot so it cannot be evicted before it is written."""
        if seq_hash in self._cascade or self.disk.pool.contains(seq_hash):
            return
        slot = self.host.pool.lookup(seq_hash)
        if slot is not None:
            self.host.pool.hold(slot)
            self._cascade[seq_hash] = slot

    def _run_cascade(self) -> None:
        """Start background writes of the admitted G2 blocks not yet in G3, in batches, while fewer than
        ``max_in_flight`` are in flight (one at a time through the bounce chunk when slots are padded)."""
        limit = 1 if self.bounce is not None and self.bounce.padded else self.max_in_flight
        while self._cascade and len(self._cascading) < limit:
            part: list[tuple[int, int, int]] = []  # (hash, g2 slot, g3 slot)
            while self._cascade and len(part) < self.batch_size:
                h = next(iter(self._cascade))
                g2_slot = self._cascade.pop(h)
                alloc = None if self.disk.pool.contains(h) else self.disk.pool.allocate(h)
                if alloc is None:
                    if not self.disk.pool.contains(h):
                        log.debug("G3 full (every block busy): block %#x not written to disk", h)
                    self._release(self.host, g2_slot)
                    continue
                part.append((h, g2_slot, alloc.slot))
            if part:
                io = self._disk_io.submit(self._write_cascade, [p[1] for p in part], [p[2] for p in part])
                self._cascading.append(_CascadeWrite(part, io, time.perf_counter()))

    def _write_cascade(self, g2_slots: list[int], g3_slots: list[int]) -> dict[int, str]:
        """Disk thread: write G2 slots to G3 slots (through the bounce chunk when padded); G3 slot -> error."""
        if self.bounce.padded:
            ids = self.bounce.block_ids(self._cascade_chunk, len(g2_slots))
            try:
                copy_blocks(self.host.cache, self.bounce.cache, g2_slots, ids)
            except Exception as e:  # noqa: BLE001 - the blocks stay in G2 only
                return {s: f"copy into the disk bounce buffer failed: {e!r}" for s in g3_slots}
            res = self.disk.file.write_slots(g3_slots, self.bounce.array, buf_blocks=ids)
        else:
            res = self.disk.file.write_slots(g3_slots, self.host.array, buf_blocks=g2_slots)
        return {s: str(res.errors[s]) for s in g3_slots if s in res.errors}

    def _collect_cascades(self, block: bool) -> None:
        """Commit (or discard) the G3 slots of finished G2 -> G3 writes and release their G2 holds; with ``block``,
        wait for the oldest first."""
        if block and self._cascading:
            wait_futures([self._cascading[0].io])
        for c in [c for c in self._cascading if c.io.done()]:
            self._cascading.remove(c)
            try:
                errors = c.io.result()
            except Exception as e:  # noqa: BLE001 - the write as a whole failed
                errors = {g3_slot: f"disk write failed: {e!r}" for _, _, g3_slot in c.part}
            for _, g2_slot, g3_slot in c.part:
                (self.disk.pool.discard if g3_slot in errors else self.disk.pool.commit)(g3_slot)
                self._release(self.host, g2_slot)
            for slot, e in errors.items():
                log.debug("G2 -> G3 write of slot %d failed: %s", slot, e)
            n_ok = len(c.part) - len(errors)
            self.metrics.record_transfer("g2_to_g3", blocks_ok=n_ok, blocks_failed=len(errors),
                                         num_bytes=n_ok * self.block_bytes, seconds=time.perf_counter() - c.started)

    # -- holds, chunks, lifetime -----------------------------------------------------------------------------

    def _release(self, tier: HostTier | DiskTier, slot: int) -> None:
        """Drop a hold; a G3 slot that failed a read is dropped from G3 once nothing holds it."""
        tier.pool.release(slot)
        if tier is self.disk and slot in self._bad_g3 and not tier.pool.holds(slot):
            self._bad_g3.discard(slot)
            tier.pool.discard(slot)

    def _acquire_chunk(self) -> int:
        chunk = self.bounce.acquire()
        if chunk is None:  # cannot happen while batches in flight <= chunks - 1
            raise ManagerInvariantError("no free bounce chunk although a batch slot is free")
        return chunk

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this BlockManager is closed")

    def _release_storage(self) -> None:
        if self._disk_io is not None:
            self._disk_io.shutdown(wait=True)
        if self._serving:
            self.metrics.stop_server()
        for part in (self.disk, self.bounce, self.host):
            if part is not None:
                part.close()
