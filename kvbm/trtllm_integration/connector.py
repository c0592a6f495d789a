"""TensorRT-LLM KV cache connector pair (PyTorch backend), compatible with Dynamo KVBM's YAML::

    kv_connector_config:
      connector_module: kvbm.trtllm_integration.connector
      connector_scheduler_class: DynamoKVBMConnectorLeader
      connector_worker_class: DynamoKVBMConnectorWorker

Tiers and sizes come from the ``DYN_KVBM_*`` variables (``kvbm.config``). The leader (scheduler side) hashes each
request's full blocks, looks them up in G2/G3 and plans loads and saves; the worker owns the block manager over
TensorRT-LLM's pool tensor ``[num_blocks, num_layers, 2, num_kv_heads, tokens_per_block, head_dim]`` and runs
them. They share the manager through ``kvbm.trtllm_integration.registry`` (single rank only).

Per step, in the executor's order:
- ``get_num_new_matched_tokens`` returns the tokens found in G2/G3 after the engine's own prefix match, loaded
  asynchronously (``(n, True)``; ``(0, False)`` when nothing matched, never ``(0, True)``); a prompt whose engine
  match ends inside a block, or a multimodal request, is not matched (its token ids do not identify its KV).
- ``update_state_after_alloc`` receives the request's cache block ids: the matched blocks are loaded into them.
- ``build_connector_meta`` returns a ``ConnectorMetadata``: the loads, and the full blocks whose KV the coming
  forward pass completes, to offload once it has run.
- Worker: ``start_load_kv`` starts the loads (the executor keeps those requests out of the forward pass until
  ``get_finished`` reports them loaded, so no layer waits on them); the saves start from the forward-pass
  callable (``register_forward_pass_callable``), or else after the last layer's ``save_kv_layer``, or at the
  latest in ``wait_for_save``; on a GPU they are ordered after the forward pass by a CUDA event on the current
  stream, with no host-side sync. ``get_finished`` polls the manager and reports finished loads and saves.
- ``request_finished`` returns True while the request still has a load or save in flight: the engine keeps its
  blocks until ``get_finished`` reports it.

TensorRT-LLM's connector interface has no way to report a failed load (unlike vLLM's recompute path): a load that
fails raises ``KvbmLoadError`` from ``get_finished`` so the engine fails the request instead of serving KV that
was never written.
"""
from __future__ import annotations

try:
    from tensorrt_llm._torch.pyexecutor.kv_cache_connector import (
        KvCacheConnectorScheduler,
        KvCacheConnectorWorker,
        SchedulerOutput,
    )
except ImportError as _exc:
    raise ImportError(
        "kvbm.trtllm_integration.connector needs TensorRT-LLM with the PyTorch backend's KV cache connector API "
        "(module tensorrt_llm._torch.pyexecutor.kv_cache_connector, TensorRT-LLM 1.1 or newer), which could not "
        f"be imported: {_exc}. Install the tensorrt-llm package (NVIDIA publishes its wheels; see TensorRT-LLM's "
        "installation guide, e.g. `pip install --extra-index-url https://pypi.nvidia.com tensorrt-llm`) on a "
        "machine with an NVIDIA GPU, or use kvbm's vLLM connector instead."
    ) from _exc

import logging
import weakref
from itertools import chain
from typing import Any, Callable, Sequence

import torch

from kvbm.config import KvbmConfig
from kvbm.hashing import salt_hash, sequence_hashes
from kvbm.layouts.presets import trtllm_pool
from kvbm.manager import BlockManager, Ticket
from kvbm.metrics import KvbmMetrics
from kvbm.trtllm_integration import registry
from kvbm.trtllm_integration.metadata import BlockMove, ConnectorMetadata, TrackedRequest, non_negative_int

__all__ = ["DynamoKVBMConnectorLeader", "DynamoKVBMConnectorWorker", "ConnectorMetadata", "KvbmLoadError"]

log = logging.getLogger(__name__)


class KvbmLoadError(RuntimeError):
    """Blocks of a request could not be loaded from G2/G3; its KV in the engine's cache is not valid."""


def _optional_text(value: object) -> str | None:
    return None if value is None else str(value)


