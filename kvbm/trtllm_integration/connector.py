"""TensorRT-LLM KV cache connector pair (PyTorch backend), compatible with Dynamo KVBM's YAML::

    kv_connector_config:
      connector_module: kvbm.trtllm_integration.connector
      connector_scheduler_class: DynamoKVBMConnectorLeader
      connector_worker_class: DynamoKVBMConnectorWorker

Tiers and sizes come from the ``DYN_KVBM_*`` variables (``kvbm.config``). The leader (scheduler side) holds the
block index (`ConnectorLeader`): it hashes each request's full blocks, looks them up in G2/G3 and plans loads,
stores and cascades, sent as the step's `StepPlan` in a ``ConnectorMetadata``. The worker runs them
(`ConnectorWorker`) over TensorRT-LLM's pool tensor ``[num_blocks, num_layers, 2, num_kv_heads,
tokens_per_block, head_dim]`` and posts the moves' results to the leader through `reports` (single rank only).

Per step, in the executor's order:
- ``get_num_new_matched_tokens`` returns the tokens found in G2/G3 after the engine's own prefix match, loaded
  asynchronously (``(n, True)``; ``(0, False)`` when nothing matched, never ``(0, True)``); a prompt whose engine
  match ends inside a block, or a multimodal request, is not matched (its token ids do not identify its KV).
- ``update_state_after_alloc`` receives the request's cache block ids: the matched blocks are loaded into them.
- ``build_connector_meta`` takes the worker's reports, plans the loads and the stores of the full blocks whose KV
  the coming forward pass completes, and returns the step's plan.
- Worker: ``start_load_kv`` starts the loads and cascades (the executor keeps loading requests out of the forward
  pass until ``get_finished`` reports them, so no layer waits on them); the stores start from the forward-pass
  callable (``register_forward_pass_callable``), or else after the last layer's ``save_kv_layer``, or at the
  latest in ``wait_for_save``; on a GPU they are ordered after the forward pass by a CUDA event on the current
  stream, with no host-side sync. Moves of a step whose forward pass never ran are reported failed, so nothing is
  stored under their hashes. ``get_finished`` reports finished loads and saves and posts the moves' results.
- ``request_finished`` returns True while the request has loads or stores the leader has not seen reported: the
  engine keeps its blocks until ``get_finished`` reports it.

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
from typing import Any, Callable

import torch

from kvbm.config import KvbmConfig
from kvbm.connectors import process_metrics
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import RequestLoad, RequestStore
from kvbm.connectors.worker import ConnectorWorker
from kvbm.hashing import salt_hash
from kvbm.layouts.presets import trtllm_pool
from kvbm.leader.plans import Move
from kvbm.tiers import kvbm_tiers
from kvbm.trtllm_integration import reports
from kvbm.trtllm_integration.metadata import ConnectorMetadata, RequestProgress, non_negative_int

__all__ = ["DynamoKVBMConnectorLeader", "DynamoKVBMConnectorWorker", "ConnectorMetadata", "KvbmLoadError"]

log = logging.getLogger(__name__)


class KvbmLoadError(RuntimeError):
    """Blocks of a request could not be loaded from G2/G3; its KV in the engine's cache is not valid."""


def _attr(obj: Any, path: str) -> Any:
    """``obj.a.b`` for path "a.b", with a TypeError naming what is missing."""
    for name in path.split("."):
        if not hasattr(obj, name):
            raise TypeError(f"llm_args must provide {path} (TensorRT-LLM's TorchLlmArgs does); "
                            f"{type(obj).__name__} has no attribute {name!r}")
        obj = getattr(obj, name)
    return obj


def _tokens_per_block(llm_args: Any) -> int:
    """Refuse more than one rank (the leader and its worker share one process); the engine's block size."""
    world_size = _attr(_attr(llm_args, "parallel_config").to_mapping(), "world_size")
    if world_size != 1:
        raise ValueError(f"kvbm's TensorRT-LLM connector supports a single rank (world_size 1, no tensor/pipeline "
                         f"parallelism), got world_size {world_size}; run without parallelism or without kvbm")
    value = _attr(llm_args, "kv_cache_config.tokens_per_block")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"kv_cache_config.tokens_per_block must be a positive int, got {value!r}")
    return value


