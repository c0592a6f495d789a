"""``DynamoConnector``: vLLM 0.33 KV connector backed by kvbm's tiers (G2 host, G3 disk).

Drop-in for Dynamo KVBM's vLLM connector::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "DynamoConnector", "kv_role": "kv_both",
        "kv_connector_module_path": "kvbm.vllm_integration.connector"}'

Sizes and options come from the ``DYN_KVBM_*`` environment (``kvbm.config.KvbmConfig``); entries of
``kv_connector_extra_config`` named ``DYN_KVBM_*`` override the environment, and ``"kv_layout": "HND"`` asks vLLM
for the LBHNC layout (default: vLLM's choice, LBNHC). A best-effort cache: blocks are stored after the forward
that computed them and loaded asynchronously into a request's new blocks; a failed load is reported so vLLM
recomputes. The scheduler role holds the block index (`scheduler`), the worker role the tiers' memory (`worker`);
they talk only through vLLM's per-step metadata, so they may live in different processes. One worker per engine
for now (no tensor or pipeline parallelism), one KV cache group (no hybrid models).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvbm.config import KvbmConfig
from kvbm.connectors import process_metrics
from kvbm.connectors.leader import ConnectorLeader
from kvbm.tiers import kvbm_tiers
from kvbm.vllm_integration.metadata import DynamoConnectorMetadata, DynamoWorkerMetadata
from kvbm.vllm_integration.scheduler import SchedulerSide
from kvbm.vllm_integration.worker import WorkerSide

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

_LAYOUTS = ("NHD", "HND")  # what get_required_kvcache_layout may ask vLLM for


def kvbm_config_from(extra_config: dict[str, Any]) -> KvbmConfig:
    """``KvbmConfig`` from the environment, with ``DYN_KVBM_*`` entries of the connector's extra config on top."""
    overrides = {k: str(v) for k, v in extra_config.items() if k.startswith("DYN_KVBM_")}
    return KvbmConfig.from_env({**os.environ, **overrides})


def _check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
    """Refuse the setups the connector does not handle, with the reason."""
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise ValueError(f"DynamoConnector supports one worker per engine; got tensor_parallel_size="
                         f"{parallel.tensor_parallel_size}, pipeline_parallel_size={parallel.pipeline_parallel_size}")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"DynamoConnector supports models with one KV cache group (full attention only); this model "
                         f"has {len(groups)} groups (a hybrid model: sliding-window, Mamba or mixed layers)")
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec:
        raise ValueError(f"DynamoConnector supports full-attention KV caches, got {type(spec).__name__}")


def _block_bytes(kv_cache_config: KVCacheConfig) -> int:
    """Bytes of one block over all layers of the (single) KV cache group."""
    group = kv_cache_config.kv_cache_groups[0]
    return group.kv_cache_spec.page_size_bytes * len(group.layer_names)


class DynamoConnector(KVConnectorBase_V1):
    """vLLM ``KVConnectorBase_V1`` that offloads full KV blocks to kvbm's tiers and loads prefix hits back."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        """Build the scheduler or the worker side for ``role``; raise ValueError for unsupported setups."""
        super().__init__(vllm_config, role, kv_cache_config)
        _check_supported(vllm_config, kv_cache_config)
        config = kvbm_config_from(self._kv_transfer_config.kv_connector_extra_config)
        block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        block_bytes = _block_bytes(kv_cache_config)
        self.scheduler_side: SchedulerSide | None = None
        self.worker_side: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            tiers = kvbm_tiers(config, block_bytes)
            metrics = process_metrics.acquire(config)
            try:
                self.scheduler_side = SchedulerSide(ConnectorLeader(tiers, config, block_size, metrics=metrics))
            except BaseException:
                process_metrics.release()
                raise
        elif role == KVConnectorRole.WORKER:
            self.worker_side = WorkerSide(config, block_size, block_bytes)
        else:
            raise ValueError(f"role must be a KVConnectorRole, got {role!r}")

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """``kv_connector_extra_config["kv_layout"]`` ("NHD" or "HND"), or None for vLLM's default."""
        transfer = vllm_config.kv_transfer_config
        layout = transfer.kv_connector_extra_config.get("kv_layout") if transfer is not None else None
        if layout is not None and layout not in _LAYOUTS:
            raise ValueError(f"kv_connector_extra_config['kv_layout'] must be 'NHD' or 'HND', got {layout!r}")
        return layout

    @property
    def requires_kv_delivery(self) -> bool:
        """False: a best-effort cache (a dropped store is a later cache miss)."""
        return False

    @property
    def _worker(self) -> WorkerSide:
        if self.worker_side is None:
            raise RuntimeError("this DynamoConnector has the scheduler role")
        return self.worker_side

    @property
    def _scheduler(self) -> SchedulerSide:
        if self.scheduler_side is None:
            raise RuntimeError("this DynamoConnector has the worker role")
        return self.scheduler_side

    def _meta(self, meta: KVConnectorMetadata | None = None) -> DynamoConnectorMetadata:
        """The given (default: the bound) metadata, checked to be ours."""
        meta = self._get_connector_metadata() if meta is None else meta
        if not isinstance(meta, DynamoConnectorMetadata):
            raise TypeError(f"expected DynamoConnectorMetadata, got {type(meta).__name__}")
        return meta

    # -- worker side -----------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Describe the KV tensors and allocate this rank's tiers."""
        self._worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Finish stores reading blocks of preempted requests before vLLM reuses them."""
        self._worker.handle_preemptions(self._meta(kv_connector_metadata))

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Start the step's loads (asynchronous: completion comes through ``get_finished``) and cascades."""
        self._worker.start_load(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: loads are asynchronous, for requests not in this forward."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        """Nothing per layer: whole blocks are stored after the forward."""

    def wait_for_save(self) -> None:
        """Start the stores of the blocks this step computed (does not wait for them)."""
        self._worker.save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """``(finished_sending, finished_recving)``."""
        return self._worker.get_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        """GPU blocks whose load failed (vLLM recomputes them)."""
        return self._worker.take_load_errors()

    def build_connector_worker_meta(self) -> DynamoWorkerMetadata | None:
        """Move results since the last step, for the scheduler side."""
        return self.worker_side.take_report() if self.worker_side is not None else None

    def shutdown(self) -> None:
        """Worker: finish transfers and release the tiers; scheduler: release the metrics."""
        if self.worker_side is not None:
            self.worker_side.shutdown()
        elif self.scheduler_side is not None:
            self.scheduler_side = None
            process_metrics.release()

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

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        """Split the loaded tokens into those from G2 (HOST) and from G3 (DISK)."""
        if num_external_tokens <= 0:
            return {}
        host, disk = self._scheduler.hit_tiers(request, num_external_tokens)
        return {source: n for source, n in ((CacheHitSource.HOST, host), (CacheHitSource.DISK, disk)) if n}

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """The step's plan."""
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Take the workers' move results and finished loads."""
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Store the remaining full blocks; hold the request's blocks while its stores are in flight."""
        return self._scheduler.request_finished(request, block_ids)
