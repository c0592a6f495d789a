"""Worker side of the vLLM connector: describes vLLM's KV tensors, owns the block manager, runs the moves.

``register_kv_caches`` describes the tensors with :mod:`kvbm.layouts` (vLLM 0.33's per-layer 4-D views
``[num_blocks, kv_heads, block_size, 2 * head_dim]`` strided into one buffer, in any standardized order found from
the strides and layer offsets; or the classic 5-D per-layer tensors of FlashAttention ``[2, B, N, H, D]`` and
FlashInfer ``[B, 2, N, H, D]``, NHD or HND), builds the manager and registers it for the scheduler side.

Per step: ``handle_preemptions`` finishes offloads still reading blocks of preempted requests (their blocks are
about to be reused); ``start_load`` submits the onboards; ``save`` submits the offloads of blocks computed by
this step's forward (no wait: on a GPU they complete on the transfer engine's streams); ``get_finished`` polls
the manager and reports requests whose loads are done (``finished_recving``) and held finished requests whose
offloads are done (``finished_sending``). GPU blocks of failed loads are reported once through
``take_load_errors`` so vLLM recomputes them. (The manager serves its metrics when ``DYN_KVBM_METRICS`` is set.)
"""
from __future__ import annotations

import logging
from collections import defaultdict

import torch

from kvbm.config import KvbmConfig
from kvbm.layouts import PagedKVCache, presets
from kvbm.manager import BlockManager, Ticket
from kvbm.vllm_integration import registry
from kvbm.vllm_integration.metadata import DynamoConnectorMetadata, DynamoWorkerMetadata

__all__ = ["WorkerSide", "describe_vllm_kv_caches"]

log = logging.getLogger(__name__)


def _standardized_order(views: list[torch.Tensor]) -> str:
    """The physical order (e.g. "LBNHC") of per-layer ``[B, H, N, C]`` views strided into one buffer."""
    first = views[0]
    strides = {"B": first.stride(0), "H": first.stride(1), "N": first.stride(2), "C": first.stride(3)}
    if len(views) > 1:
        strides["L"] = (views[1].data_ptr() - first.data_ptr()) // first.element_size()
    else:  # a single layer: its place in the order does not change any address
        strides["L"] = first.untyped_storage().nbytes() // first.element_size()
    return "".join(sorted(strides, key=lambda d: -strides[d]))


def describe_vllm_kv_caches(kv_caches: dict[str, torch.Tensor]) -> PagedKVCache:
    """Describe the tensors vLLM hands ``register_kv_caches`` (layer order as given) as a ``PagedKVCache``."""
    if not isinstance(kv_caches, dict) or not kv_caches:
        raise TypeError(f"kv_caches must be a non-empty dict of layer name -> tensor, got {kv_caches!r:.80}")
    tensors = list(kv_caches.values())
    dims = {t.dim() for t in tensors}
    if dims == {4}:
        order = _standardized_order(tensors)
        if order not in presets.STANDARDIZED_ORDERS:
            raise ValueError(f"4-D KV views with physical order {order} are not one of vLLM's standardized "
                             f"layouts {presets.STANDARDIZED_ORDERS}")
        return presets.vllm_standardized(tensors, order)
    if dims == {5}:
        t = tensors[0]
        token_dim, head_dim = 2, 3
        hnd = "HND" if t.stride(head_dim) > t.stride(token_dim) else "NHD"
        if t.shape[0] == 2:
            return presets.vllm_flash_attn(tensors, hnd)
        if t.shape[1] == 2:
            return presets.vllm_flashinfer(tensors, hnd)
        raise ValueError(f"5-D KV tensors must be [2, B, N, H, D] (FlashAttention) or [B, 2, N, H, D] (FlashInfer), "
                         f"got shape {tuple(t.shape)}")
    raise ValueError(f"unsupported KV cache tensors: dimensions {sorted(dims)} (expected vLLM 0.33's 4-D views or "
                     f"the classic 5-D per-layer tensors; MLA caches are not supported)")


