"""``DynamoConnector``: vLLM 0.33 KV connector on kvbm's tiers, a drop-in for Dynamo KVBM's (README: command line).

The scheduler role holds the block index (`scheduler`), each worker rank (tensor x pipeline parallel, `ranks`) its
shard of the tiers; they talk only through vLLM's per-step metadata (`metadata`), and a move completes once every
rank reported it. Blocks are stored after the forward that computed them; hits held in G2 are loaded layer by layer
beside the forward that reads them, others asynchronously; a load failed on any rank is reported so vLLM recomputes
it on all; MLA's latent cache, the same on every tensor-parallel rank, is stored once in a host pool and a disk
file the ranks share. ``DYN_KVBM_*`` entries of the extra config override the
environment; ``"kv_layout": "HND"`` asks vLLM for LBHNC.

Hybrid models (vLLM's hybrid KV cache manager, ``SupportsHMA``): every full-attention and sliding-window group is
offloaded, and every group of recurrent state (Mamba, linear attention) whose states vLLM keeps at block boundaries
(``mamba_cache_mode="align"``: block ``i`` of a request holds the state after ``(i + 1) * block_size`` tokens), each
group's engine cache a tier of the workers' store and its blocks keyed apart at its own block size (groups may
differ in block size, page bytes and layer count: the tiers' slots then hold one block of any group); a hit is one
every group can restore, ending on a multiple of every group's block size (a state group: the one state block
ending there), and a load that fails in any group fails the request's load as a whole (``failed_recving``: vLLM
recomputes it), as vLLM takes no block ids of a model with several groups. A model with a state group vLLM keeps
otherwise (``mamba_cache_mode="none"``, speculative state blocks, sub-block hits: `ranks.state_refusal`),
of state groups only, or with a group whose layers have unlike specs is refused with the reason logged: no request
is matched or stored.

Disaggregated prefill -> decode: ``kv_role`` ``kv_producer`` keeps finished requests' blocks in G2 for decode
instances and hands back ``kv_transfer_params`` naming them; ``kv_consumer`` loads a request's blocks from the
producer named in its params over NIXL (`kvbm.connectors.pd`); ``kv_both`` offloads only. With
``DYN_KVBM_G4_ETCD_ENDPOINT`` (the shared G4 tier, `kvbm.connectors.directory`) every rank of any role exports its G2
and loads prefix blocks other instances hold. Each worker's NIXL endpoint reaches the scheduler through vLLM's
handshake metadata (``get_handshake_metadata`` -> ``set_xfer_handshake_metadata``).

Workers register with the scheduler side through the same handshake (every rank whose tiers are allocated), or
through their first per-step report: until every rank has, no hit is reported and nothing stored, and a rank
missing ``DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS`` after the scheduler side started is an error naming it
(`kvbm.connectors.registration`).

Metrics (``DYN_KVBM_METRICS``, `kvbm.connectors.process_metrics`): the scheduler side serves on
``DYN_KVBM_METRICS_PORT``; a worker rank that runs apart from it (more than one rank, or vLLM's multiprocessing
executor) serves its transfer series, labelled ``rank``, on ``DYN_KVBM_METRICS_PORT + 1 + rank``; under vLLM's
in-process executor both sides share one port and KVBM's unlabelled series.

The cost rule learns the engine's prefill rate: the scheduler side marks prefill-dominated steps in the plan
(`kvbm.connectors.prefill`); each rank times their forward from ``bind_connector_metadata`` (both model runners
call it right before the forward is queued) to the first of ``finish_forward`` (V2 runner), ``start_load_kv``
called after the forward (V1 runner, a step without layer-wise loads, the only steps timed) and ``wait_for_save``,
on a GPU with CUDA events (`kvbm.connectors.forward_timer`), and reports it with its move results.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.v1.kv_cache_interface import MLAAttentionSpec

from kvbm.connectors import kvbm_config_from, process_metrics
from kvbm.connectors.groups import FULL, STATE
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import StepPlan
from kvbm.connectors.worker import ConnectorWorker, G4Options, replica_group
from kvbm.layouts.vllm_tensors import describe_vllm_kv_caches
from kvbm.tiers import kvbm_tiers
from kvbm.vllm_integration.metadata import DynamoConnectorMetadata, DynamoHandshakeMetadata, DynamoWorkerMetadata
from kvbm.vllm_integration.ranks import check_supported, group_spec, kv_groups, rank_layout, ranks_apart
from kvbm.vllm_integration.scheduler import SchedulerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["DynamoConnector", "kvbm_config_from"]

log = logging.getLogger(__name__)

class DynamoConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM ``KVConnectorBase_V1`` that offloads full KV blocks to kvbm's tiers and loads prefix hits back."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        """The scheduler side (block index) or the worker side (tiers, once KV caches are registered)."""
        super().__init__(vllm_config, role, kv_cache_config)
        check_supported(vllm_config, kv_cache_config)
        self.config = kvbm_config_from(self._kv_transfer_config.kv_connector_extra_config)
        self.groups, self.refusal = kv_groups(kv_cache_config)
        if self.refusal is not None:
            log.warning("kvbm: this model's KV is not offloaded: %s", self.refusal)
            self.groups = ()
        self.hybrid = len(kv_cache_config.kv_cache_groups) > 1
        self.group_layers = {g.index: list(kv_cache_config.kv_cache_groups[g.index].layer_names) for g in self.groups}
        first = (self.groups[0] if self.groups else kv_cache_config.kv_cache_groups[0].kv_cache_spec).block_size
        #: the blocks the leader looks up: the first full-attention group's (a hybrid model's groups may differ)
        self.block_size = next((g.block_size for g in self.groups if g.kind == FULL), first)
        self.rank = vllm_config.parallel_config.rank if role == KVConnectorRole.WORKER else 0
        self.layout = rank_layout(vllm_config, kv_cache_config, self.rank)
        self.block_bytes = self.layout.total_block_bytes  # summed over ranks: sizes the tiers on both sides
        self.latent = type(group_spec(kv_cache_config.kv_cache_groups[0].kv_cache_spec)) is MLAAttentionSpec
        #: whose metrics this side records into (`process_metrics`): its rank's own when the ranks run apart from the
        #: scheduler (a worker's, on the port after the scheduler's), else the process's (None)
        self.apart = ranks_apart(vllm_config)
        self.metrics_rank = self.rank if self.apart and role == KVConnectorRole.WORKER else None
        kv_role = self._kv_transfer_config.kv_role
        if self.hybrid and kv_role in ("kv_producer", "kv_consumer") and role == KVConnectorRole.SCHEDULER:
            log.warning("kvbm: disaggregated prefill is not implemented for a hybrid model (%d KV cache groups): "
                        "this %s instance computes its prompts itself", len(kv_cache_config.kv_cache_groups),
                        kv_role)
        shared = bool(self.config.g4_etcd_endpoint)  # the shared G4 tier: every instance exports and loads
        self.g4 = G4Options(export=kv_role == "kv_producer" or shared, load=kv_role == "kv_consumer" or shared,
                            timeout_s=self.config.pd_load_timeout_secs)
        self.scheduler_side: SchedulerSide | None = None
        self.worker: ConnectorWorker | None = None
        self._layers: dict[str, int] = {}  # layer name -> layer of the engine cache (group 0), once registered
        if role == KVConnectorRole.SCHEDULER:
            wait = self.config.leader_worker_init_timeout_secs if self.refusal is None else None  # (else no work)
            leader = process_metrics.build_with(self.config, lambda metrics: ConnectorLeader(
                kvbm_tiers(self.config, self.block_bytes, self.layout.stored_block_bytes), self.config, self.block_size,
                num_workers=self.layout.world_size, metrics=metrics, block_bytes=self.block_bytes, layerwise=True,
                worker_init_timeout_s=wait), sides="scheduler" if self.apart else "both")
            leader.engine_id = str(self._kv_transfer_config.engine_id)
            self.scheduler_side = SchedulerSide(leader, producer=kv_role == "kv_producer",
                                                consumer=kv_role == "kv_consumer")
        elif role != KVConnectorRole.WORKER:
            raise ValueError(f"role must be a KVConnectorRole, got {role!r}")
        if self.scheduler_side is not None:
            self.scheduler_side.configure(self.groups, self.refusal)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """``kv_connector_extra_config["kv_layout"]`` ("NHD" or "HND"), or None for vLLM's default."""
        transfer = vllm_config.kv_transfer_config
        layout = transfer.kv_connector_extra_config.get("kv_layout") if transfer is not None else None
        if layout is not None and layout not in ("NHD", "HND"):
            raise ValueError(f"kv_connector_extra_config['kv_layout'] must be 'NHD' or 'HND', got {layout!r}")
        return layout

    @property
    def requires_kv_delivery(self) -> bool:
        """False: a best-effort cache (a dropped store is a later cache miss)."""
        return False

    @property
    def _worker(self) -> ConnectorWorker | None:
        """The worker's tiers (None when this model's KV is refused)."""
        if self.worker is None and self.refusal is None:
            raise RuntimeError("register_kv_caches has not been called on this worker: no tiers yet")
        return self.worker

    @property
    def _scheduler(self) -> SchedulerSide:
        if self.scheduler_side is None:
            raise RuntimeError("this DynamoConnector has the worker role")
        return self.scheduler_side

    def _plan(self, meta: KVConnectorMetadata | None = None) -> StepPlan:
        """The plan of the given (default: the bound) metadata, checked to be ours."""
        meta = self._get_connector_metadata() if meta is None else meta
        if not isinstance(meta, DynamoConnectorMetadata):
            raise TypeError(f"expected DynamoConnectorMetadata, got {type(meta).__name__}")
        return meta.plan

    # -- worker side -----------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Describe vLLM's KV tensors and allocate this rank's tiers for them."""
        if self.worker is not None:
            raise RuntimeError("register_kv_caches was already called on this worker")
        if self.refusal is not None:
            log.info("kvbm: rank %d allocates no tiers: %s", self.rank, self.refusal)
            return
        groups = {g.engine_tier: describe_vllm_kv_caches(self._group_caches(kv_caches, g.index),
                                                         latent=self.latent or g.kind == STATE)
                  for g in self.groups}
        for group in self.groups:
            g, cache = groups[group.engine_tier].geometry, groups[group.engine_tier]
            if group.kind == STATE:  # (per layer a page of state bytes: [blocks, 1, 1, bytes], as Mamba binds it)
                if g.block_size != 1:
                    raise ValueError(f"state tensors of KV cache group {group.index} hold {g.block_size} states per "
                                     f"block; kvbm moves one")
                log.info("kvbm: rank %d of %d: KV cache group %d: %d layers of recurrent state, %d GPU blocks of %d "
                         "bytes (the state after every %d tokens)", self.rank, self.layout.world_size, group.index,
                         g.num_layers, cache.num_blocks, g.block_bytes, group.block_size)
                continue
            if g.block_size != group.block_size:
                raise ValueError(f"KV tensors of KV cache group {group.index} hold blocks of {g.block_size} tokens; "
                                 f"the KV cache config says {group.block_size}")
            log.info("kvbm: rank %d of %d: KV cache group %d: %d layers, %d GPU blocks of %d tokens and %d bytes, "
                     "layout %s", self.rank, self.layout.world_size, group.index, g.num_layers, cache.num_blocks,
                     g.block_size, g.block_bytes, cache.name)
        self.layout.check_rank(self.rank, max(c.geometry.block_bytes for c in groups.values()))
        cache = groups.pop(self.groups[0].engine_tier)
        self._layers = {name: i for i, name in enumerate(self._group_caches(kv_caches, self.groups[0].index))}
        engine_id = f"{self._vllm_config.instance_id}-dp{self._vllm_config.parallel_config.data_parallel_rank}"
        replicas = replica_group(self.layout, self.rank, engine_id)
        tiers = kvbm_tiers(self.config, self.block_bytes, self.layout.stored_block_bytes)
        stage = (self.rank // self.layout.tensor_parallel) % len(self.layout.stage_layers)
        self.worker = process_metrics.build_with(  # as many blocks as the scheduler's index, each of this rank's size
            self.config, lambda metrics: ConnectorWorker(cache, tiers, self.config, metrics=metrics, replicas=replicas,
                                                         rank=self.rank, stage=stage, g4=self.g4, groups=groups),
            rank=self.metrics_rank, sides="worker" if self.apart else "both")
        if self.worker.tier_geometry != cache.geometry:
            log.info("kvbm: rank %d: KV cache groups of unlike blocks share the tiers' %d-byte slots",
                     self.rank, self.worker.tier_geometry.block_bytes)
        self.worker.prepare_transfers(layer_groups=True)  # this connector's scheduler side plans layer-wise loads

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        """This rank's registration (its tiers are allocated) with its NIXL endpoint when it exports its G2 (for the
        scheduler's P/D params); None without tiers."""
        if self.worker is None:
            return None
        return DynamoHandshakeMetadata(self.rank, self.worker.endpoint())

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        """Every rank's registration and endpoint (tensor parallel ranks of one stage), from the workers' handshake
        metadata."""
        self.set_xfer_handshake_metadata_pp_aware({(0, tp): meta for tp, meta in metadata.items()})

    def set_xfer_handshake_metadata_pp_aware(
            self, metadata: dict[tuple[int, int], KVConnectorHandshakeMetadata]) -> None:
        """Every rank's registration and endpoint, keyed ``(pipeline rank, tensor rank)`` as vLLM gathers them."""
        if self.scheduler_side is None:
            return
        leader = self.scheduler_side.leader
        leader.register_workers(m.rank for m in metadata.values() if isinstance(m, DynamoHandshakeMetadata))
        if not self.g4.export:
            return
        tp = self.layout.tensor_parallel
        endpoints = {pp * tp + rank: meta for (pp, rank), meta in metadata.items()}
        if sorted(endpoints) != list(range(self.layout.world_size)) or not all(
                isinstance(m, DynamoHandshakeMetadata) and m.endpoint is not None for m in endpoints.values()):
            raise ValueError(f"kvbm P/D: expected an endpoint from each of {self.layout.world_size} ranks, got "
                             f"ranks {sorted(r for r, m in endpoints.items() if getattr(m, 'endpoint', None))}")
        leader.endpoints = tuple(endpoints[r].endpoint for r in range(self.layout.world_size))

    def _group_caches(self, kv_caches: dict[str, torch.Tensor], group: int) -> dict[str, torch.Tensor]:
        """The tensors of one KV cache group's layers (all of them for a single-group model, in vLLM's order)."""
        if not self.hybrid:
            return kv_caches
        missing = [name for name in self.group_layers[group] if name not in kv_caches]
        if missing:
            raise ValueError(f"register_kv_caches: KV cache group {group}'s layers {missing} have no tensor")
        return {name: kv_caches[name] for name in self.group_layers[group]}

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Finish the stores still reading blocks of requests preempted this step, before vLLM reuses them."""
        preempted = self._plan(kv_connector_metadata).preempted
        if preempted and self._worker is not None:
            self._worker.finish_stores_of(preempted)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Take the step's plan; on a worker, start timing the forward when the plan marks the step (both runners
        bind right before they queue the forward)."""
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None:
            plan = self._plan(connector_metadata)
            if plan.timed_tokens:
                self.worker.timer.start(plan.step, plan.timed_tokens)

    def finish_forward(self) -> None:
        """The V2 runner has queued the forward: the step's timing ends here."""
        if self.worker is not None:
            self.worker.timer.stop()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Start the step's loads (asynchronous: completion comes through ``get_finished``) and cascades. Without
        layer-wise loads the V1 runner calls this after queueing the forward: the step's timing ends first."""
        plan, worker = self._plan(), self._worker
        if worker is not None:
            if not any(load.layerwise for load in plan.loads):
                worker.timer.stop()
            worker.start_loads(plan.loads, plan.layer_ratio)
            worker.start_cascades(plan.cascades)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Order this layer's attention after the layer-wise loads of its layer group (on the GPU's stream)."""
        worker, layer = self._worker, self._layers.get(layer_name)
        if worker is not None and layer is not None:  # (a hybrid model's other groups have no layer-wise loads)
            worker.wait_for_layer(layer)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        """With ``DYN_KVBM_LAYERWISE_STORE``, start the step's stores into host memory for the group of layers
        ending at this layer (the first call takes the step's stores); else nothing: whole blocks are stored after
        the forward."""
        worker, layer = self._worker, self._layers.get(layer_name)
        if worker is not None and layer is not None:
            worker.begin_layer_stores(self._plan().stores)
            worker.save_layer(layer)

    def wait_for_save(self) -> None:
        """Start the stores of the blocks this step computed (without waiting for them); note held requests; take
        the results of this step's layer-wise loads."""
        plan, worker = self._plan(), self._worker
        if worker is not None:
            worker.timer.stop()  # (stopped already unless the runner called neither finish_forward nor start_load_kv)
            worker.start_stores(plan.stores)
            worker.hold(plan.held)
            worker.finish_layerwise_loads()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """``(finished_sending, finished_recving)``: held requests whose stores no longer read their blocks, loaded
        requests."""
        if self.worker is None:
            return None, None
        sending, recving = self.worker.poll()
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Finished stores and loads; for a hybrid model also the requests whose load failed in any group
        (``failed_recving``: vLLM recomputes them whole)."""
        results = super().get_transfer_results(finished_req_ids)
        if self.hybrid and self.worker is not None:
            failed = self.worker.take_failed_loads()
            for request_id, reasons in failed.items():
                log.warning("kvbm: request %s: load failed (%s); vLLM recomputes it", request_id, "; ".join(reasons))
            results.failed_recving = set(failed)
        return results

    def get_block_ids_with_load_errors(self) -> set[int]:
        """GPU blocks whose load failed (vLLM recomputes them); none for a hybrid model, whose failed loads go by
        request (`get_transfer_results`)."""
        worker = self._worker
        if worker is None:
            return set()
        worker.finish_layerwise_loads()
        errors = worker.take_load_errors()
        return set() if self.hybrid else errors

    def build_connector_worker_meta(self) -> DynamoWorkerMetadata | None:
        """Move results since the last step, for the scheduler side."""
        report = self.worker.take_report() if self.worker is not None else None
        return DynamoWorkerMetadata(report) if report is not None else None

    def shutdown(self) -> None:
        """Worker: finish transfers and release the tiers. Either side: release the process's metrics."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        elif self.scheduler_side is None:
            return
        else:
            self.scheduler_side.leader.close()  # this instance's G4 entries vanish now, its watch stops
        self.scheduler_side = None
        process_metrics.release(self.metrics_rank)

    # -- scheduler side --------------------------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        """Start tracking ``request``."""
        self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Whole blocks stored beyond vLLM's hit, loaded asynchronously."""
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Plan the load into the blocks just allocated."""
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        """Split the loaded tokens into those from G2 (HOST) and from G3 (DISK)."""
        return self._scheduler.hit_sources(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """The step's plan."""
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Take the workers' move results and finished loads."""
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Store the remaining full blocks; hold the request's blocks while its stores are in flight; a producer
        returns where a decode instance finds the prompt's blocks (``kv_transfer_params``)."""
        return self._scheduler.request_finished(request, block_ids)

    def request_finished_all_groups(self, request: Request, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        """`request_finished` with every KV cache group's block ids (vLLM's hybrid KV cache manager)."""
        return self._scheduler.request_finished(request, tuple(block_ids))
