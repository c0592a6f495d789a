"""The block manager: a leader (block index and policies) and a worker (the tiers' memory) joined in one process.

Standalone use, no engine (the connectors split the same two halves across the engine's scheduler and workers)::

    mgr = BlockManager(gpu_cache, KvbmConfig.from_env())
    hashes = mgr.sequence_hashes(tokens)                 # full blocks only
    t = mgr.offload(hashes, gpu_block_ids)               # write-through G1 -> G2 (G1 -> G3 in disk-only mode)
    mgr.poll()                                           # finished tickets; commits blocks, cascades G2 -> G3
    m = mgr.lookup(hashes)                               # Match(num_blocks, host_hits, disk_hits)
    t = mgr.onboard(hashes[:m.num_blocks], free_gpu_ids) # from G2, else G3
    mgr.wait(t); t.results                               # per block: OK / FAILED / SKIPPED
    mgr.close()                                          # removes the disk file

Every call is planned by the leader (`kvbm.leader.BlockIndex`) as moves between named tiers, which the worker's
store (`kvbm.worker.BlockStore`) executes through the transfer library; ``poll`` hands the store's results back to
the index (commit, discard, release, drop) and starts the cascades that follow. Offload, onboard and the cascade
are written once over the ordered tier list, so a further tier is one more entry in it (see ``tiers=``).
Moves are batches of at most ``DYN_KVBM_MAX_TRANSFER_BATCH_SIZE`` blocks, at most
``DYN_KVBM_MAX_CONCURRENT_TRANSFERS`` in flight; ``offload`` and ``onboard`` never block, except an offload that
finds every slot of its tier pending or held: it waits for the oldest move to land. A failed read or copy is
reported per block and never counted as success; a block whose stored bytes a read found bad is dropped.

The engine's side of the contract: G1 blocks passed to ``offload`` are not overwritten, and G1 blocks passed to
``onboard`` are not used, until their ticket is done. Not thread-safe: one thread drives a manager.
"""
from __future__ import annotations

import enum
import logging
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvbm.config import KvbmConfig, KvbmConfigError
from kvbm.hashing import salt_hash, sequence_hashes
from kvbm.kernels.disk_file import align_up
from kvbm.kernels.medium import Medium, medium_of
from kvbm.layouts import PagedKVCache
from kvbm.leader import ENGINE_TIER, BlockIndex, Move, MoveResult
from kvbm.leader.index import as_hashes
from kvbm.metrics import KvbmMetrics
from kvbm.policies.admission import DiskAdmissionFilter
from kvbm.policies.cost import LoadCostPolicy
from kvbm.tiers import HOST_TIER, TierSpec, kvbm_tiers
from kvbm.worker.store import BlockStore

__all__ = ["BlockManager", "BlockResult", "Match", "Ticket", "ManagerInvariantError"]

log = logging.getLogger(__name__)

class ManagerInvariantError(RuntimeError):
    """The manager's bookkeeping disagrees with its index or store (a bug)."""


class BlockResult(enum.Enum):
    """Outcome of one block of a ticket."""

    PENDING = "pending"  #: its move is still in flight
    OK = "ok"  #: stored (offload) or loaded into G1 byte-exact (onboard)
    FAILED = "failed"  #: the transfer or I/O failed; for an onboard, the G1 block must be recomputed
    SKIPPED = "skipped"  #: nothing to do or no room (already stored, below the priority floor, tier full)


@dataclass(frozen=True)
class Match:
    """Result of a prefix lookup: the first ``num_blocks`` blocks can be onboarded, ``host_hits`` of them from G2
    and then ``disk_hits`` from G3 (further tiers count as disk)."""

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
    _open_moves: int = field(default=0, repr=False)
    _reported: bool = field(default=False, repr=False)

    @property
    def done(self) -> bool:
        """True once every block has its final result."""
        return self._open_moves == 0

    @property
    def ok_blocks(self) -> list[int]:
        """Indices (into ``seq_hashes``) of the blocks that succeeded."""
        return [i for i, r in enumerate(self.results) if r is BlockResult.OK]

    @property
    def failed_blocks(self) -> list[int]:
        """Indices of the blocks that failed."""
        return [i for i, r in enumerate(self.results) if r is BlockResult.FAILED]


