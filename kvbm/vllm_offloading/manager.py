"""Scheduler side of kvbm's offloading spec: vLLM's offloaded blocks kept in kvbm's leader block index.

vLLM names an offloaded block by an ``OffloadKey`` (block hash + KV cache group) covering ``blocks_per_chunk`` GPU
blocks. kvbm's index keeps one slot per GPU block, so a key maps to ``blocks_per_chunk`` 64-bit sequence hashes
(``sub_hashes``) and is present only while all of them are. Eviction (lowest priority, then LRU; never a held or
pending slot), the G2 -> G3 cascade and KVBM's disk admission filter are the index's.

A job's moves complete when vLLM reports the job done (``complete_store`` / ``complete_load``): stored slots are
committed or, where a worker reported the block failed, discarded; held slots are released (dropped when a read
found them bad). Cascades due at planning time ride on the next job's spec and complete with it.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from vllm.v1.kv_offload.base import (
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadingManager,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvbm.config import KvbmConfig
from kvbm.leader import BlockIndex, Move, MoveResult
from kvbm.policies.admission import DiskAdmissionFilter
from kvbm.tiers import TierSpec

from .specs import KvbmLoadStoreSpec

__all__ = ["JOB_MOVE_BLOCKS", "KvbmOffloadingManager", "sub_hashes"]

log = logging.getLogger(__name__)

#: Most blocks of one planned move (a job's blocks between two tiers, in practice all of them).
JOB_MOVE_BLOCKS = 1 << 20


def sub_hashes(key: bytes, blocks_per_chunk: int) -> list[int]:
    """kvbm sequence hashes of the ``blocks_per_chunk`` GPU blocks of offloaded block ``key``."""
    return [int.from_bytes(hashlib.blake2b(key + j.to_bytes(4, "little"), digest_size=8).digest(), "little")
            for j in range(blocks_per_chunk)]


@functools.lru_cache(maxsize=1 << 16)
def _cached_sub_hashes(key: bytes, blocks_per_chunk: int) -> tuple[int, ...]:
    """`sub_hashes`, kept for the latest keys: a job's keys are hashed again by every call that names them (lookup,
    prepare, complete), each a blake2b per GPU block."""
    return tuple(sub_hashes(key, blocks_per_chunk))


@dataclass
class _Job:
    """The moves of one store or load job, and the positions whose blocks must not be committed."""

    keys: frozenset[OffloadKey]
    moves: tuple[Move, ...]
    abandoned: dict[int, set[int]] = field(default_factory=dict)  #: move id -> block indices left unstored


class KvbmOffloadingManager(OffloadingManager):
    """An ``OffloadingManager`` over kvbm's ``BlockIndex`` (see the module docstring). One thread drives it."""

    def __init__(self, tiers: Sequence[TierSpec], config: KvbmConfig, blocks_per_chunk: int, *,
                 disk_filter: DiskAdmissionFilter | None = None, enable_events: bool = False) -> None:
        if not tiers:
            raise ValueError("no offload tier configured: set DYN_KVBM_CPU_CACHE_GB and/or DYN_KVBM_DISK_CACHE_GB "
                             "(or their *_OVERRIDE_NUM_BLOCKS), in the environment or the connector's extra config")
        if isinstance(blocks_per_chunk, bool) or not isinstance(blocks_per_chunk, int) or blocks_per_chunk <= 0:
            raise ValueError(f"blocks_per_chunk must be a positive int, got {blocks_per_chunk!r}")
        self.tiers = list(tiers)
        self.config = config
        self.blocks_per_chunk = blocks_per_chunk
        self._disk_filter = disk_filter
        self._enable_events = enable_events
        self._reset()

    def _reset(self) -> None:
        admission = self._disk_filter if self._disk_filter is not None else DiskAdmissionFilter(
            enabled=not self.config.disable_disk_offload_filter)
        # A job's blocks move as one transfer per pair of tiers: vLLM's job is already the batch, and transfers of a
        # few blocks each (``DYN_KVBM_MAX_TRANSFER_BATCH_SIZE``, the Dynamo connector's batches) would leave the
        # link idle between them while the worker's host side starts the next.
        self.index = BlockIndex([t.index_config(admission if k else None) for k, t in enumerate(self.tiers)],
                                batch_size=JOB_MOVE_BLOCKS,
                                min_priority=self.config.host_offload_prefix_min_priority)
        self._names = self.index.tier_names
        self._stores: dict[OffloadKey, _Job] = {}  # key -> its pending store job
        self._loads: dict[str, list[_Job]] = {}  # request id -> its load jobs, oldest first
        self._riders: dict[int, tuple[Move, ...]] = {}  # id(job) -> cascades completing with it
        self._failures: dict[int, MoveResult] = {}  # move id -> failures workers reported
        self._key_of: dict[int, OffloadKey] = {}  # sub-hash -> key
        self._slot_hash: dict[str, dict[int, int]] = {name: {} for name in self._names}
        self._events: list[OffloadingEvent] = []

    # -- helpers -----------------------------------------------------------------------------------------------

    def _hashes(self, key: OffloadKey) -> tuple[int, ...]:
        return _cached_sub_hashes(key, self.blocks_per_chunk)

    def _state(self, h: int) -> int:
        """2: committed in some tier, 1: only pending, 0: absent."""
        best = 0
        for name in self._names:
            pool = self.index.pool(name)
            if pool.lookup(h) is not None:
                return 2
            if pool.contains(h):
                best = 1
        return best

    def _present(self, h: int) -> bool:
        return any(self.index.pool(name).contains(h) for name in self._names)

    def _note_slots(self, moves: Iterable[Move], evicted: list[OffloadKey]) -> None:
        """Record which hash now owns each destination slot; a hash a slot lost (and no tier holds) is evicted."""
        seen: set[OffloadKey] = set(evicted)
        for move in moves:
            mirror = self._slot_hash[move.dst_tier]
            for slot, h in zip(move.dst_ids, move.hashes):
                old = mirror.get(slot)
                mirror[slot] = h
                if old is not None and old != h and not self._present(old):
                    key = self._key_of.pop(old, None)
                    if key is not None and key not in seen:
                        seen.add(key)
                        evicted.append(key)

    def _take_cascades(self) -> tuple[Move, ...]:
        if not self.index.has_cascades():
            return ()
        moves = tuple(self.index.plan_cascades())
        evicted: list[OffloadKey] = []
        self._note_slots(moves, evicted)
        self._emit(evicted, removed=True)
        return moves

    def _emit(self, keys: list[OffloadKey], removed: bool) -> None:
        if self._enable_events and keys:
            self._events.append(OffloadingEvent(keys=list(keys), medium=Medium.CPU, removed=removed))

    def _complete(self, job: _Job) -> None:
        for move in job.moves + self._riders.pop(id(job), ()):
            reported = self._failures.pop(move.move_id, None)
            failed = dict(reported.failed) if reported is not None else {}
            for i in job.abandoned.get(move.move_id, ()):
                failed.setdefault(i, "not stored: other blocks of its key found no slot")
            self.index.complete(move.move_id, failed, reported.lost if reported is not None else ())

    # -- worker reports ----------------------------------------------------------------------------------------

    def note_failures(self, results: Iterable[MoveResult]) -> None:
        """Take failed blocks workers reported (before vLLM completes their jobs); any rank failing fails them."""
        for result in results:
            prior = self._failures.get(result.move_id)
            self._failures[result.move_id] = result if prior is None else prior.merged(result)

    # -- OffloadingManager -------------------------------------------------------------------------------------

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        """Every request offloads its newly computed chunks."""
        return RequestOffloadingContext()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        """HIT when every GPU block of ``key`` is committed in some tier, HIT_PENDING when some are still being
        stored, else MISS. A hit counts towards the disk tier's admission and refreshes LRU order."""
        hashes = self._hashes(key)
        match = self.index.lookup(hashes, whole_prompt=False)
        if match.num_blocks == len(hashes):
            return LookupResult.HIT
        states = [self._state(h) for h in hashes[match.num_blocks:]]
        if all(states):
            return LookupResult.HIT if all(s == 2 for s in states) else LookupResult.HIT_PENDING
        return LookupResult.MISS

    def get_load_source(self, key: OffloadKey, req_context: ReqContext) -> CacheHitSource:
        """Host memory when the key's first block is in the first tier and that tier is G2, else disk."""
        h = self._hashes(key)[0]
        for name, tier in zip(self._names, self.tiers):
            if self.index.pool(name).lookup(h) is not None:
                return CacheHitSource.HOST if tier.medium.value == "host" else CacheHitSource.EXTERNAL_UNSPECIFIED
        return CacheHitSource.EXTERNAL_UNSPECIFIED

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> KvbmLoadStoreSpec:
        """Hold the slots of ``keys`` (in order) and return the moves that read them."""
        keys = list(keys)
        hashes = [h for key in keys for h in self._hashes(key)]
        plan = self.index.plan_load(hashes, list(range(len(hashes))))
        if plan.missing:
            log.warning("request %s: %d of %d blocks to load left every tier before the load was planned",
                        req_context.req_id, len(plan.missing), len(hashes))
        job = _Job(frozenset(keys), tuple(plan.moves))
        self._loads.setdefault(req_context.req_id, []).append(job)
        cascades = self._take_cascades()
        if cascades:
            self._riders[id(job)] = cascades
        return KvbmLoadStoreSpec(job.moves, len(hashes), cascades, tuple(sorted(plan.missing)))

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        """Mark the keys' blocks most recently used in every tier holding them."""
        for key in keys:
            for h in self._hashes(key):
                for name in self._names:
                    self.index.pool(name).lookup(h)

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        """Release the slots a load job held (dropping those a worker found bad)."""
        jobs = self._loads.get(req_context.req_id, [])
        wanted = frozenset(keys)
        for i, job in enumerate(jobs):
            if job.keys == wanted:
                del jobs[i]
                break
        else:
            raise KeyError(f"request {req_context.req_id}: no load job of these {len(wanted)} keys is open")
        if not jobs:
            self._loads.pop(req_context.req_id, None)
        self._complete(job)

    def prepare_store(self, keys: Collection[OffloadKey], req_context: ReqContext) -> PrepareStoreOutput | None:
        """Pending first-tier slots for the keys not stored yet; None when none of them found room."""
        keys = list(keys)
        candidates = [k for k in dict.fromkeys(keys) if not all(self._present(h) for h in self._hashes(k))]
        if not candidates:
            return PrepareStoreOutput(keys_to_store=[], store_spec=KvbmLoadStoreSpec((), 0), evicted_keys=[])
        bpc = self.blocks_per_chunk
        hashes = [h for key in candidates for h in self._hashes(key)]
        plan = self.index.plan_store(hashes, list(range(len(hashes))))
        unstored = {i // bpc for i in plan.busy} | {i // bpc for i in plan.skipped
                                                     if not self._present(hashes[i])}
        to_store = [k for c, k in enumerate(candidates) if c not in unstored]
        evicted: list[OffloadKey] = []
        self._note_slots(plan.moves, evicted)
        if not to_store:
            for move in plan.moves:  # nothing will run: free what was allocated
                self.index.complete(move.move_id, {i: "not stored" for i in range(move.num_blocks)})
            self._emit(evicted, removed=True)
            return None if plan.busy else PrepareStoreOutput([], KvbmLoadStoreSpec((), 0), evicted)
        # Renumber positions to the stored keys only: the worker sees the GPU blocks of keys_to_store.
        new_pos: dict[int, int] = {}
        kept = [c for c in range(len(candidates)) if c not in unstored]
        for n, c in enumerate(kept):
            for j in range(bpc):
                new_pos[c * bpc + j] = n * bpc + j
        moves: list[Move] = []
        abandoned: dict[int, set[int]] = {}
        for move in plan.moves:
            src = []
            for i, pos in enumerate(move.src_ids):
                if pos in new_pos:
                    src.append(new_pos[pos])
                else:
                    src.append(-1)
                    abandoned.setdefault(move.move_id, set()).add(i)
            moves.append(Move(move.move_id, move.kind, move.src_tier, move.dst_tier, tuple(src), move.dst_ids,
                              move.hashes))
        for key in to_store:
            for h in self._hashes(key):
                self._key_of[h] = key
        job = _Job(frozenset(to_store), tuple(moves), abandoned)
        for key in to_store:
            self._stores[key] = job
        for move_id, idx in abandoned.items():  # blocks of unstored keys: freed when the job completes
            log.debug("store move %d: %d blocks abandoned (their keys found no room)", move_id, len(idx))
        cascades = self._take_cascades()
        if cascades:
            self._riders[id(job)] = cascades
        self._emit(evicted, removed=True)
        return PrepareStoreOutput(keys_to_store=to_store,
                                  store_spec=KvbmLoadStoreSpec(job.moves, len(to_store) * bpc, cascades),
                                  evicted_keys=evicted)

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True) -> None:
        """Commit the stored blocks (discard those a worker reported failed, or all when ``success`` is False)."""
        jobs: dict[int, _Job] = {}
        for key in keys:
            job = self._stores.pop(key, None)
            if job is not None:
                jobs[id(job)] = job
        stored: list[OffloadKey] = []
        for job in jobs.values():
            for key in job.keys:
                self._stores.pop(key, None)
            if not success:
                for move in job.moves:
                    job.abandoned[move.move_id] = set(range(move.num_blocks))
            self._complete(job)
            stored.extend(k for k in job.keys if all(self._state(h) == 2 for h in self._hashes(k)))
        self._emit(stored, removed=False)

    def take_events(self) -> Iterable[OffloadingEvent]:
        """Stored / removed events since the last call (when vLLM publishes KV events)."""
        events, self._events = self._events, []
        return events

    def reset_cache(self) -> None:
        """Forget every block (vLLM never completes jobs issued before a reset)."""
        self._reset()

    def has_pending_work(self) -> bool:
        """Never: cascades ride on jobs, and stepping an idle engine creates none."""
        return False

    def check_invariants(self) -> None:
        """The index's invariants: pools consistent, every hold an open move's or an admitted block's (for tests)."""
        self.index.check_invariants()

    def open_jobs(self) -> int:
        """Load and store jobs not completed yet."""
        return len({id(j) for j in self._stores.values()}) + sum(len(v) for v in self._loads.values())
