"""The worker's store: one rank's caches by tier name, executing the leader's moves and reporting per block.

Moves run through the transfer library's one face (`Transfers.submit`), whatever their tiers' mediums; at most
``max_in_flight`` at once (``DYN_KVBM_MAX_CONCURRENT_TRANSFERS``), the rest queued in order. ``poll`` never blocks:
it returns a `MoveResult` for every move finished since the last call; `take_sources_read` names the running moves
that no longer read their source (a write into a disk tier whose blocks are all in its bounce buffers), so the
engine may reuse a store's blocks before the write ends. A move whose submit raises is failed for
every block with the error as reason: its stored slots are discarded, and a load is reported failed (the engine
recomputes), so nothing is served wrong. With a `G4Endpoint` (``g4``), loads from another instance (``move.remote``)
run through it, and the stores into the exported tier unseal their slots before and seal them after.

Engine caches of other block geometries than the tiers' (a hybrid model's KV cache groups of unlike blocks, the
tiers then allocated in raw slots: `kvbm.worker.tier_memory`) each see every tier through a view in their own
geometry (`add_engine_cache`): a move between an engine cache and a tier uses that engine cache's view of the tier,
a move between two tiers their whole slots.

A result's ``seconds`` is the move's share of the time moves of its direction (source and destination tier) ran:
while N of them ran at once, each was charged 1/N of that time. The shares of moves that ran together add up to
their wall time, so bytes over seconds is the direction's bandwidth whatever the concurrency (the cost rule learns
tier bandwidths from them; with wall times, four loads in flight would read as a quarter of the disk's bandwidth).
A move whose copy ran inside its submit (a synchronous CPU copy) reports that time, not the time until a poll saw
it finish (a caller that polls rarely would otherwise teach the rule a fraction of the copy's speed).
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvbm.config import KvbmConfig
from kvbm.kernels.block_transfer import BlockTransfer
from kvbm.kernels.medium import Medium, medium_of
from kvbm.kernels.transfers import Transfers
from kvbm.layouts import KVGeometry, select_layers
from kvbm.leader.plans import ENGINE_TIER, Move, MoveResult, direction
from kvbm.metrics import DIRECTIONS, KvbmMetrics
from kvbm.tiers import TierSpec
from kvbm.worker.g4 import G4Endpoint
from kvbm.worker.tier_memory import allocate_tier, close_tier, tier_view

__all__ = ["BlockStore"]

log = logging.getLogger(__name__)


@dataclass
class _Running:
    move: Move
    transfer: BlockTransfer
    started: float
    timed: bool = True  #: whether the time to completion is the move's own (not a layer-wise load's forward)
    share: float = 0.0  #: seconds charged to the move so far (see the module docstring)
    settled: float | None = None  #: a synchronous move's own time (its copy ran inside the submit)
    #: the moves ``move`` joins (their blocks in order), each reported on its own; empty: ``move`` alone
    parts: tuple[Move, ...] = ()
    source_told: bool = False  #: `BlockStore.take_sources_read` named the move


class BlockStore:
    """Executes moves between the caches of one rank (see the module docstring)."""

    def __init__(self, caches: Mapping[str, Any], transfers: Transfers, *, max_in_flight: int = 4,
                 metrics: KvbmMetrics | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        """``caches`` maps tier names ("G1" for the engine's cache) to paged caches on their mediums; ``clock``:
        seconds, for the moves' times (injectable for tests)."""
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight <= 0:
            raise ValueError(f"max_in_flight must be a positive int, got {max_in_flight!r}")
        self.caches = dict(caches)
        self.transfers = transfers
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self._clock = clock
        self._charged: dict[str, float] = {}  # direction -> when its running moves' shares were last charged
        self._owned: list[str] = []  # tiers allocated by `open`, released by `close`
        self._renewals: dict[str, int] = {}  # disk tier -> file renewals already counted
        self._queue: deque[Move] = deque()
        self._running: list[_Running] = []
        self._finished: list[MoveResult] = []
        self._layer_views: dict[tuple[str, str, int, int], Any] = {}
        #: (engine tier, tier) -> the tier as blocks of that engine cache's geometry, where it differs
        self.views: dict[tuple[str, str], Any] = {}
        self.engine_tiers: list[str] = []  #: the engine caches' tier names, in the order they were added
        self.g4: G4Endpoint | None = None  #: this rank's NIXL endpoint (P/D), set by the owner
        self.g4_tier: str | None = None  #: the tier the endpoint exports (its slots are sealed)
        self.rank = 0  #: this worker's rank (a remote load reads the holder's rank of the same number)

    @classmethod
    def open(cls, engine_cache: Any, tiers: Sequence[TierSpec], config: KvbmConfig, *,
             metrics: KvbmMetrics | None = None, transfers: Transfers | None = None,
             allocated: Mapping[str, Any] | None = None, geometry: KVGeometry | None = None,
             dtype: torch.dtype | None = None) -> BlockStore:
        """A store over the engine's cache (tier "G1") and the ``tiers`` allocated now in its geometry (or in
        ``geometry`` / ``dtype`` when given: the engine cache then moves through its views of them), with the
        transfer library's options from ``config``; nothing is held if a tier cannot be allocated, and ``close``
        releases the tiers. ``allocated``: caches of some of ``tiers`` the caller allocated (a shared pool), owned
        by the store from now on."""
        allocated = dict(allocated or {})
        geometry = engine_cache.geometry if geometry is None else geometry
        dtype = engine_cache.dtype if dtype is None else dtype
        if transfers is None:
            transfers = Transfers(device=engine_cache.device if engine_cache.device.type == "cuda" else None,
                                  disk_io=config.disk_io, bounce_blocks=config.max_transfer_batch_size,
                                  bounce_chunks=config.bounce_chunks())
        caches: dict[str, Any] = {ENGINE_TIER: engine_cache}
        try:
            for spec in tiers:
                given = allocated.pop(spec.name, None)
                caches[spec.name] = given if given is not None else allocate_tier(spec, geometry, dtype)
            if allocated:
                raise ValueError(f"allocated caches {sorted(allocated)} are not among the tiers")
        except BaseException:
            for cache in [*list(caches.values())[1:], *allocated.values()]:
                close_tier(cache)
            transfers.close()
            raise
        store = cls(caches, transfers, max_in_flight=config.max_concurrent_transfers, metrics=metrics)
        store._owned = [spec.name for spec in tiers]
        try:
            store.add_engine_cache(ENGINE_TIER, engine_cache)
        except BaseException:
            store.close()
            raise
        return store

    def add_engine_cache(self, name: str, cache: Any) -> None:
        """An engine cache (a KV cache group's, tier ``name``), with its views of the tiers `open` allocated where
        their geometry or dtype differs from its own (raises if its blocks do not fit their slots)."""
        views = {(name, tier): tier_view(self.caches[tier], cache.geometry, cache.dtype) for tier in self._owned
                 if (self.caches[tier].geometry, self.caches[tier].dtype) != (cache.geometry, cache.dtype)}
        self.caches[name] = cache
        self.views.update(views)
        self.engine_tiers.append(name)

    @property
    def host_tiers(self) -> list[str]:
        """The offload tiers `open` allocated that are in host memory (the engine's caches are not among them)."""
        return [tier for tier in self._owned if medium_of(self.caches[tier]) is Medium.HOST]

    def cache(self, tier: str) -> Any:
        """The cache of tier ``tier``."""
        try:
            return self.caches[tier]
        except KeyError:
            raise KeyError(f"this worker has no tier {tier!r}; tiers: {sorted(self.caches)}") from None

    def end(self, tier: str, other: str) -> Any:
        """The cache of ``tier`` as a move between it and ``other`` sees it: the view of ``tier`` in the geometry of
        the engine cache ``other`` where there is one, else ``tier``'s cache."""
        view = self.views.get((other, tier))
        return self.cache(tier) if view is None else view

    @property
    def busy(self) -> bool:
        """Whether moves are queued or running."""
        return bool(self._queue or self._running)

    def num_queued(self) -> int:
        """Moves waiting for a free transfer slot."""
        return len(self._queue)

    def num_running(self) -> int:
        """Moves in flight."""
        return len(self._running)

    def execute(self, moves: Iterable[Move]) -> None:
        """Queue moves in order and start as many as ``max_in_flight`` allows; all are checked first, so a move
        this store cannot run queues none of them."""
        moves = list(moves)
        for move in moves:
            if move.remote is None:
                self.end(move.src_tier, move.dst_tier)
            elif self.g4 is None:
                raise ValueError(f"move {move.move_id} loads from another instance; this worker has no G4 endpoint")
            self.end(move.dst_tier, move.src_tier)
        self._queue.extend(moves)
        self._start_queued()

    def execute_by_layers(self, moves: Sequence[Move], groups: Sequence[tuple[int, int]]
                          ) -> list[list[BlockTransfer]]:
        """Start ``moves`` now (ahead of the queue) as one transfer per layer group ``[start, stop)`` of ``groups``
        and per pair of tiers (the moves between two tiers join into one transfer, in order, so the first group
        lands first), and return the transfers per group, for waiting on one group of layers. A move's result
        merges its groups: a block fails where any group failed it. Its result carries no time (``seconds`` None):
        its completion is seen only after the forward it runs beside, so the cost rule does not learn from it."""
        layered = self.layered(moves)
        by_group = layered.submit_groups(groups)
        layered.track()
        return by_group

    def prepare_engine_pairs(self) -> None:
        """Build, moving nothing, what whole-block moves between each engine cache and each offload tier need, both
        ways (`Transfers.prepare` of the caches the moves use: on the GPU, their copy plans, kernels and the compiled
        enqueue's tables, and for a disk tier its bounce buffers' copies), so that a process's first load or store
        does not pay for it (on an H100 the first bulk load of a process spent 3.1-5.5 ms building them, and the
        cost rule then learned that time as the load's; a disk-only tier's first store built the whole transfer
        engine, 21.6 s)."""
        host = self.host_tiers
        for tier in host + [t for t in self._owned if t not in host]:  # (host tiers first: a disk may refuse)
            for engine in self.engine_tiers:
                self.transfers.prepare(self.end(tier, engine), self.end(engine, tier))
                self.transfers.prepare(self.end(engine, tier), self.end(tier, engine))

    def prepare_layers(self, src_tier: str, dst_tier: str, groups: Iterable[tuple[int, int]]) -> None:
        """Build, moving nothing, what moves from ``src_tier`` to ``dst_tier`` by each group of layers ``[start,
        stop)`` of ``groups`` need (`Transfers.prepare` of the groups' layer views: on the GPU, their copy plans and
        kernels), so that a layer-wise move's first use of a group does not pay for it."""
        for start, stop in groups:
            self.transfers.prepare(self._layer_view(src_tier, dst_tier, start, stop),
                                   self._layer_view(dst_tier, src_tier, start, stop))

    def layered(self, moves: Sequence[Move]) -> LayeredMoves:
        """``moves`` to run by groups of layers submitted when the caller says (`LayeredMoves`)."""
        return LayeredMoves(self, moves)

    def poll(self) -> list[MoveResult]:
        """Results of the moves finished since the last call; starts queued moves in freed slots; never blocks."""
        progressed = True
        while progressed:
            progressed = False
            for run in [r for r in self._running if r.transfer.done()]:
                self._finish(run)
                progressed = True
            progressed = self._start_queued() or progressed
        finished, self._finished = self._finished, []
        return finished

    def take_sources_read(self) -> list[int]:
        """Ids of the running moves that no longer read their source, not named by an earlier call (a move that
        finished is not named: its result says as much); as last polled, never polls."""
        read = [r for r in self._running if not r.source_told and r.transfer.source_read and not r.transfer.over]
        for r in read:
            r.source_told = True
        return [r.move.move_id for r in read]

    def wait_source_read(self, move_ids: Collection[int]) -> None:
        """Block until the oldest running move of ``move_ids`` no longer reads its source (until the oldest running
        move finishes when none of them runs yet: they are queued); results kept for ``poll``."""
        run = next((r for r in self._running if r.move.move_id in move_ids), None)
        if run is None:
            self.wait_oldest()
            return
        run.transfer.wait_source_read()
        self.poll_into_buffer()

    def wait_oldest(self) -> None:
        """Block until the oldest running move finishes (starting queued ones as slots free up)."""
        if self._running:
            self._running[0].transfer.wait()
        self.poll_into_buffer()

    def poll_into_buffer(self) -> None:
        """Advance the moves like ``poll`` but keep their results for the next ``poll``."""
        results = self.poll()
        self._finished = results + self._finished

    def wait_all(self) -> None:
        """Block until every queued and running move has finished (results kept for ``poll``)."""
        while self.busy:
            self.wait_oldest()

    def close(self) -> None:
        """Finish every move, then close the transfer library's paths and release the tiers `open` allocated (the
        other caches belong to their owners); idempotent."""
        try:
            self.wait_all()
            self.transfers.close()
            if self.g4 is not None:
                self.g4.close()
        finally:
            owned, self._owned = self._owned, []
            for name in owned:
                close_tier(self.caches[name])

    # -- internals ---------------------------------------------------------------------------------------------

    def _start_queued(self) -> bool:
        started = False
        while self._queue and len(self._running) < self.max_in_flight:
            move = self._queue.popleft()
            t0 = self._charge(direction(move))
            src = self.end(move.src_tier, move.dst_tier) if move.remote is None else None
            transfer = self._submit(move, src, self.end(move.dst_tier, move.src_tier))
            run = _Running(move, transfer, t0)
            if transfer.synchronous:  # its time is known now: not the time until a poll sees it
                run.settled = self._clock() - t0
            self._running.append(run)
            started = True
        return started

    def _submit(self, move: Move, src: Any, dst: Any, ids: tuple[np.ndarray, np.ndarray] | None = None
                ) -> BlockTransfer:
        """One move's transfer from ``src`` to ``dst`` (``src`` unused for a move from another instance); ``ids``:
        the move's source and destination ids as arrays, where the caller submits them more than once."""
        if ids is None:
            ids = list(move.src_ids), list(move.dst_ids)
        if move.dst_tier == self.g4_tier:  # the exported slots are unsealed before they are overwritten
            self.g4.unseal(move.dst_ids)
        try:  # a disk slot is bound to the hash of the block stored in it
            if move.remote is not None:
                return self.g4.read(move, dst, self.rank)
            if Medium.DISK in (medium_of(src), medium_of(dst)):
                return self.transfers.submit(src, dst, *ids, tags=move.hashes)
            return self.transfers.submit(src, dst, *ids)
        except Exception as e:  # noqa: BLE001 - reported per block: the leader drops what cannot be proven
            return _not_started(move, e, 1)[0]

    def _submit_groups(self, move: Move, views: Sequence[tuple[Any, Any]], ids: tuple[np.ndarray, np.ndarray]
                       ) -> list[BlockTransfer]:
        """`_submit` of one move for each (source view, destination view) of ``views`` (its layer groups), in one
        call to the transfer library where the move is a plain copy between two local caches."""
        if move.remote is not None or move.dst_tier == self.g4_tier or \
                Medium.DISK in (medium_of(views[0][0]), medium_of(views[0][1])):
            return [self._submit(move, src, dst, ids) for src, dst in views]
        try:
            return self.transfers.submit_groups(views, *ids)
        except Exception as e:  # noqa: BLE001 - reported per block: the leader drops what cannot be proven
            return _not_started(move, e, len(views))

    def _layer_view(self, tier: str, other: str, start: int, stop: int) -> Any:
        """Layers ``[start, stop)`` of a tier's cache as seen from ``other`` (`end`), kept (the transfer library
        keeps its plans per cache)."""
        key = (tier, other, start, stop)
        view = self._layer_views.get(key)
        if view is None:
            view = self._layer_views[key] = select_layers(self.end(tier, other), start, stop)
        return view

    def _charge(self, name: str) -> float:
        """Charge the time since the last charge of direction ``name`` to its running timed moves, in equal shares;
        the time now."""
        now = self._clock()
        runs = [r for r in self._running if r.timed and r.settled is None and direction(r.move) == name]
        if runs:
            share = (now - self._charged[name]) / len(runs)
            for r in runs:
                r.share += share
        self._charged[name] = now
        return now

    def _finish(self, run: _Running) -> None:
        move = run.move
        name = direction(move)
        wall = self._charge(name) - run.started
        self._running.remove(run)
        failed = run.transfer.reasons
        for i, reason in failed.items():
            log.debug("%s of block %#x failed: %s", name, move.hashes[i], reason)
        if move.dst_tier == self.g4_tier:
            self.g4.seal(move.dst_ids, move.hashes, list(failed))
        if self.metrics is not None and name in DIRECTIONS:
            n_ok = move.num_blocks - len(failed)
            block_bytes = self.end(move.dst_tier, move.src_tier).geometry.block_bytes
            self.metrics.record_transfer(name, blocks_ok=n_ok, blocks_failed=len(failed), num_bytes=n_ok * block_bytes,
                                         seconds=wall)
        seconds = None if not run.timed else run.settled if run.settled is not None else run.share
        lost, start = run.transfer.lost, 0
        for part in run.parts or (move,):  # (a joined move's blocks are its parts' blocks, in order)
            stop = start + part.num_blocks
            part_failed = {i - start: reason for i, reason in failed.items() if start <= i < stop}
            part_lost = frozenset(i - start for i in lost if start <= i < stop)
            self._finished.append(MoveResult(part.move_id, part_failed, part_lost, seconds=seconds))
            start = stop
        for tier in (move.src_tier, move.dst_tier) if move.remote is None else (move.dst_tier,):
            renewals = getattr(self.cache(tier), "renewals", 0)
            if renewals > self._renewals.get(tier, 0):
                if self.metrics is not None:
                    self.metrics.record_disk_file_renewals(renewals - self._renewals.get(tier, 0))
                self._renewals[tier] = renewals


def _joined(moves: Sequence[Move]) -> Move:
    """The moves (between one pair of tiers) as one move, their blocks in order, under the first one's id."""
    if len(moves) == 1:
        return moves[0]
    first = moves[0]
    join = itertools.chain.from_iterable
    return Move(first.move_id, first.kind, first.src_tier, first.dst_tier, tuple(join(m.src_ids for m in moves)),
                tuple(join(m.dst_ids for m in moves)), tuple(join(m.hashes for m in moves)))


def _not_started(move: Move, error: Exception, count: int) -> list[BlockTransfer]:
    """``count`` transfers of a move that could not start (its layer groups): every block failed; logged once."""
    log.warning("move %d (%s, %d blocks) could not start: %r", move.move_id, direction(move), move.num_blocks, error)
    return [BlockTransfer.failed(move.num_blocks, "none", f"transfer failed: {error!r}") for _ in range(count)]


class LayeredMoves:
    """Moves run as one transfer per pair of tiers and group of layers, each group submitted when the caller asks
    (`submit`), so that it is ordered after the work queued on the caller's stream by then; `track` then hands each
    pair's joined move to the store as one running move, whose result is reported per move it joins, each merging
    its groups. Submitted ahead of the store's queue."""

    def __init__(self, store: BlockStore, moves: Sequence[Move]) -> None:
        pairs: dict[tuple[str, str], list[Move]] = {}
        for move in moves:
            pairs.setdefault((move.src_tier, move.dst_tier), []).append(move)
        self._store = store
        self._joined = [(_joined(ms), ms) for ms in pairs.values()]
        # each pair's ids converted once for all its groups (1024 ids: ~30 us a conversion)
        self._ids = [(np.asarray(whole.src_ids, dtype=np.int64), np.asarray(whole.dst_ids, dtype=np.int64))
                     for whole, _ in self._joined]
        self._per_pair: list[list[BlockTransfer]] = [[] for _ in self._joined]
        self._t0 = time.perf_counter()

    def submit(self, start: int, stop: int) -> list[BlockTransfer]:
        """Start layers ``[start, stop)`` of every pair's moves now; their transfers."""
        store, out = self._store, []
        for (whole, _), ids, transfers in zip(self._joined, self._ids, self._per_pair):
            transfer = store._submit(whole, store._layer_view(whole.src_tier, whole.dst_tier, start, stop),
                                     store._layer_view(whole.dst_tier, whole.src_tier, start, stop), ids)
            out.append(transfer)
            transfers.append(transfer)
        return out

    def submit_groups(self, groups: Sequence[tuple[int, int]]) -> list[list[BlockTransfer]]:
        """``submit`` of each group of layers ``[start, stop)`` of ``groups`` now, in order; the moves of one pair of
        tiers go to the transfer library in one call (`Transfers.submit_groups`). The transfers per group."""
        if len(self._joined) != 1:  # several pairs of tiers: group by group, so each pair's first group is first
            return [self.submit(start, stop) for start, stop in groups]
        store, (whole, _) = self._store, self._joined[0]
        views = [(store._layer_view(whole.src_tier, whole.dst_tier, start, stop),
                  store._layer_view(whole.dst_tier, whole.src_tier, start, stop)) for start, stop in groups]
        submitted = store._submit_groups(whole, views, self._ids[0])
        self._per_pair[0].extend(submitted)
        return [[transfer] for transfer in submitted]

    def track(self) -> None:
        """Hand each pair's joined move to the store as one running move over its submitted groups, reported per
        move it joins (call once, after the last group)."""
        for (whole, ms), transfers in zip(self._joined, self._per_pair):
            merged = BlockTransfer.all_of(transfers, transfers[0].path)
            self._store._running.append(_Running(whole, merged, self._t0, timed=False, parts=tuple(ms)))
