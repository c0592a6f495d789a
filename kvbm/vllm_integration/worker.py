"""Worker side of the vLLM connector: vLLM's worker calls adapted to the shared `ConnectorWorker`.

``register_kv_caches`` describes vLLM's tensors (`kvbm.layouts.vllm_tensors`) and allocates this rank's tiers.
Per step: ``handle_preemptions`` finishes stores still reading blocks of preempted requests (about to be reused);
``start_load`` starts the plan's loads and cascades; ``save`` starts the stores of blocks this step's forward
computed (no wait: on a GPU they complete on the transfer library's streams); ``get_finished`` reports requests
whose loads are done (``finished_recving``) and held requests whose stores are done (``finished_sending``).
Engine blocks of failed loads are reported once through ``take_load_errors`` so vLLM recomputes them.
"""
from __future__ import annotations

import logging

import torch

from kvbm.config import KvbmConfig
from kvbm.connectors import process_metrics
from kvbm.connectors.worker import ConnectorWorker
from kvbm.layouts.vllm_tensors import describe_vllm_kv_caches
from kvbm.tiers import kvbm_tiers
from kvbm.vllm_integration.metadata import DynamoConnectorMetadata, DynamoWorkerMetadata

__all__ = ["WorkerSide"]

log = logging.getLogger(__name__)


class WorkerSide:
    """The connector's worker role for one rank (see the module docstring)."""

    def __init__(self, config: KvbmConfig, block_size: int, block_bytes: int) -> None:
        """``block_size`` and ``block_bytes`` (all layers) are what the scheduler side sized the tiers for."""
        self.config = config
        self.block_size = block_size
        self.block_bytes = block_bytes
        self.worker: ConnectorWorker | None = None

    def _worker(self) -> ConnectorWorker:
        if self.worker is None:
            raise RuntimeError("register_kv_caches has not been called: no tiers yet")
        return self.worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Describe vLLM's KV tensors and allocate this rank's tiers for them."""
        if self.worker is not None:
            raise RuntimeError("register_kv_caches was already called on this worker")
        cache = describe_vllm_kv_caches(kv_caches)
        g = cache.geometry
        if g.block_size != self.block_size or g.block_bytes != self.block_bytes:
            raise ValueError(f"KV tensors hold blocks of {g.block_size} tokens, {g.block_bytes} bytes; the "
                             f"scheduler side sized the tiers for {self.block_size} tokens, {self.block_bytes} bytes")
        log.info("kvbm: %d layers, %d GPU blocks of %d bytes, layout %s", g.num_layers, cache.num_blocks,
                 g.block_bytes, cache.name)
        metrics = process_metrics.acquire(self.config)
        try:
            self.worker = ConnectorWorker(cache, kvbm_tiers(self.config, g.block_bytes), self.config, metrics=metrics)
        except BaseException:
            process_metrics.release()
            raise

    def handle_preemptions(self, meta: DynamoConnectorMetadata) -> None:
        """Finish the stores still reading blocks of requests preempted this step."""
        if meta.plan.preempted:
            self._worker().finish_stores_of(meta.plan.preempted)

    def start_load(self, meta: DynamoConnectorMetadata) -> None:
        """Start this step's loads and cascades."""
        self._worker().start_loads(meta.plan.loads)
        self._worker().start_cascades(meta.plan.cascades)

    def save(self, meta: DynamoConnectorMetadata) -> None:
        """Start the stores of this step's completed blocks (without waiting) and note held requests."""
        self._worker().start_stores(meta.plan.stores)
        self._worker().hold(meta.plan.held)

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        """``(finished_sending, finished_recving)``."""
        if self.worker is None:
            return None, None
        sending, recving = self.worker.poll()
        return sending or None, recving or None

    def take_load_errors(self) -> set[int]:
        """Engine blocks whose load failed since the last call."""
        return self.worker.take_load_errors() if self.worker is not None else set()

    def take_report(self) -> DynamoWorkerMetadata | None:
        """Move results since the last report, for the scheduler side."""
        report = self.worker.take_report() if self.worker is not None else None
        return DynamoWorkerMetadata(report) if report is not None else None

    def shutdown(self) -> None:
        """Finish every transfer and release the tiers (idempotent)."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None
            process_metrics.release()