def _uncacheable(request: Any) -> str | None:
    """Why a request's blocks cannot be identified by its token ids alone, or None."""
    for attr in ("multimodal_hashes", "multimodal_positions"):
        if getattr(request, attr, None):
            return "multimodal request (its token ids do not identify its KV)"
    return None


class DynamoKVBMConnectorLeader(KvCacheConnectorScheduler):
    """Scheduler side: prefix lookups and move plans on the block index, one `StepPlan` per step."""

    def __init__(self, llm_args: Any, *, config: KvbmConfig | None = None) -> None:
        """``config`` defaults to ``KvbmConfig.from_env()``, read when the index is built (on first use, for the
        registered worker's block bytes)."""
        super().__init__(llm_args)
        self.block_size = _tokens_per_block(llm_args)
        self._config = config
        self._leader: ConnectorLeader | None = None
        self._progress: dict[str, RequestProgress] = {}
        self._matched: dict[str, tuple[int, list[int]]] = {}  # request -> (first block, hashes to load)
        self._loads: dict[str, tuple[list[int], list[int]]] = {}  # (hashes, engine ids), planned in the next step
        self._loading: dict[int, str] = {}  # load move id not reported yet -> request
        self._step = 0

    @property
    def leader(self) -> ConnectorLeader:
        """The block index and request tracking; built on first use, its tiers sized for the worker's blocks."""
        if self._leader is None:
            block_size, block_bytes = reports.geometry()
            if block_size != self.block_size:
                raise ValueError(f"the worker's KV cache has {block_size} tokens per block, "
                                 f"llm_args.kv_cache_config.tokens_per_block is {self.block_size}")
            config = self._config if self._config is not None else KvbmConfig.from_env()
            metrics = process_metrics.acquire(config)
            try:
                self._leader = ConnectorLeader(kvbm_tiers(config, block_bytes), config, block_size, metrics=metrics)
            except BaseException:
                process_metrics.release()
                raise
            weakref.finalize(self, process_metrics.release)
        return self._leader

    def _take_reports(self, leader: ConnectorLeader) -> None:
        """Apply the worker's move results to the index."""
        for report in reports.drain():
            leader.apply(report)
            for move_id in report.results:
                self._loading.pop(move_id, None)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens after the engine's ``num_computed_tokens`` found in G2/G3, and True (loaded asynchronously)
        when there are any; ``(0, False)`` otherwise."""
        leader = self.leader
        rid = str(request.request_id)
        computed = non_negative_int("num_computed_tokens", num_computed_tokens)
        self._matched.pop(rid, None)
        self._loads.pop(rid, None)  # asked again: an earlier plan is void
        self._progress.pop(rid, None)
        reason = _uncacheable(request)
        if reason is not None:
            log.debug("request %s is not cached by kvbm: %s", rid, reason)
            return 0, False
        salt = salt_hash(None if getattr(request, "cache_salt_id", None) is None else str(request.cache_salt_id),
                         None if getattr(request, "lora_task_id", None) is None else str(request.lora_task_id))
        state = leader.requests.get(rid) or leader.track(rid, salt)  # kept when asked again: its stores in flight
        state.block_ids, state.saved = [], 0
        self._progress[rid] = progress = RequestProgress(state, self.block_size, valid_tokens=computed)
        tokens = list(request.get_tokens(0))
        first, full = computed // self.block_size, len(tokens) // self.block_size
        if computed % self.block_size or first >= full:
            return 0, False  # an engine match ending inside a block would overlap whole loaded blocks
        hashes = state.hashes_upto(full, self.block_size, tokens)[first:full]
        found, _ = leader.lookup(hashes, whole_prompt=len(tokens) == full * self.block_size)
        if found == 0:
            return 0, False
        self._matched[rid] = (first, hashes[:found])
        progress.valid_tokens = computed + found * self.block_size
        return found * self.block_size, True

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        """Plan the load of the matched blocks into the request's cache blocks at the matched positions.

        ``block_ids`` are all of the request's cache blocks in token order (the engine's prefix blocks first).
        """
        rid = str(request.request_id)
        match = self._matched.pop(rid, None)
        if match is None:
            return
        first, hashes = match
        ids = [non_negative_int("block_ids entry", b) for b in block_ids]
        if len(ids) < first + len(hashes):
            raise ValueError(f"request {rid}: {len(ids)} block ids allocated, expected at least {first + len(hashes)} "
                             f"({first} matched by the engine + {len(hashes)} to load)")
        self._loads[rid] = (hashes, ids[first:first + len(hashes)])
        self._progress[rid].loaded = tuple(ids[first:first + len(hashes)])

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ConnectorMetadata:
        """This step's plan: the loads, the stores of the full blocks the coming forward pass completes, and the
        cascades now due (after taking the worker's reports)."""
        leader = self.leader
        self._take_reports(leader)
        self._step += 1
        for rid, (hashes, ids) in self._loads.items():
            self._loading.update((m.move_id, rid) for m in leader.plan_load(rid, hashes, ids).moves)
        self._loads.clear()
        for data in chain(scheduler_output.new_requests, scheduler_output.cached_requests):
            progress = self._progress.get(str(data.request_id))
            if progress is None:
                continue  # not seen by get_num_new_matched_tokens (e.g. generation-only): not cached
            progress.report(data.new_tokens, data.new_block_ids, data.computed_position, data.num_scheduled_tokens)
            leader.plan_stores(progress.state, progress.tokens, progress.full_blocks)
        return ConnectorMetadata(self._step, leader.take_step())

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        """Forget the request; True while the worker may still move its blocks (the engine then keeps them until
        ``get_finished`` reports the request)."""
        rid = str(request.request_id)
        self._matched.pop(rid, None)
        self._loads.pop(rid, None)  # never planned: nothing to wait for
        self._progress.pop(rid, None)
        if self._leader is None:
            return False
        self._take_reports(self._leader)
        busy = self._leader.busy(rid) or rid in self._loading.values()
        self._leader.forget(rid)
        return busy


def _close(worker: ConnectorWorker) -> None:
    try:
        worker.close()
    finally:
        process_metrics.release()
        reports.detach()


class DynamoKVBMConnectorWorker(KvCacheConnectorWorker):
    """Worker side: this rank's tiers over the engine's pool tensor, running the leader's plans."""

    def __init__(self, llm_args: Any, *, config: KvbmConfig | None = None) -> None:
        """``config`` defaults to ``KvbmConfig.from_env()`` (read when the KV cache is registered)."""
        super().__init__(llm_args)
        self.block_size = _tokens_per_block(llm_args)
        self._config = config
        self.worker: ConnectorWorker | None = None
        self.num_layers = 0
        self._loads: list[RequestLoad] = []  # the bound step's moves not started yet
        self._stores: list[RequestStore] = []
        self._cascades: list[Move] = []
        self._awaiting: set[str] = set()  # handed over by started_loading_req_ids, not reported yet
        self._loaded: set[str] = set()  # loads done (or failed), not reported yet
        self._failed: dict[str, list[str]] = {}  # request -> why its load failed
        self._sent: set[str] = set()  # finished requests whose stores are done, not reported yet
        self._use_callable = False
        self._finalizer: weakref.finalize | None = None

    # -- set-up ----------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        """Describe the pool tensor ``[num_blocks, num_layers, 2, num_kv_heads, tokens_per_block, head_dim]``,
        allocate the tiers for its blocks and announce its geometry to the leader."""
        if self.worker is not None:
            raise RuntimeError("register_kv_caches was already called on this worker")
        cache = trtllm_pool(kv_cache_tensor)
        g = cache.geometry
        if g.block_size != self.block_size:
            raise ValueError(f"KV cache tensor has {g.block_size} tokens per block (dimension 4 of shape "
                             f"{tuple(kv_cache_tensor.shape)}), kv_cache_config.tokens_per_block is {self.block_size}")
        config = self._config if self._config is not None else KvbmConfig.from_env()
        reports.attach(g.block_size, g.block_bytes)
        metrics = process_metrics.acquire(config)
        try:
            self.worker = ConnectorWorker(cache, kvbm_tiers(config, g.block_bytes), config, metrics=metrics)
        except BaseException:
            process_metrics.release()
            reports.detach()
            raise
        self.num_layers = g.num_layers
        self._finalizer = weakref.finalize(self, _close, self.worker)

    def register_forward_pass_callable(self) -> Callable[[], None]:
        """The callable the executor runs at the end of each forward pass: it starts the step's stores."""
        self._use_callable = True
        return self._start_stores

    def close(self) -> None:
        """Finish transfers in flight, free G2/G3 and withdraw from the leader (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()

    # -- per step --------------------------------------------------------------------------------------------

    def bind_connector_meta(self, metadata: object) -> None:
        """Take the leader's ``ConnectorMetadata`` for this step. Moves left over from a step whose forward pass
        never ran are reported failed (their KV was never computed): the leader discards their slots."""
        if not isinstance(metadata, ConnectorMetadata):
            raise TypeError(f"metadata must be the leader's ConnectorMetadata, got {type(metadata).__name__}")
        super().bind_connector_meta(metadata)
        unrun = [m for job in chain(self._loads, self._stores) for m in job.moves] + self._cascades
        if unrun and self.worker is not None:
            self.worker.drop(unrun, "the forward pass of its step never ran")
        for load in self._loads:
            self._failed.setdefault(load.request_id, []).append("its load never started")
            self._loaded.add(load.request_id)
        plan = metadata.plan
        self._loads, self._stores, self._cascades = list(plan.loads), list(plan.stores), list(plan.cascades)

    def start_load_kv(self, stream: Any) -> None:
        """Start this step's loads (asynchronous; their requests are not in this forward pass) and cascades."""
        worker = self._require_worker()
        worker.start_loads(self._loads)
        worker.start_cascades(self._cascades)
        self._loads, self._cascades = [], []

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        """Nothing to wait for: loaded requests join a forward pass only after ``get_finished`` reported them."""
        self._check_layer(layer_idx)

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        """Blocks are stored whole (all layers), so without the forward-pass callable the stores start once the
        last layer's work is enqueued."""
        self._check_layer(layer_idx)
        if not self._use_callable and layer_idx == self.num_layers - 1:
            self._start_stores()

    def wait_for_save(self, stream: Any) -> None:
        """Start the step's stores if nothing started them yet; they are asynchronous, so nothing blocks here."""
        self._start_stores()

    def get_finished(self, finished_gen_req_ids: list[int],
                     started_loading_req_ids: list[int]) -> tuple[list[int], list[int]]:
        """Return (requests done saving, requests done loading) among those the executor handed over so far, and
        post the moves' results to the leader. Raises KvbmLoadError when a load failed: that request is never
        reported as loaded (the engine fails it), the others done by then are reported by the next call."""
        worker = self._require_worker()
        worker.hold(str(r) for r in finished_gen_req_ids)
        self._awaiting.update(str(r) for r in started_loading_req_ids)
        sending, recving = worker.poll()
        self._sent |= sending
        self._loaded |= recving
        for rid, why in worker.take_failed_loads().items():
            self._failed.setdefault(rid, []).extend(why)
        report = worker.take_report()
        if report is not None:
            reports.post(report)
        done = self._awaiting & self._loaded
        failed = {rid: self._failed.pop(rid) for rid in sorted(done & self._failed.keys())}
        if failed:
            self._awaiting -= failed.keys()
            self._loaded -= failed.keys()
            raise KvbmLoadError("kvbm could not load stored KV blocks, so these requests' KV is not valid: "
                                + "; ".join(f"request {rid}: {w}" for rid, why in failed.items() for w in why))
        self._awaiting -= done
        self._loaded -= done
        sent, self._sent = self._sent, set()
        return sorted(int(r) for r in sent), sorted(int(r) for r in done)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _start_stores(self) -> None:
        """Start the bound step's stores (once per step)."""
        if self._stores:
            stores, self._stores = self._stores, []
            self._require_worker().start_stores(stores)

    def _require_worker(self) -> ConnectorWorker:
        if self.worker is None:
            raise RuntimeError("register_kv_caches has not been called on this worker")
        return self.worker

    def _check_layer(self, layer_idx: int) -> None:
        if not 0 <= non_negative_int("layer_idx", layer_idx) < self.num_layers:
            raise IndexError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