class WorkerSide:
    """The connector's worker role for one engine (see the module docstring)."""

    def __init__(self, engine_id: str, config: KvbmConfig, block_size: int) -> None:
        """``block_size`` is vLLM's; the registered tensors must agree with it."""
        self.engine_id = engine_id
        self.config = config
        self.block_size = block_size
        self.entry: registry.ManagerEntry | None = None
        self._loads: dict[str, list[Ticket]] = defaultdict(list)
        self._saves: dict[str, list[Ticket]] = defaultdict(list)
        self._held: set[str] = set()
        self._saves_done: dict[str, int] = {}
        self._load_errors: set[int] = set()

    @property
    def manager(self) -> BlockManager:
        """The block manager (after ``register_kv_caches``)."""
        return self._entry().manager

    def _entry(self) -> registry.ManagerEntry:
        """The registered manager entry; a clear error before ``register_kv_caches``."""
        if self.entry is None:
            raise RuntimeError("register_kv_caches has not been called: no block manager yet")
        return self.entry

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Describe vLLM's KV tensors, build the block manager on them and register it for the scheduler side."""
        if self.entry is not None:
            raise RuntimeError(f"KV caches of engine {self.engine_id} are already registered")
        cache = describe_vllm_kv_caches(kv_caches)
        if cache.geometry.block_size != self.block_size:
            raise ValueError(f"KV tensors hold {cache.geometry.block_size} tokens per block, vLLM's block_size is "
                             f"{self.block_size}")
        manager = BlockManager(cache, self.config)
        log.info("kvbm: %d layers, %d GPU blocks of %d bytes, layout %s", cache.geometry.num_layers,
                 cache.num_blocks, cache.geometry.block_bytes, cache.name)
        try:
            self.entry = registry.register(self.engine_id, manager)
        except BaseException:
            manager.close()
            raise

    def handle_preemptions(self, meta: DynamoConnectorMetadata) -> None:
        """Finish the offloads still reading blocks of requests preempted this step."""
        if not meta.preempted:
            return
        entry = self._entry()
        with entry.lock:
            for request_id in meta.preempted:
                for ticket in self._saves.get(request_id, ()):
                    if not ticket.done:
                        entry.manager.wait(ticket)

    def start_load(self, meta: DynamoConnectorMetadata) -> None:
        """Submit this step's onboards."""
        if not meta.loads:
            return
        entry = self._entry()
        with entry.lock:
            onboard = entry.manager.onboard
            for job in meta.loads:
                self._loads[job.request_id].append(onboard(job.seq_hashes, job.gpu_block_ids))

    def save(self, meta: DynamoConnectorMetadata) -> None:
        """Submit the offloads of this step's completed blocks (without waiting for them) and note held requests."""
        if meta.saves:
            entry = self._entry()
            with entry.lock:
                offload = entry.manager.offload
                for job in meta.saves:
                    self._saves[job.request_id].append(offload(job.seq_hashes, job.gpu_block_ids))
        self._held.update(meta.held)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """``(finished_sending, finished_recving)``: held requests whose offloads are done, requests whose loads
        are done (failed blocks are kept for ``take_load_errors``)."""
        if self.entry is None:
            return None, None
        if self._loads or self._saves:
            with self.entry.lock:
                self.entry.manager.poll()
        recving: set[str] = set()
        for request_id, tickets in list(self._loads.items()):
            if all(t.done for t in tickets):
                for ticket in tickets:
                    self._load_errors.update(ticket.gpu_block_ids[i] for i in ticket.failed_blocks)
                del self._loads[request_id]
                recving.add(request_id)
        for request_id, tickets in list(self._saves.items()):
            open_tickets = [t for t in tickets if not t.done]
            done = len(tickets) - len(open_tickets)
            if done:
                self._saves_done[request_id] = self._saves_done.get(request_id, 0) + done
            if open_tickets:
                self._saves[request_id] = open_tickets
            else:
                del self._saves[request_id]
        sending = {r for r in self._held if r not in self._saves}
        self._held -= sending
        return sending or None, recving or None

    def take_load_errors(self) -> set[int]:
        """GPU block ids of failed loads since the last call."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_report(self) -> DynamoWorkerMetadata | None:
        """Save jobs completed since the last report, for the scheduler side (None when there are none)."""
        if not self._saves_done:
            return None
        report, self._saves_done = DynamoWorkerMetadata(self._saves_done), {}
        return report

    def shutdown(self) -> None:
        """Finish every transfer, unregister and close the manager (idempotent)."""
        if self.entry is None:
            return
        registry.unregister(self.engine_id)
        with self.entry.lock:
            self.entry.manager.close()
        self.entry = None
