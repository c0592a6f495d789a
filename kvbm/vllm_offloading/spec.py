"""``KvbmOffloadingSpec``: kvbm's tiers as an offloading backend of vLLM's native ``OffloadingConnector``.

Loaded by vLLM from the connector's extra config::

    {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
     "kv_connector_extra_config": {"spec_name": "KvbmOffloadingSpec",
                                   "spec_module_path": "kvbm.vllm_offloading.spec",
                                   "DYN_KVBM_CPU_CACHE_GB": "16"}}

Tier sizes and options come from ``DYN_KVBM_*`` (environment, overridden by such entries of the extra config);
``blocks_per_chunk`` (vLLM's offloaded block / GPU block ratio) is vLLM's. Both sides size the tiers from vLLM's
``worker_kv_bytes_per_block`` x world size, so the scheduler's index and every worker's memory agree.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from vllm.v1.kv_offload.base import CanonicalKVCaches, OffloadingManager, OffloadingSpec, OffloadingWorker
from vllm.v1.kv_offload.config import OffloadingConfig

from kvbm.config import KvbmConfig
from kvbm.tiers import TierSpec, kvbm_tiers

from .manager import KvbmOffloadingManager

__all__ = ["KvbmOffloadingSpec", "kvbm_config_from"]


def kvbm_config_from(extra_config: Mapping[str, Any]) -> KvbmConfig:
    """``KvbmConfig`` from the environment, with the ``DYN_KVBM_*`` entries of ``extra_config`` on top."""
    overrides = {k: str(v) for k, v in extra_config.items() if k.startswith("DYN_KVBM_")}
    return KvbmConfig.from_env({**os.environ, **overrides})


class KvbmOffloadingSpec(OffloadingSpec):
    """Scheduler side: `KvbmOffloadingManager` over kvbm's block index; worker side: `KvbmOffloadingWorker`."""

    def __init__(self, config: OffloadingConfig) -> None:
        super().__init__(config)
        if len(config.groups) != 1:
            raise ValueError(f"KvbmOffloadingSpec supports one KV cache group (full attention); got "
                             f"{len(config.groups)} groups")
        self.kvbm_config = kvbm_config_from(self.extra_config)
        world = max(config.parallel.world_size, 1)
        #: Bytes of one GPU block over all ranks (the unit kvbm's GB sizes count).
        self.block_bytes = config.worker_kv_bytes_per_block * world
        self.tiers: list[TierSpec] = (kvbm_tiers(self.kvbm_config, self.block_bytes)
                                      if config.worker_kv_bytes_per_block > 0 else [])
        self._manager: KvbmOffloadingManager | None = None
        self._worker: OffloadingWorker | None = None

    def get_manager(self) -> OffloadingManager:
        """The scheduler-side manager (one per spec)."""
        if self._manager is None:
            self._manager = KvbmOffloadingManager(
                self.tiers, self.kvbm_config, self.blocks_per_chunk,
                enable_events=self.kv_events_config.enable_kv_cache_events)
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        """This rank's worker: its tiers allocated in the geometry of ``kv_caches`` (one per spec)."""
        if self._worker is None:
            from .worker import KvbmOffloadingWorker  # torch-side imports only where the worker runs

            per_rank = self.config.worker_kv_bytes_per_block
            canonical = sum(t.page_size_bytes for t in kv_caches.tensors)
            if per_rank and canonical != per_rank:
                raise ValueError(f"vLLM's KV tensors hold {canonical} bytes per block, its offloading config "
                                 f"{per_rank}: the tiers would be sized wrong")
            self._worker = KvbmOffloadingWorker(kv_caches, self.tiers, self.kvbm_config, self.blocks_per_chunk)
        return self._worker
