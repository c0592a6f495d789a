"""The engine-independent worker side of a connector: one rank's tiers and store, executing the step plans.

The worker allocates its shard of every tier (the same number of blocks as the leader's index, of its own block
size), runs the plan's moves through its `BlockStore`, and reports per request what the engine asks for
(loads done, held requests whose stores are done, engine blocks whose load failed) and per move what the leader
needs (`WorkerReport`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

from kvbm.config import KvbmConfig
from kvbm.connectors.messages import RequestLoad, RequestStore, WorkerReport
from kvbm.layouts import PagedKVCache
from kvbm.leader.plans import Move, MoveKind, MoveResult
from kvbm.metrics import KvbmMetrics
from kvbm.tiers import TierSpec
from kvbm.worker.store import BlockStore

__all__ = ["ConnectorWorker"]

log = logging.getLogger(__name__)


class ConnectorWorker:
    """One rank's tiers and the requests whose moves it runs (see the module docstring)."""

    def __init__(self, engine_cache: PagedKVCache, tiers: Sequence[TierSpec], config: KvbmConfig, *,
                 metrics: KvbmMetrics | None = None) -> None:
        """Allocate the tiers' memory for ``engine_cache``'s geometry (raises before holding anything on failure)."""
        if not tiers:
            raise ValueError("no offload tier configured")
        self.engine_cache = engine_cache
        self.store = BlockStore.open(engine_cache, tiers, config, metrics=metrics)
        self._moves: dict[int, tuple[Move, str | None]] = {}  # running move id -> (move, request id)
        self._loading: dict[str, set[int]] = {}
        self._storing: dict[str, set[int]] = {}
        self._held: set[str] = set()
        self._load_errors: set[int] = set()
        self._failed_loads: dict[str, list[str]] = {}
        self._report: dict[int, MoveResult] = {}
        self._closed = False

    def start_loads(self, loads: Iterable[RequestLoad]) -> None:
        """Start loading requests' blocks; blocks missing at planning time are load errors at once."""
        for load in loads:
            self._load_errors.update(load.missing)
            if load.missing:
                self._failed_loads.setdefault(load.request_id, []).extend(
                    f"engine block {b}: no longer stored when the load was planned" for b in load.missing)
            pending = self._loading.setdefault(load.request_id, set())
            self._execute(load.moves, load.request_id, pending)

    def start_stores(self, stores: Iterable[RequestStore]) -> None:
        """Start storing requests' newly computed blocks (ordered after the work queued on the current stream)."""
        for store in stores:
            self._execute(store.moves, store.request_id, self._storing.setdefault(store.request_id, set()))

    def start_cascades(self, moves: Sequence[Move]) -> None:
        """Start tier-to-tier copies."""
        self._execute(moves, None, None)

    def hold(self, request_ids: Iterable[str]) -> None:
        """Requests whose blocks the engine keeps until their stores are done (``poll`` reports them)."""
        self._held.update(request_ids)

    def finish_stores_of(self, request_ids: Iterable[str]) -> None:
        """Block until the stores still reading these requests' engine blocks are done (before their reuse)."""
        waiting = set().union(*(self._storing.get(r, set()) for r in request_ids))
        while waiting & self._storing_ids():
            self.store.wait_oldest()
            self._collect(self.store.poll())

    def poll(self) -> tuple[set[str], set[str]]:
        """``(held requests whose stores are done, requests whose loads are done)``; never blocks."""
        self._collect(self.store.poll())
        recving = {r for r, pending in self._loading.items() if not pending}
        for request_id in recving:
            del self._loading[request_id]
        for request_id in [r for r, pending in self._storing.items() if not pending]:
            del self._storing[request_id]
        sending = {r for r in self._held if r not in self._storing}
        self._held -= sending
        return sending, recving

    def take_load_errors(self) -> set[int]:
        """Engine block ids whose load failed since the last call (the engine recomputes them)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_failed_loads(self) -> dict[str, list[str]]:
        """Request id -> why its blocks failed to load, since the last call (for engines that fail requests)."""
        failed, self._failed_loads = self._failed_loads, {}
        return failed

    def add_engine_caches(self, caches: Mapping[str, PagedKVCache]) -> None:
        """A hybrid model's further KV cache groups: tier name -> that group's engine cache, of the first group's
        block geometry (the tiers are allocated in it); the moves of a group name its engine cache's tier."""
        for name, cache in caches.items():
            if cache.geometry != self.engine_cache.geometry or cache.dtype != self.engine_cache.dtype:
                raise ValueError(f"KV cache group {name}: blocks of {cache.geometry} in {cache.dtype}; the first "
                                 f"group's are {self.engine_cache.geometry} in {self.engine_cache.dtype}: the groups "
                                 f"of one worker must share the block geometry")
            if name in self.store.caches:
                raise ValueError(f"this worker already has a tier named {name!r}")
        self.store.caches.update(caches)

    def drop(self, moves: Sequence[Move], reason: str) -> None:
        """Report moves that will never run (their engine blocks were never computed) as failed, so the leader
        discards their slots."""
        for move in moves:
            self._report[move.move_id] = MoveResult(move.move_id, {i: reason for i in range(move.num_blocks)})

    def take_report(self) -> WorkerReport | None:
        """Results of the moves finished since the last report, for the leader (None when there are none)."""
        if not self._report:
            return None
        report, self._report = WorkerReport(self._report), {}
        return report

    def idle(self) -> bool:
        """Whether nothing is running or waiting to be reported."""
        return not (self._moves or self._loading or self._storing or self._held or self._report)

    def close(self) -> None:
        """Finish every move, then release the tiers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.store.close()

    # -- internals ---------------------------------------------------------------------------------------------

    def _execute(self, moves: Sequence[Move], request_id: str | None, pending: set[int] | None) -> None:
        for move in moves:
            self._moves[move.move_id] = (move, request_id)
            if pending is not None:
                pending.add(move.move_id)
        self.store.execute(moves)

    def _storing_ids(self) -> set[int]:
        return set().union(*self._storing.values()) if self._storing else set()

    def _collect(self, results: list[MoveResult]) -> None:
        for result in results:
            move, request_id = self._moves.pop(result.move_id)
            self._report[result.move_id] = result
            if move.kind is MoveKind.LOAD:
                self._load_errors.update(move.dst_ids[i] for i in result.failed)
                if result.failed:
                    self._failed_loads.setdefault(request_id, []).extend(
                        f"engine block {move.dst_ids[i]}: {reason}" for i, reason in sorted(result.failed.items()))
                self._loading.get(request_id, set()).discard(result.move_id)
            elif move.kind is MoveKind.STORE:
                self._storing.get(request_id, set()).discard(result.move_id)
