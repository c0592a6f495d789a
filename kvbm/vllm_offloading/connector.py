"""``KvbmOffloadingConnector``: vLLM's ``OffloadingConnector`` plus the failure channel its 0.33 release lacks.

vLLM 0.33's connector asserts that every transfer job succeeded and never asks which GPU blocks failed to load. This
subclass changes nothing else: the worker side returns the GPU blocks kvbm's worker failed to load from
``get_block_ids_with_load_errors`` (vLLM recomputes them) and sends the failed blocks of each move with the worker
metadata; the scheduler side hands them to kvbm's manager before vLLM completes the jobs, so failed stores are
discarded and slots whose bytes a read found bad are dropped. Use it with ``KvbmOffloadingSpec``::

    {"kv_connector": "KvbmOffloadingConnector",
     "kv_connector_module_path": "kvbm.vllm_offloading.connector", "kv_role": "kv_both",
     "kv_connector_extra_config": {"spec_name": "KvbmOffloadingSpec",
                                   "spec_module_path": "kvbm.vllm_offloading.spec"}}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import OffloadingWorkerMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import OffloadingConnector

from kvbm.leader.plans import MoveResult

from .manager import KvbmOffloadingManager
from .worker import KvbmOffloadingWorker

__all__ = ["KvbmOffloadingConnector", "KvbmWorkerMetadata"]


@dataclass
class KvbmWorkerMetadata(OffloadingWorkerMetadata):
    """vLLM's completed jobs and transfer stats, plus the failed blocks of kvbm's moves (``failures``)."""

    failures: list[MoveResult] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Sum the job counts across workers (as vLLM does) and keep every worker's failures."""
        merged = OffloadingWorkerMetadata.aggregate(self, other)
        assert isinstance(merged, OffloadingWorkerMetadata)
        failures = list(self.failures) + list(getattr(other, "failures", []))
        return KvbmWorkerMetadata(merged.completed_jobs, merged.transfer_stats, failures)


class KvbmOffloadingConnector(OffloadingConnector):
    """``OffloadingConnector`` that reports kvbm's failed transfers to vLLM (see the module docstring)."""

    def register_kv_caches(self, kv_caches: Any) -> None:
        """Register as vLLM does, then switch kvbm's worker to reporting failures instead of raising."""
        super().register_kv_caches(kv_caches)
        worker = self._kvbm_worker()
        if worker is not None:
            worker.failure_reports = True

    def _kvbm_worker(self) -> KvbmOffloadingWorker | None:
        side = self.connector_worker
        worker = getattr(side, "worker", None) if side is not None else None
        return worker if isinstance(worker, KvbmOffloadingWorker) else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """GPU blocks kvbm's worker failed to load since the last call."""
        worker = self._kvbm_worker()
        return worker.take_load_errors() if worker is not None else set()

    def build_connector_worker_meta(self) -> OffloadingWorkerMetadata | None:
        """vLLM's worker metadata as a `KvbmWorkerMetadata` (so aggregating ranks keeps every rank's failures)."""
        meta = super().build_connector_worker_meta()
        worker = self._kvbm_worker()
        failures = worker.take_failures() if worker is not None else []
        if meta is None and not failures:
            return None
        base = meta if meta is not None else OffloadingWorkerMetadata()
        return KvbmWorkerMetadata(base.completed_jobs, base.transfer_stats, failures)

    def update_connector_output(self, connector_output: Any) -> None:
        """Give kvbm's manager the failed blocks before vLLM completes their jobs."""
        meta = connector_output.kv_connector_worker_meta
        failures = getattr(meta, "failures", None)
        if failures:
            manager = self.scheduler.manager
            if isinstance(manager, KvbmOffloadingManager):
                with manager.lock:
                    manager.note_failures(failures)
        super().update_connector_output(connector_output)
