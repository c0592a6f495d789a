"""The engine-independent worker side of a connector: one rank's tiers and store, executing the step plans.

The worker allocates its shard of every tier (the same number of blocks as the leader's index, of its own block
size), runs the plan's moves through its `BlockStore`, and reports per request what the engine asks for
(loads done, held requests whose stores are done, engine blocks whose load failed) and per move what the leader
needs (`WorkerReport`). With P/D (``g4``), a `G4Endpoint` exports the rank's G2 to other instances and/or loads
from theirs; which of this instance's requests readers are done with goes back in the report (``released``).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvbm.config import KvbmConfig
from kvbm.connectors.messages import RequestLoad, RequestStore, WorkerReport
from kvbm.layouts import PagedKVCache
from kvbm.leader.plans import Move, MoveKind, MoveResult
from kvbm.metrics import KvbmMetrics
from kvbm.tiers import HOST_TIER, TierSpec
from kvbm.worker.g4 import G4Endpoint
from kvbm.worker.store import BlockStore

__all__ = ["ConnectorWorker", "G4Options"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class G4Options:
    """A rank's part in disaggregated serving: ``export`` its G2 to other instances (a prefill / producer),
    ``load`` from theirs (a decode / consumer); ``timeout_s`` bounds one load from another instance."""

    export: bool = False
    load: bool = False
    timeout_s: float = 30.0


class ConnectorWorker:
    """One rank's tiers and the requests whose moves it runs (see the module docstring)."""

    def __init__(self, engine_cache: PagedKVCache, tiers: Sequence[TierSpec], config: KvbmConfig, *,
                 metrics: KvbmMetrics | None = None, rank: int = 0, g4: G4Options | None = None) -> None:
        """Allocate the tiers' memory for ``engine_cache``'s geometry (raises before holding anything on failure);
        ``g4``: this rank (``rank``) exports its G2 and/or loads from other instances'."""
        if not tiers:
            raise ValueError("no offload tier configured")
        self.engine_cache = engine_cache
        self.store = BlockStore.open(engine_cache, tiers, config, metrics=metrics)
        self.store.rank = rank
        if g4 is not None and (g4.export or g4.load):
            try:
                self.store.g4 = G4Endpoint(self.store.transfers, self.store.cache(HOST_TIER), export=g4.export,
                                           timeout_s=g4.timeout_s)
            except BaseException:
                self.store.close()
                raise
            self.store.g4_tier = HOST_TIER if g4.export else None
        self._moves: dict[int, tuple[Move, str | None]] = {}  # running move id -> (move, request id)
        self._loading: dict[str, set[int]] = {}
        self._storing: dict[str, set[int]] = {}
        self._held: set[str] = set()
        self._load_errors: set[int] = set()
        self._failed_loads: dict[str, list[str]] = {}
        self._report: dict[int, MoveResult] = {}
        self._released: dict[str, int] = {}
        self._closed = False

    def endpoint(self) -> bytes | None:
        """What another instance's rank needs to load from this rank's G2 (None without an exporting endpoint)."""
        g4 = self.store.g4
        return g4.endpoint() if g4 is not None and g4.seals is not None else None

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
        if self.store.g4 is not None:
            for request_id in self.store.g4.take_released():
                self._released[request_id] = self._released.get(request_id, 0) + 1
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

    def drop(self, moves: Sequence[Move], reason: str) -> None:
        """Report moves that will never run (their engine blocks were never computed) as failed, so the leader
        discards their slots."""
        for move in moves:
            self._report[move.move_id] = MoveResult(move.move_id, {i: reason for i in range(move.num_blocks)})

    def take_report(self) -> WorkerReport | None:
        """Results of the moves finished since the last report, for the leader (None when there are none)."""
        if not self._report and not self._released:
            return None
        report = WorkerReport(self._report, self._released)
        self._report, self._released = {}, {}
        return report

    def idle(self) -> bool:
        """Whether nothing is running or waiting to be reported."""
        return not (self._moves or self._loading or self._storing or self._held or self._report or self._released)

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