def _uncacheable(request: Any) -> str | None:
    """Why a request's blocks cannot be identified by its token ids alone, or None."""
    for attr in ("multimodal_hashes", "multimodal_positions"):
        if getattr(request, attr, None):
            return "multimodal request (its token ids do not identify its KV)"
    return None


class DynamoKVBMConnectorLeader(KvCacheConnectorScheduler):
    """Scheduler side: prefix matching against G2/G3, per-request block bookkeeping, per-step metadata."""

    def __init__(self, llm_args: Any) -> None:
        """Read the block size from ``llm_args.kv_cache_config.tokens_per_block``; refuse multi-rank setups."""
        super().__init__(llm_args)
        registry.require_single_rank(llm_args)
        self.block_size = registry.tokens_per_block(llm_args)
        self._requests: dict[int, TrackedRequest] = {}
        self._matched: dict[int, tuple[int, list[int]]] = {}  # request -> (first block, hashes to load)
        self._loads: list[BlockMove] = []  # planned by update_state_after_alloc, sent by build_connector_meta
        self._step = 0

    def _manager(self) -> BlockManager:
        manager = registry.current().manager
        if manager.geometry.block_size != self.block_size:
            raise ValueError(f"the worker's KV cache has {manager.geometry.block_size} tokens per block, "
                             f"llm_args.kv_cache_config.tokens_per_block is {self.block_size}")
        return manager

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens after the engine's ``num_computed_tokens`` found in G2/G3, and True (loaded asynchronously)
        when there are any; ``(0, False)`` otherwise."""
        rid = request.request_id
        computed = non_negative_int("num_computed_tokens", num_computed_tokens)
        self._matched.pop(rid, None)
        self._requests.pop(rid, None)
        self._loads = [m for m in self._loads if m.request_id != rid]  # asked again: an earlier plan is void
        reason = _uncacheable(request)
        if reason is not None:
            log.debug("request %s is not cached by kvbm: %s", rid, reason)
            return 0, False
        manager = self._manager()
        salt = salt_hash(_optional_text(getattr(request, "cache_salt_id", None)),
                         _optional_text(getattr(request, "lora_task_id", None)))
        self._requests[rid] = track = TrackedRequest(rid, self.block_size, salt, valid_tokens=computed)
        if computed % self.block_size:
            return 0, False  # the engine's match ends inside a block: loading whole blocks would overlap it
        tokens = list(request.get_tokens(0))
        hashes = sequence_hashes(tokens, self.block_size, salt)
        first = computed // self.block_size
        if first >= len(hashes):
            return 0, False
        num_blocks = manager.lookup(hashes[first:], num_tokens=len(tokens) - computed).num_blocks
        if num_blocks == 0:
            return 0, False
        self._matched[rid] = (first, hashes[first:first + num_blocks])
        track.valid_tokens = computed + num_blocks * self.block_size
        return num_blocks * self.block_size, True

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        """Plan the load of the matched blocks into the request's cache blocks at the matched positions.

        ``block_ids`` are all of the request's cache blocks in token order (the engine's prefix blocks first).
        """
        rid = request.request_id
        match = self._matched.pop(rid, None)
        if match is None:
            return
        first, hashes = match
        ids = [non_negative_int("block_ids entry", b) for b in block_ids]
        if len(ids) < first + len(hashes):
            raise ValueError(f"request {rid}: {len(ids)} block ids allocated, expected at least {first + len(hashes)} "
                             f"({first} matched by the engine + {len(hashes)} to load)")
        move = BlockMove(rid, tuple(hashes), tuple(ids[first:first + len(hashes)]))
        self._loads.append(move)
        self._requests[rid].loaded = move

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ConnectorMetadata:
        """This step's loads, and the full blocks the coming forward pass completes (to offload after it)."""
        self._step += 1
        saves = []
        for data in chain(scheduler_output.new_requests, scheduler_output.cached_requests):
            track = self._requests.get(data.request_id)
            if track is None:
                continue  # not seen by get_num_new_matched_tokens (e.g. generation-only): not cached
            track.report(data.new_tokens, data.new_block_ids, data.computed_position, data.num_scheduled_tokens)
            move = track.take_new_full_blocks()
            if move is not None:
                saves.append(move)
        loads, self._loads = tuple(self._loads), []
        return ConnectorMetadata(self._step, loads, tuple(saves))

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        """Forget the request; True while the worker still moves its blocks (the engine then keeps them until
        ``get_finished`` reports the request)."""
        rid = request.request_id
        self._requests.pop(rid, None)
        self._matched.pop(rid, None)
        self._loads = [m for m in self._loads if m.request_id != rid]  # never started: nothing to wait for
        try:
            shared = registry.current()
        except RuntimeError:
            return False
        return shared.busy(rid)