def _as_ids(name: str, ids: Sequence[int], limit: int) -> list[int]:
    """Validate block ids: ints (not bools) in [0, limit), distinct."""
    out = []
    for i in ids:
        if isinstance(i, bool):
            raise TypeError(f"{name} must hold ints, got the bool {i!r}")
        try:
            out.append(operator.index(i))
        except TypeError:
            raise TypeError(f"{name} must be a sequence of ints, got {ids!r}") from None
    bad = [i for i in out if not 0 <= i < limit]
    if bad:
        raise IndexError(f"{name} holds {bad[0]}, out of range for a cache of {limit} blocks [0, {limit})")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must be distinct, got duplicates in {out}")
    return out


class BlockManager:
    """Offload tiers (G2 host, G3 disk by default) for one engine cache G1 (see the module docstring)."""

    def __init__(self, gpu_cache: PagedKVCache, config: KvbmConfig, *, metrics: KvbmMetrics | None = None,
                 disk_filter: DiskAdmissionFilter | None = None,
                 tiers: Sequence[TierSpec] | None = None, cost: LoadCostPolicy | None = None) -> None:
        """Size and allocate the tiers from ``config`` (validated with ``check_fits`` first), or take ``tiers``
        (in order; blocks enter the first, the tiers below it admit through ``disk_filter``) as given.

        ``gpu_cache`` is the engine's cache (on CPU for tests and CPU engines); ``metrics`` defaults to a private
        ``KvbmMetrics``, served on ``DYN_KVBM_METRICS_PORT`` while the manager is open when ``DYN_KVBM_METRICS`` is
        true (a ``metrics`` object passed in is served by its owner); ``disk_filter`` defaults to KVBM's filter
        (disabled by ``DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER``); ``cost`` defaults to the cost-aware hit rule of
        ``config``, which learns load bandwidths from the store's transfers. Raises KvbmConfigError when no tier is
        configured or a tier does not fit.
        """
        if not isinstance(gpu_cache, PagedKVCache):
            raise TypeError(f"gpu_cache must be a PagedKVCache, got {type(gpu_cache).__name__}")
        if not isinstance(config, KvbmConfig):
            raise TypeError(f"config must be a KvbmConfig, got {type(config).__name__}")
        medium_of(gpu_cache)  # a cache on an unsupported device (meta, ...) is refused here
        if gpu_cache.device.type not in ("cuda", "cpu"):
            raise ValueError(f"gpu_cache must be on a CUDA or CPU device, got {gpu_cache.device}")
        self.gpu = gpu_cache
        self.config = config
        self.geometry = gpu_cache.geometry
        self.block_bytes = self.geometry.block_bytes
        self.metrics = metrics if metrics is not None else KvbmMetrics()
        self._serving = metrics is None and config.metrics
        self.filter = disk_filter if disk_filter is not None else DiskAdmissionFilter(
            enabled=not config.disable_disk_offload_filter)
        if tiers is None:
            if not (config.host_enabled or config.disk_enabled):
                raise KvbmConfigError("no offload tier configured: set DYN_KVBM_CPU_CACHE_GB and/or "
                                      "DYN_KVBM_DISK_CACHE_GB (or their *_OVERRIDE_NUM_BLOCKS)")
            config.check_fits(self.block_bytes, disk_bytes_per_block=align_up(self.block_bytes))
            tiers = kvbm_tiers(config, self.block_bytes)
        if not tiers:
            raise KvbmConfigError("no offload tier configured")
        self.index = BlockIndex([t.index_config(self.filter if k else None) for k, t in enumerate(tiers)],
                                batch_size=config.max_transfer_batch_size,
                                min_priority=config.host_offload_prefix_min_priority)
        self.cost = cost if cost is not None else LoadCostPolicy.from_config(
            config, self.index.tier_names, block_bytes=self.block_bytes, block_tokens=self.geometry.block_size,
            metrics=self.metrics)
        self.store = BlockStore.open(gpu_cache, tiers, config, metrics=self.metrics)
        try:
            if self._serving:
                port = self.metrics.start_server(config.metrics_port, host=config.metrics_host)
                log.info("kvbm metrics served on port %d", port)
        except BaseException:
            self.store.close()
            raise
        caches = self.store.caches
        self._tickets: dict[int, tuple[Ticket, list[int]]] = {}  # move id -> (ticket, positions)
        self._loading: Counter[int] = Counter()  # G1 blocks that pending loads write into
        self._finished: list[Ticket] = []
        self._closed = False
        for name, cache in caches.items():
            if medium_of(cache) is Medium.DISK:
                log.info("%s file %s: O_DIRECT %s; GPU <-> disk I/O by DYN_KVBM_DISK_IO=%s (chosen at the first "
                         "transfer: cuFile where it can run, else POSIX through pinned bounce buffers)", name,
                         cache.file.path, "on" if cache.file.o_direct else "off", config.disk_io)
        log.info("block manager: %s; blocks of %d bytes%s; batches of %d, %d in flight",
                 ", ".join(f"{t.name} {t.num_blocks} blocks on {t.medium.value}" for t in tiers), self.block_bytes,
                 " (disk-only mode)" if config.disk_only else "", config.max_transfer_batch_size,
                 config.max_concurrent_transfers)

    # -- public API ------------------------------------------------------------------------------------------

    def sequence_hashes(self, tokens: Sequence[int], cache_salt: str | None = None,
                        lora_name: str | None = None) -> list[int]:
        """Sequence hashes of the full blocks of ``tokens`` (KVBM-compatible, salted by cache salt and LoRA)."""
        return sequence_hashes(tokens, self.geometry.block_size, salt_hash(cache_salt, lora_name))

    def offload(self, seq_hashes: Sequence[int], gpu_block_ids: Sequence[int], priority: int = 0) -> Ticket:
        """Copy G1 blocks ``gpu_block_ids`` (holding ``seq_hashes``) into the first tier.

        Blocks already stored (or on their way), repeated in the call, below
        ``DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY``, finding every slot busy, or held in G1 blocks that a
        pending onboard is still writing (their bytes are not the block's yet) are SKIPPED. The blocks become
        visible to ``lookup`` when ``poll`` finishes their move.
        """
        self._check_open()
        hashes, gpu_ids = self._block_pairs(seq_hashes, gpu_block_ids)
        ticket = Ticket("offload", hashes, gpu_ids, [BlockResult.PENDING] * len(hashes))
        positions = []
        for i, block in enumerate(gpu_ids):
            if self._loading[block]:
                self._settle_block(ticket, i, BlockResult.SKIPPED, f"G1 block {block} is being written by an onboard")
            else:
                positions.append(i)
        while True:
            plan = self.index.plan_store([hashes[i] for i in positions], [gpu_ids[i] for i in positions], priority)
            for local, reason in plan.skipped.items():
                self._settle_block(ticket, positions[local], BlockResult.SKIPPED, reason)
            self._run(ticket, plan.moves, {m: [positions[p] for p in ps] for m, ps in plan.positions.items()})
            positions = [positions[p] for p in plan.busy]
            if not positions or not (self.store.busy or self.index.has_cascades()):
                break
            self._wait_oldest()  # every slot is pending or held: let the oldest move land, then retry
        name = self.index.tier_names[0]
        for i in positions:
            self._settle_block(ticket, i, BlockResult.SKIPPED, f"{name} is full: every block is being read")
        self._settle(ticket)
        return ticket

    def onboard(self, seq_hashes: Sequence[int], gpu_block_ids: Sequence[int]) -> Ticket:
        """Load stored blocks ``seq_hashes`` into G1 blocks ``gpu_block_ids``, each from the first tier holding it.

        A block found in no tier, or whose read or copy fails, is FAILED and never reported OK (the engine
        recomputes it); a failed disk read writes nothing into its G1 block.
        """
        self._check_open()
        hashes, gpu_ids = self._block_pairs(seq_hashes, gpu_block_ids)
        ticket = Ticket("onboard", hashes, gpu_ids, [BlockResult.PENDING] * len(hashes))
        plan = self.index.plan_load(hashes, gpu_ids)
        for i, reason in plan.missing.items():
            self._settle_block(ticket, i, BlockResult.FAILED, reason)
        self._run(ticket, plan.moves, plan.positions)
        self._settle(ticket)
        return ticket

    def poll(self) -> list[Ticket]:
        """Apply every finished move (never blocks on the GPU or the disk), start queued moves and the cascades
        that follow, and return the tickets finished since the last call."""
        self._check_open()
        self._apply(self.store.poll())
        finished, self._finished = self._finished, []
        return finished

    def wait(self, ticket: Ticket | None = None) -> list[Ticket]:
        """Block until ``ticket`` (default: every move, cascades included) is done, then ``poll``."""
        self._check_open()
        while not (ticket.done if ticket is not None else not (self.store.busy or self.index.has_cascades())):
            self._wait_oldest()
        return self.poll()

    def lookup(self, seq_hashes: Sequence[int], *, num_tokens: int | None = None) -> Match:
        """Longest stored prefix of ``seq_hashes``: blocks in G2 first, then G3 from where G2 stopped; a tier's part
        is reported only where loading it is expected to be faster than recomputing it (``self.cost``).

        When the whole prompt matched, the last block is not reported (the engine must compute at least one
        token). ``num_tokens`` is the prompt's length: when it goes past the full blocks, a match of every full
        block is not a whole-prompt match. Call once per request: it feeds the hit-rate window and the filter.
        """
        self._check_open()
        hashes = as_hashes(seq_hashes)
        if num_tokens is not None and (isinstance(num_tokens, bool) or not isinstance(num_tokens, int)
                                       or num_tokens < 0):
            raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
        self._apply(self.store.poll())  # moves that landed since the last poll count
        whole = num_tokens is None or num_tokens <= len(hashes) * self.geometry.block_size
        found = self.cost.decide(self.index.lookup(hashes, whole_prompt=whole).hits)
        by_name = dict(zip(self.index.tier_names, found.hits))
        host = by_name.get(HOST_TIER, 0)
        match = Match(found.num_blocks, host, found.num_blocks - host)
        self.metrics.record_request_lookup(len(hashes), match.host_hits, match.disk_hits)
        self.metrics.record_matched_tokens(match.num_blocks * self.geometry.block_size)
        return match

    def check_invariants(self) -> None:
        """Verify the index against the store and the tickets (O(n), for tests)."""
        self.index.check_invariants()
        open_ids = {m.move_id for m in self.index.open_moves()}
        if set(self._tickets) - open_ids:
            raise ManagerInvariantError(f"tickets wait on moves the index does not know: "
                                        f"{sorted(set(self._tickets) - open_ids)}")

    def close(self) -> None:
        """Finish every move, stop serving metrics and release the tiers (removes the disk file); idempotent."""
        if self._closed:
            return
        try:
            self.store.wait_all()
            self._apply(self.store.poll())
        finally:
            self._closed = True
            self.store.close()
            if self._serving:
                self.metrics.stop_server()

    def __enter__(self) -> BlockManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------------

    def _block_pairs(self, seq_hashes: Sequence[int], gpu_block_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Checked (hashes, G1 block ids) of an offload or onboard call, equal in length."""
        hashes = as_hashes(seq_hashes)
        gpu_ids = _as_ids("gpu_block_ids", gpu_block_ids, self.gpu.num_blocks)
        if len(hashes) != len(gpu_ids):
            raise ValueError(f"seq_hashes and gpu_block_ids must have the same length, got {len(hashes)} and "
                             f"{len(gpu_ids)}")
        return hashes, gpu_ids

    def _run(self, ticket: Ticket, moves: list[Move], positions: dict[int, list[int]]) -> None:
        for move in moves:
            self._tickets[move.move_id] = (ticket, positions[move.move_id])
            ticket._open_moves += 1
            if move.dst_tier == ENGINE_TIER:
                self._loading.update(move.dst_ids)
        self.store.execute(moves)

    def _apply(self, results: list[MoveResult]) -> None:
        """Hand finished moves to the index and their tickets, then start the cascades that follow."""
        for result in results:
            move = self.index.complete(result.move_id, result.failed, result.lost)
            if move.dst_tier == ENGINE_TIER:
                self._loading.subtract(move.dst_ids)
                if result.seconds is not None:  # (the move's share of the time its direction's moves ran)
                    self.cost.observe_load(move.src_tier, num_bytes=(move.num_blocks - len(result.failed))
                                           * self.block_bytes, seconds=result.seconds)
            entry = self._tickets.pop(result.move_id, None)
            if entry is None:
                continue  # a cascade: no ticket
            ticket, positions = entry
            for k, pos in enumerate(positions):
                if k in result.failed:
                    self._settle_block(ticket, pos, BlockResult.FAILED, result.failed[k])
                else:
                    self._settle_block(ticket, pos, BlockResult.OK)
            ticket._open_moves -= 1
            self._settle(ticket)
        if self.index.has_cascades():
            self.store.execute(self.index.plan_cascades())

    def _wait_oldest(self) -> None:
        """Start admitted cascades, block until the oldest move lands, apply what finished."""
        if self.index.has_cascades():
            self.store.execute(self.index.plan_cascades())
        self.store.wait_oldest()
        self._apply(self.store.poll())

    @staticmethod
    def _settle_block(ticket: Ticket, pos: int, result: BlockResult, reason: str | None = None) -> None:
        ticket.results[pos] = result
        if reason is not None:
            ticket.reasons[pos] = reason

    def _settle(self, ticket: Ticket) -> None:
        """Queue a ticket for ``poll`` once its last move finished."""
        if ticket.done and not ticket._reported and all(r is not BlockResult.PENDING for r in ticket.results):
            ticket._reported = True
            self._finished.append(ticket)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this BlockManager is closed")
