"""The engine-independent worker side of a connector: one rank's tiers and store, executing the step plans.

The worker allocates its shard of every tier (the same number of blocks as the leader's index, of its own block
size), runs the plan's moves through its `BlockStore`, and reports per request what the engine asks for
(loads done, held requests whose stores no longer read their blocks, engine blocks whose load failed) and per move
what the leader needs (`WorkerReport`). With P/D (``g4``), a `G4Endpoint` exports the rank's G2 to other instances
and/or loads from theirs; which of this instance's requests readers are done with goes back in the report
(``released``). Its first report names its rank (``registered``: the leader plans nothing before every rank is
up), and the engine's forward steps the plans mark are timed (``timer``, `kvbm.connectors.forward_timer`) and
reported (``timings``) for the cost rule's prefill rate.

A hybrid model's further KV cache groups (``groups``) are engine caches of their own tier names. Groups of one
block geometry share tiers in it (Dynamo KVBM's block-major layout); groups of unlike geometries (block sizes, page
bytes, layer counts, dtypes) share tiers of raw slots as wide as the largest group's block, each group moving its
blocks through its own view of them (`kvbm.worker.tier_memory`), so one index and one slot count serve every group.

Ranks holding identical KV (MLA's latent cache under tensor parallelism, a `ReplicaGroup`) share one host pool
and one disk file (`kvbm.worker.replica_tiers`): the group's writer runs the moves into them (stores, cascades),
every rank runs the others (loads into its own engine cache, and copies into a tier it holds alone: one it could
not attach to), and a rank that does not run a move reports it at once with no failure, so that the leader's count
of one report per rank holds and the writer's result decides.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from kvbm.config import KvbmConfig
from kvbm.connectors.forward_timer import ForwardTimer
from kvbm.connectors.leader import RankLayout
from kvbm.connectors.messages import RequestLoad, RequestStore, WorkerReport
from kvbm.kernels.block_transfer import BlockTransfer
from kvbm.layouts import KVGeometry, PagedKVCache
from kvbm.leader.plans import ENGINE_TIER, Move, MoveKind, MoveResult
from kvbm.metrics import KvbmMetrics
from kvbm.tiers import HOST_TIER, TierSpec
from kvbm.worker.g4 import G4Endpoint
from kvbm.worker.layerwise import LayerwiseLoads
from kvbm.worker.layerwise_stores import LayerwiseStores
from kvbm.worker.replica_group import ReplicaGroup
from kvbm.worker.replica_tiers import SharedTiers, share_tiers
from kvbm.worker.store import BlockStore
from kvbm.worker.tier_memory import slot_geometry

log = logging.getLogger(__name__)

__all__ = ["ConnectorWorker", "G4Options", "replica_group", "tier_geometry"]


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
                 metrics: KvbmMetrics | None = None, replicas: ReplicaGroup | None = None, rank: int = 0,
                 stage: int = 0, g4: G4Options | None = None, groups: Mapping[str, PagedKVCache] | None = None
                 ) -> None:
        """Allocate the tiers' memory for ``engine_cache``'s geometry, or raw slots of the largest block when
        ``groups`` (a hybrid model's further KV cache groups: tier name -> engine cache) have other geometries
        (raises before holding anything on failure); with ``replicas`` the host and disk tiers are the group's
        shared ones where they can be (else this rank's own); ``g4``: this rank (``rank``, of pipeline stage
        ``stage``) exports its G2 and/or loads from other instances'."""
        if not tiers:
            raise ValueError("no offload tier configured")
        groups = dict(groups or {})
        if ENGINE_TIER in groups:
            raise ValueError(f"groups name the first group's tier {ENGINE_TIER!r}")
        self.engine_cache = engine_cache
        self.tier_geometry, self.tier_dtype = tier_geometry([engine_cache, *groups.values()])
        self._shared = (share_tiers(tiers, replicas, self.tier_geometry, self.tier_dtype) if replicas is not None
                        else SharedTiers())
        #: Tiers this rank shares with its replica group but does not write (moves into them are the writer's).
        self.shared_read_only: frozenset[str] = self._shared.read_only
        try:
            self.store = BlockStore.open(engine_cache, tiers, config, metrics=metrics, allocated=self._shared.caches,
                                         geometry=self.tier_geometry, dtype=self.tier_dtype)
        except BaseException:
            self._shared.close()
            raise
        try:
            for name, cache in groups.items():
                self.store.add_engine_cache(name, cache)
        except BaseException:
            self.store.close()
            self._shared.close()
            raise
        self.store.rank = rank
        if g4 is not None and (g4.export or g4.load):
            try:
                self.store.g4 = G4Endpoint(self.store.transfers, self.store.cache(HOST_TIER), export=g4.export,
                                           timeout_s=g4.timeout_s)
            except BaseException:
                self.store.close()
                self._shared.close()
                raise
            self.store.g4_tier = HOST_TIER if g4.export else None
        self._moves: dict[int, tuple[Move, str | None]] = {}  # running move id -> (move, request id)
        self._loading: dict[str, set[int]] = {}
        self._storing: dict[str, set[int]] = {}
        self._held: set[str] = set()
        self._load_errors: set[int] = set()
        self._failed_loads: dict[str, list[str]] = {}
        self._report: dict[int, MoveResult] = {}
        self._layers = LayerwiseLoads(self.store, engine_cache, config.onboard_layers_per_group,
                                      later_groups_in_forward=config.onboard_later_groups_in_forward)
        self._layerwise_onboard, self._cost_layer_groups = (not config.disable_layerwise_onboard,
                                                           not config.disable_cost_layer_groups)
        self._gpu_cache = engine_cache.device.type == "cuda"  # (layer groups are built ahead only for a GPU cache)
        #: stores into host memory started per group of layers as the forward saves them (one KV cache group only)
        self._layer_stores = (LayerwiseStores(self.store, engine_cache, config.onboard_layers_per_group)
                              if config.layerwise_store and not groups else None)
        self._taken: set[int] = set()  # this step's store moves the layer-wise stores run
        self._stores_begun = False  # begin_layer_stores ran this step (it is called from every layer's save)
        self._released: dict[str, int] = {}
        self.rank = rank
        self.timer = ForwardTimer(engine_cache.device, rank=rank, stage=stage)
        self._announced = False  # whether a report named this rank yet
        self._closed = False

    def endpoint(self) -> bytes | None:
        """What another instance's rank needs to load from this rank's G2 (None without an exporting endpoint)."""
        g4 = self.store.g4
        return g4.endpoint() if g4 is not None and g4.seals is not None else None

    def start_loads(self, loads: Iterable[RequestLoad], layer_ratio: float = 0.0) -> None:
        """Start loading requests' blocks; blocks missing at planning time are load errors at once. Layer-wise
        loads start at once, one transfer per group of layers (``wait_for_layer`` waits for one group), groups sized
        by ``layer_ratio`` (the step plan's, see `kvbm.worker.layerwise.layer_groups`); the others are asynchronous
        (``poll`` reports their requests once done)."""
        by_layers: list[Move] = []
        for load in loads:
            self._load_errors.update(load.missing)
            if load.missing:
                self._failed_loads.setdefault(load.request_id, []).extend(
                    f"engine block {b}: no longer stored when the load was planned" for b in load.missing)
            if load.layerwise:
                for move in load.moves:
                    self._moves[move.move_id] = (move, load.request_id)
                by_layers.extend(load.moves)
            else:
                self._execute(load.moves, load.request_id, self._loading.setdefault(load.request_id, set()))
        if by_layers:
            self._layers.start(by_layers, layer_ratio)

    def prepare_transfers(self, layer_groups: bool = True) -> None:
        """Build now, once the engine's caches are registered, what this rank's transfers between the engine caches
        and the offload tiers use, so that no step builds or compiles it: with ``layer_groups`` (engines whose
        scheduler side plans layer-wise loads), every layer group a layer-wise load (`LayerwiseLoads.warm_up`) or a
        layer-wise store (`LayerwiseStores.warm_up`) can use, then the whole-block moves of both ways
        (`BlockStore.prepare_engine_pairs`). Nothing without a GPU engine cache; the loads' groups not with
        ``DYN_KVBM_DISABLE_LAYERWISE_ONBOARD``, the stores' only with ``DYN_KVBM_LAYERWISE_STORE``. A failure is
        logged, not raised: the steps then build what they need on first use, as without this call."""
        if not self._gpu_cache:
            return
        t0 = time.perf_counter()
        try:
            if layer_groups and self._layerwise_onboard:
                self._layers.warm_up(cost_sized=self._cost_layer_groups)
            if layer_groups and self._layer_stores is not None:
                self._layer_stores.warm_up()
            self.store.prepare_engine_pairs()  # (last: a disk file cuFile refuses raises here)
        except Exception as e:  # noqa: BLE001 - an optimisation: the steps build what they need on first use
            log.warning("kvbm: rank %d: transfer plans not built ahead (%r); the first steps build them",
                        self.rank, e)
            return
        log.info("kvbm: rank %d: transfer plans built in %.2f s", self.rank, time.perf_counter() - t0)

    def wait_for_layer(self, layer: int) -> None:
        """Order the engine's later work on ``layer`` after the layer-wise loads of its group: on the GPU the
        current stream waits on the device (the host goes on queueing the forward), on the CPU the call blocks."""
        self._layers.wait_for_layer(layer)

    @property
    def layer_transfers(self) -> tuple[tuple[BlockTransfer, ...], ...]:
        """This step's layer-wise transfers, per layer group (empty once finished)."""
        return self._layers.transfers

    def finish_layerwise_loads(self) -> None:
        """Block until this step's layer-wise loads are done and their failed blocks known (call after the
        forward, before the engine asks for load errors)."""
        if self._layers.finish():
            self._collect(self.store.poll())

    def begin_layer_stores(self, stores: Iterable[RequestStore]) -> None:
        """With ``DYN_KVBM_LAYERWISE_STORE``: take this step's stores into host memory, to be started per group of
        layers by `save_layer` as the forward computes them (the others wait for `start_stores`); once per step,
        before the forward's first ``save_layer``."""
        if self._layer_stores is None or self._stores_begun:
            return
        self._stores_begun = True
        taken = []
        for store in stores:
            for move in store.moves:
                if move.dst_tier in self.shared_read_only or not self._layer_stores.takes(move):
                    continue
                taken.append(move)
                self._taken.add(move.move_id)
                self._moves[move.move_id] = (move, store.request_id)
                self._storing.setdefault(store.request_id, set()).add(move.move_id)
        if taken:
            self._layer_stores.begin(taken)

    def save_layer(self, layer: int) -> None:
        """The forward has queued ``layer`` (vLLM's ``save_kv_layer``): start the layer-wise stores of every group
        of layers that ends there (ordered after the work queued on the current stream)."""
        if self._layer_stores is not None:
            self._layer_stores.save_layer(layer)

    def start_stores(self, stores: Iterable[RequestStore]) -> None:
        """Start storing requests' newly computed blocks (ordered after the work queued on the current stream); the
        groups of layer-wise stores not started yet start now."""
        if self._layer_stores is not None:
            self._layer_stores.finish()
        for store in stores:
            moves = [m for m in store.moves if m.move_id not in self._taken]
            self._execute(moves, store.request_id, self._storing.setdefault(store.request_id, set()))
        self._taken.clear()
        self._stores_begun = False

    def start_cascades(self, moves: Sequence[Move]) -> None:
        """Start tier-to-tier copies."""
        self._execute(moves, None, None)

    def hold(self, request_ids: Iterable[str]) -> None:
        """Requests whose blocks the engine keeps until their stores no longer read them (``poll`` reports them)."""
        self._held.update(request_ids)

    def finish_stores_of(self, request_ids: Iterable[str]) -> None:
        """Block until these requests' stores no longer read their engine blocks (before their reuse; a write into
        a disk may go on). Raises RuntimeError where such a store is neither running nor queued (this step's
        layer-wise stores before their groups start): nothing could end the wait."""
        request_ids = list(request_ids)
        waiting = set().union(*(self._storing.get(r, set()) for r in request_ids))
        while True:
            self._collect(self.store.poll())
            reading = waiting & self._storing_ids()
            if not reading:
                return
            if not self.store.busy:
                raise RuntimeError(f"stores {sorted(reading)} of requests {sorted(request_ids)} are neither running "
                                   "nor queued in the store (layer-wise stores not started yet?): nothing to wait for")
            self.store.wait_source_read(reading)

    def poll(self) -> tuple[set[str], set[str]]:
        """``(held requests whose stores no longer read their engine blocks, requests whose loads are done)``; never
        blocks. A store into a disk tier stops reading the engine's blocks once they are all in its bounce buffers:
        the engine may free them then, while the write (and its result for the leader) goes on."""
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
        """Results of the moves finished since the last report and the forward steps timed, for the leader; the
        first report names this rank (None when there is nothing to say)."""
        timings = self.timer.take()
        if not self._report and not self._released and not timings and self._announced:
            return None
        registered = frozenset() if self._announced else frozenset({self.rank})
        failed = sum(len(result.failed) for result in self._report.values())
        report = WorkerReport(self._report, self._released, timings, registered, {self.rank: failed} if failed else {})
        self._report, self._released, self._announced = {}, {}, True
        return report

    def idle(self) -> bool:
        """Whether nothing is running or waiting to be reported."""
        return not (self._moves or self._loading or self._storing or self._held or self._report or self._layers.active
                    or self._released)

    def close(self) -> None:
        """Finish every move, then release the tiers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._layers.finish()
            self.store.close()
        finally:
            self._shared.close()

    # -- internals ---------------------------------------------------------------------------------------------

    def _execute(self, moves: Sequence[Move], request_id: str | None, pending: set[int] | None) -> None:
        """Hand ``moves`` to the store, then track them (a move the store refuses leaves nothing to wait for)."""
        run = [m for m in moves if m.dst_tier not in self.shared_read_only]
        self.store.execute(run)
        for move in moves:
            if move.dst_tier in self.shared_read_only:  # the writer's move: reported done by this rank at once
                self._report[move.move_id] = MoveResult(move.move_id, {})
        for move in run:
            self._moves[move.move_id] = (move, request_id)
            if pending is not None:
                pending.add(move.move_id)

    def _storing_ids(self) -> set[int]:
        return set().union(*self._storing.values()) if self._storing else set()

    def _collect(self, results: list[MoveResult]) -> None:
        """Take the store's finished moves, then mark the stores that no longer read their engine blocks."""
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
        for move_id in self.store.take_sources_read():
            move, request_id = self._moves[move_id]
            if move.kind is MoveKind.STORE:
                self._storing.get(request_id, set()).discard(move_id)


def tier_geometry(caches: Sequence[PagedKVCache]) -> tuple[KVGeometry, torch.dtype]:
    """The geometry and dtype the tiers are allocated in for engine caches ``caches``: theirs when they all share
    one, else raw slots as wide as the largest block (`slot_geometry`)."""
    kinds = {(c.geometry, c.dtype) for c in caches}
    if len(kinds) == 1:
        return next(iter(kinds))
    return slot_geometry(max(c.geometry.block_bytes for c in caches)), torch.uint8


def replica_group(layout: RankLayout, rank: int, engine_id: str, timeout_s: float = 60.0) -> ReplicaGroup | None:
    """The group of ``rank`` sharing tiers (its pipeline stage's tensor-parallel ranks, the first of them the
    writer), or None when ``layout`` shares none; ``engine_id`` names the engine uniquely on its host."""
    if not layout.shares_tiers:
        return None
    tp = layout.tensor_parallel
    return ReplicaGroup(f"{engine_id}-stage{rank // tp}", writer=rank % tp == 0, num_readers=tp - 1,
                        timeout_s=timeout_s)