def _close_manager(manager: BlockManager, metrics: KvbmMetrics) -> None:
    registry.unregister(manager)
    metrics.stop_server()
    manager.close()


class DynamoKVBMConnectorWorker(KvCacheConnectorWorker):
    """Worker side: owns the block manager over the engine's pool tensor and runs the leader's plan."""

    def __init__(self, llm_args: Any, *, config: KvbmConfig | None = None) -> None:
        """``config`` defaults to ``KvbmConfig.from_env()`` (read when the KV cache is registered)."""
        super().__init__(llm_args)
        registry.require_single_rank(llm_args)
        self.block_size = registry.tokens_per_block(llm_args)
        self._config = config
        self.manager: BlockManager | None = None
        self.num_layers = 0
        self._loads: dict[int, list[Ticket]] = {}
        self._saves: dict[int, list[Ticket]] = {}
        self._pending_loads: tuple[BlockMove, ...] = ()  # the bound step's loads not started yet
        self._pending_saves: tuple[BlockMove, ...] = ()  # the bound step's saves not started yet
        self._awaiting_load: set[int] = set()
        self._awaiting_save: set[int] = set()
        self._failed_loads: set[int] = set()  # never reported as loaded
        self._use_callable = False
        self._finalizer: weakref.finalize | None = None

    # -- set-up ----------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        """Describe the pool tensor ``[num_blocks, num_layers, 2, num_kv_heads, tokens_per_block, head_dim]``,
        build the block manager over it and publish it to the leader."""
        if self.manager is not None:
            raise RuntimeError("register_kv_caches was already called on this worker")
        cache = trtllm_pool(kv_cache_tensor)
        if cache.geometry.block_size != self.block_size:
            raise ValueError(f"KV cache tensor has {cache.geometry.block_size} tokens per block (dimension 4 of shape "
                             f"{tuple(kv_cache_tensor.shape)}), kv_cache_config.tokens_per_block is {self.block_size}")
        config = self._config if self._config is not None else KvbmConfig.from_env()
        metrics = KvbmMetrics()
        manager = BlockManager(cache, config, metrics=metrics)
        try:
            registry.register(registry.Shared(manager, self._busy))
            if config.metrics:
                metrics.start_server(config.metrics_port)
        except BaseException:
            registry.unregister(manager)
            manager.close()
            raise
        self.manager = manager
        self.num_layers = cache.geometry.num_layers
        self._finalizer = weakref.finalize(self, _close_manager, manager, metrics)

    def register_forward_pass_callable(self) -> Callable[[], None]:
        """The callable the executor runs at the end of each forward pass: it starts the step's saves."""
        self._use_callable = True
        return self._start_saves

    def close(self) -> None:
        """Finish transfers in flight, free G2/G3 and withdraw the manager from the registry (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()

    # -- per step --------------------------------------------------------------------------------------------

    def bind_connector_meta(self, metadata: object) -> None:
        """Take the leader's ``ConnectorMetadata`` for this step. Saves left over from a step whose forward pass
        never ran are dropped (their KV was never computed)."""
        if not isinstance(metadata, ConnectorMetadata):
            raise TypeError(f"metadata must be the leader's ConnectorMetadata, got {type(metadata).__name__}")
        super().bind_connector_meta(metadata)
        self._pending_loads = metadata.loads
        self._pending_saves = metadata.saves

    def start_load_kv(self, stream: Any) -> None:
        """Start this step's loads (asynchronous; their requests are not in this forward pass)."""
        manager = self._require_manager()
        loads, self._pending_loads = self._pending_loads, ()
        for move in loads:
            ticket = manager.onboard(move.seq_hashes, move.block_ids)
            self._loads.setdefault(move.request_id, []).append(ticket)

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        """Nothing to wait for: loaded requests join a forward pass only after ``get_finished`` reported them."""
        self._check_layer(layer_idx)

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        """Blocks are saved whole (all layers), so without the forward-pass callable the saves start once the
        last layer's work is enqueued."""
        self._check_layer(layer_idx)
        if not self._use_callable and layer_idx == self.num_layers - 1:
            self._start_saves()

    def wait_for_save(self, stream: Any) -> None:
        """Start the step's saves if nothing started them yet; saves are asynchronous, so nothing blocks here."""
        self._start_saves()

    def get_finished(self, finished_gen_req_ids: list[int],
                     started_loading_req_ids: list[int]) -> tuple[list[int], list[int]]:
        """Poll the manager; return (requests done saving, requests done loading) among those the executor
        handed over so far. Raises KvbmLoadError when a load failed: that request is never reported as loaded
        (the engine fails it), the others done by then are reported by the next call."""
        manager = self._require_manager()
        manager.poll()
        self._awaiting_save.update(finished_gen_req_ids)
        self._awaiting_load.update(started_loading_req_ids)
        for rid in list(self._saves):  # forget finished saves, so running requests hold no old tickets
            live = [t for t in self._saves[rid] if not t.done]
            if live:
                self._saves[rid] = live
            else:
                del self._saves[rid]
        done_loading = []
        failed: dict[int, list[str]] = {}
        for rid in sorted(self._awaiting_load):
            tickets = self._loads.get(rid, [])
            if rid in self._failed_loads:
                self._awaiting_load.discard(rid)
            elif all(t.done for t in tickets):
                self._loads.pop(rid, None)
                self._awaiting_load.discard(rid)
                problems = self._load_failures(rid, tickets)
                if problems:
                    failed[rid] = problems
                else:
                    done_loading.append(rid)
        done_saving = [rid for rid in sorted(self._awaiting_save) if not self._busy(rid)]
        for rid in done_saving:
            self._awaiting_save.discard(rid)
            self._failed_loads.discard(rid)
            self._loads.pop(rid, None)
            self._saves.pop(rid, None)
        if failed:
            self._failed_loads.update(failed)
            # The other requests are reported by the next call; the failed ones are never reported as loaded.
            self._awaiting_load.update(done_loading)
            self._awaiting_save.update(done_saving)
            raise KvbmLoadError("kvbm could not load stored KV blocks, so these requests' KV is not valid: "
                                + "; ".join(p for problems in failed.values() for p in problems))
        return done_saving, done_loading

    # -- helpers ---------------------------------------------------------------------------------------------

    def _start_saves(self) -> None:
        """Offload the bound step's new full blocks (once per step)."""
        if not self._pending_saves:
            return
        manager = self._require_manager()
        saves, self._pending_saves = self._pending_saves, ()
        for move in saves:
            ticket = manager.offload(move.seq_hashes, move.block_ids)
            self._saves.setdefault(move.request_id, []).append(ticket)

    def _busy(self, request_id: int) -> bool:
        """A load or save of the request is in flight, or planned in the bound step but not started."""
        tickets: Sequence[Ticket] = self._loads.get(request_id, []) + self._saves.get(request_id, [])
        return (any(not t.done for t in tickets)
                or any(m.request_id == request_id for m in self._pending_loads + self._pending_saves))

    @staticmethod
    def _load_failures(request_id: int, tickets: Sequence[Ticket]) -> list[str]:
        out = []
        for t in tickets:
            for i in t.failed_blocks:
                out.append(f"request {request_id} cache block {t.gpu_block_ids[i]}: {t.reasons.get(i, 'failed')}")
        return out

    def _require_manager(self) -> BlockManager:
        if self.manager is None:
            raise RuntimeError("register_kv_caches has not been called on this worker")
        return self.manager

    def _check_layer(self, layer_idx: int) -> None:
        if not 0 <= non_negative_int("layer_idx", layer_idx) < self.num_layers:
            raise IndexError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
