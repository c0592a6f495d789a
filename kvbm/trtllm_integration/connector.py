"""TensorRT-LLM KV cache connector pair (PyTorch backend), compatible with Dynamo KVBM's YAML::

    kv_connector_config:
      connector_module: kvbm.trtllm_integration.connector
      connector_scheduler_class: DynamoKVBMConnectorLeader
      connector_worker_class: DynamoKVBMConnectorWorker

Sizes come from ``DYN_KVBM_*``. The leader holds the block index (`ConnectorLeader`): it matches whole stored
blocks after the engine's own match (not one ending inside a block, nor a multimodal request) and plans each
step's loads, stores (blocks the coming forward pass completes) and cascades, sent as a `StepPlan`. The worker runs
them (`ConnectorWorker`) over the pool tensor ``[num_blocks, num_layers, 2, num_kv_heads, tokens_per_block,
head_dim]`` and posts the results back through `reports` (single rank only). Loaded requests wait out of the
forward pass until ``get_finished`` reports them. Stores start from the forward-pass callable, else after the last
layer's ``save_kv_layer``, else in ``wait_for_save`` (on a GPU ordered after the forward pass by a CUDA event);
those of a step whose forward pass never ran are reported failed: nothing is stored under their hashes.
``request_finished`` is True (the engine keeps the blocks) while the request has moves not reported to the leader.
A failed load raises ``KvbmLoadError`` from ``get_finished``: TensorRT-LLM cannot recompute, it fails the request.
The leader is built once the worker has registered its KV cache; until then it matches and stores nothing (the
requests admitted meanwhile are computed and not stored), and a worker still missing
``DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS`` after the leader's construction is an error naming rank 0
(`kvbm.connectors.registration`).
"""
from __future__ import annotations

try:
    from tensorrt_llm._torch.pyexecutor.kv_cache_connector import (KvCacheConnectorScheduler, KvCacheConnectorWorker,
                                                                    SchedulerOutput)
except ImportError as _exc:
    raise ImportError(f"kvbm.trtllm_integration.connector needs TensorRT-LLM 1.1 or newer (PyTorch backend), whose "
                      f"module tensorrt_llm._torch.pyexecutor.kv_cache_connector could not be imported: {_exc}. On an "
                      "NVIDIA GPU machine: `pip install --extra-index-url https://pypi.nvidia.com tensorrt-llm` (see "
                      "TensorRT-LLM's installation guide), or use kvbm's vLLM connector.") from _exc

import weakref
from itertools import chain
from typing import Any, Callable

import torch

from kvbm.config import KvbmConfig
from kvbm.connectors import process_metrics
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import StepPlan
from kvbm.connectors.registration import WorkerRegistry
from kvbm.connectors.worker import ConnectorWorker
from kvbm.hashing import salt_hash
from kvbm.layouts.presets import trtllm_pool
from kvbm.tiers import kvbm_tiers
from kvbm.trtllm_integration import reports
from kvbm.trtllm_integration.metadata import ConnectorMetadata, RequestProgress, non_negative_int

__all__ = ["DynamoKVBMConnectorLeader", "DynamoKVBMConnectorWorker", "ConnectorMetadata", "KvbmLoadError"]


class KvbmLoadError(RuntimeError):
    """Blocks of a request could not be loaded from G2/G3; its KV in the engine's cache is not valid."""


def _tokens_per_block(llm_args: Any) -> int:
    """The engine's block size from ``llm_args``; more than one rank is refused (leader and worker share a process)."""
    try:
        world_size = llm_args.parallel_config.to_mapping().world_size
        value = llm_args.kv_cache_config.tokens_per_block
    except AttributeError as e:
        raise TypeError(f"llm_args must provide parallel_config.to_mapping().world_size and "
                        f"kv_cache_config.tokens_per_block (TensorRT-LLM's TorchLlmArgs does): {e}") from None
    if world_size != 1:
        raise ValueError(f"kvbm's TensorRT-LLM connector supports a single rank (world_size 1, no tensor/pipeline "
                         f"parallelism), got world_size {world_size}; run without parallelism or without kvbm")
    return value  # checked against the worker's pool tensor


class DynamoKVBMConnectorLeader(KvCacheConnectorScheduler):
    """Scheduler side: prefix lookups and move plans on the block index, one `StepPlan` per step."""

    def __init__(self, llm_args: Any, *, config: KvbmConfig | None = None) -> None:
        """``config`` defaults to ``KvbmConfig.from_env()``; the wait for the worker starts now."""
        super().__init__(llm_args)
        self.block_size = _tokens_per_block(llm_args)
        self._config = config if config is not None else KvbmConfig.from_env()
        self.workers = WorkerRegistry(1, self._config.leader_worker_init_timeout_secs)
        self._leader: ConnectorLeader | None = None
        self._progress: dict[str, RequestProgress] = {}
        self._loads: dict[str, tuple[int, list[int], list[int] | None]] = {}  # (first block, hashes, engine ids)
        self._loading: dict[int, str] = {}  # load move id not reported yet -> request
        self._step = 0

    @property
    def leader(self) -> ConnectorLeader:
        """The block index and request tracking, with tiers sized for the worker's blocks (RuntimeError while no
        worker has registered)."""
        leader = self._ready_leader()
        if leader is None:
            raise RuntimeError("no kvbm worker in this process yet: DynamoKVBMConnectorWorker.register_kv_caches "
                               "must run (TensorRT-LLM calls it when it allocates the KV cache)")
        return leader

    def _ready_leader(self) -> ConnectorLeader | None:
        """The leader, built once the worker registered; None while waiting for it (`WorkerRegistry`: an error
        naming rank 0 once the timeout has passed)."""
        if self._leader is not None:
            return self._leader
        geometry = reports.geometry()
        if geometry is None:
            self.workers.ready()
            return None
        block_size, block_bytes = geometry
        if block_size != self.block_size:
            raise ValueError(f"the worker's KV cache has {block_size} tokens per block, "
                             f"llm_args.kv_cache_config.tokens_per_block is {self.block_size}")
        self.workers.register([0])
        metrics = process_metrics.acquire(self._config)
        weakref.finalize(self, process_metrics.release)
        self._leader = ConnectorLeader(kvbm_tiers(self._config, block_bytes), self._config, block_size,
                                       metrics=metrics)
        return self._leader

    def _take_reports(self) -> ConnectorLeader | None:
        leader = self._ready_leader()
        if leader is None:
            return None
        for report in reports.drain():
            leader.apply(report)
            for move_id in report.results:
                self._loading.pop(move_id, None)
        return leader

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """``(n, True)`` when n tokens after the engine's match are stored (to load asynchronously), else (0, False)
        (always while no worker has registered)."""
        leader, rid = self._ready_leader(), str(request.request_id)
        if leader is None:
            return 0, False
        computed = non_negative_int("num_computed_tokens", num_computed_tokens)
        self._loads.pop(rid, None)  # asked again: an earlier plan is void
        self._progress.pop(rid, None)
        if getattr(request, "multimodal_hashes", None) or getattr(request, "multimodal_positions", None):
            return 0, False  # its token ids do not identify its KV: neither matched nor stored
        salt = salt_hash(*(None if v is None else str(v) for v in (getattr(request, "cache_salt_id", None),
                                                                  getattr(request, "lora_task_id", None))))
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
        self._loads[rid] = (first, hashes[:found], None)
        progress.valid_tokens = computed + found * self.block_size
        return found * self.block_size, True

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        """The request's cache blocks in token order: the matched blocks are loaded into those at their positions."""
        rid = str(request.request_id)
        if rid not in self._loads:
            return
        first, hashes, _ = self._loads[rid]
        ids = [non_negative_int("block_ids entry", b) for b in block_ids][first:first + len(hashes)]
        if len(ids) < len(hashes):
            raise ValueError(f"request {rid}: {len(block_ids)} block ids allocated, expected at least "
                             f"{first + len(hashes)} ({first} matched by the engine + {len(hashes)} to load)")
        self._loads[rid] = (first, hashes, ids)
        self._progress[rid].loaded = tuple(ids)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ConnectorMetadata:
        """Take the worker's reports; plan the loads, the stores of the blocks the forward pass completes, cascades
        (an empty plan while no worker has registered)."""
        leader = self._take_reports()
        self._step += 1
        if leader is None:
            return ConnectorMetadata(self._step, StepPlan())
        for rid, (_, hashes, ids) in list(self._loads.items()):
            if ids is not None:
                del self._loads[rid]
                self._loading.update((m.move_id, rid) for m in leader.plan_load(rid, hashes, ids).moves)
        for data in chain(scheduler_output.new_requests, scheduler_output.cached_requests):
            progress = self._progress.get(str(data.request_id))
            if progress is not None:  # else not seen by get_num_new_matched_tokens: not cached
                progress.report(data.new_tokens, data.new_block_ids, data.computed_position,
                                data.num_scheduled_tokens)
                leader.plan_stores(progress.state, progress.tokens, progress.valid_tokens // self.block_size)
        return ConnectorMetadata(self._step, leader.take_step())

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        """Forget the request; True (the engine keeps its blocks) while it has moves not reported to the leader."""
        rid = str(request.request_id)
        self._loads.pop(rid, None)  # not planned yet: nothing to wait for
        self._progress.pop(rid, None)
        leader = self._take_reports()
        if leader is None:
            return False
        busy = leader.busy(rid) or rid in self._loading.values()
        leader.forget(rid)
        return busy


def _close(worker: ConnectorWorker) -> None:
    reports.attach(None)
    process_metrics.release()
    worker.close()


class DynamoKVBMConnectorWorker(KvCacheConnectorWorker):
    """Worker side: this rank's tiers over the engine's pool tensor, running the leader's plans."""

    def __init__(self, llm_args: Any, *, config: KvbmConfig | None = None) -> None:
        """``config`` defaults to ``KvbmConfig.from_env()`` (read when the KV cache is registered)."""
        super().__init__(llm_args)
        self.block_size = _tokens_per_block(llm_args)
        self._config = config
        self.worker: ConnectorWorker | None = None
        self.num_layers = 0
        self._unrun = StepPlan()  # the bound step's moves not started yet
        self._awaiting: set[str] = set()  # handed over by started_loading_req_ids, not reported yet
        self._loaded: set[str] = set()  # loads done (or failed), not reported yet
        self._failed: dict[str, list[str]] = {}  # request -> why its load failed
        self._sent: set[str] = set()  # finished requests whose stores are done, not reported yet
        self._use_callable = False
        self._finalizer: Callable[[], Any] = lambda: None

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        """Describe the pool tensor, allocate the tiers for its blocks and announce its geometry to the leader."""
        if self.worker is not None:
            raise RuntimeError("register_kv_caches was already called on this worker")
        cache = trtllm_pool(kv_cache_tensor)
        g = cache.geometry
        if g.block_size != self.block_size:
            raise ValueError(f"KV cache tensor has {g.block_size} tokens per block (dimension 4 of shape "
                             f"{tuple(kv_cache_tensor.shape)}), kv_cache_config.tokens_per_block is {self.block_size}")
        config = self._config if self._config is not None else KvbmConfig.from_env()
        reports.attach((g.block_size, g.block_bytes))
        metrics = process_metrics.acquire(config)
        try:
            self.worker = ConnectorWorker(cache, kvbm_tiers(config, g.block_bytes), config, metrics=metrics)
        except BaseException:
            process_metrics.release()
            reports.attach(None)
            raise
        self.num_layers = g.num_layers
        self._finalizer = weakref.finalize(self, _close, self.worker)

    def register_forward_pass_callable(self) -> Callable[[], None]:
        """The callable the executor runs at the end of each forward pass: it starts the step's stores."""
        self._use_callable = True
        return self._start_stores

    def close(self) -> None:
        """Finish transfers in flight, free G2/G3 and withdraw from the leader (idempotent)."""
        self._finalizer()

    def bind_connector_meta(self, metadata: object) -> None:
        """Take this step's plan; report moves of a step whose forward pass never ran failed (their KV is not there)."""
        if not isinstance(metadata, ConnectorMetadata):
            raise TypeError(f"metadata must be the leader's ConnectorMetadata, got {type(metadata).__name__}")
        super().bind_connector_meta(metadata)
        old = self._unrun
        unrun = [m for job in chain(old.loads, old.stores) for m in job.moves] + old.cascades
        if unrun and self.worker is not None:
            self.worker.drop(unrun, "the forward pass of its step never ran")
        for load in old.loads:
            self._failed.setdefault(load.request_id, []).append("its load never started")
            self._loaded.add(load.request_id)
        plan = metadata.plan
        self._unrun = StepPlan(list(plan.loads), list(plan.stores), list(plan.cascades))

    def start_load_kv(self, stream: Any) -> None:
        """Start this step's loads (asynchronous: their requests are not in this forward pass) and cascades."""
        worker, plan = self._require_worker(), self._unrun
        worker.start_loads(plan.loads)
        worker.start_cascades(plan.cascades)
        plan.loads, plan.cascades = [], []

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        """Nothing to wait for: loaded requests join a forward pass only after ``get_finished`` reported them."""

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        """Without the forward-pass callable, start the stores (whole blocks) once the last layer is enqueued."""
        if not 0 <= non_negative_int("layer_idx", layer_idx) < self.num_layers:
            raise IndexError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        if layer_idx == self.num_layers - 1 and not self._use_callable:
            self._start_stores()

    def wait_for_save(self, stream: Any) -> None:
        """Start the step's stores if nothing started them yet (asynchronous: nothing blocks here)."""
        self._start_stores()

    def get_finished(self, finished_gen_req_ids: list[int],
                     started_loading_req_ids: list[int]) -> tuple[list[int], list[int]]:
        """(done saving, done loading) among the requests handed over so far; posts the moves' results to the leader.
        KvbmLoadError for a failed load: never reported as loaded, the others done by then go in the next call."""
        worker = self._require_worker()
        worker.hold(str(r) for r in finished_gen_req_ids)
        self._awaiting.update(str(r) for r in started_loading_req_ids)
        sending, recving = worker.poll()
        self._sent |= sending
        self._loaded |= recving
        for rid, why in worker.take_failed_loads().items():
            self._failed.setdefault(rid, []).extend(why)
        if (report := worker.take_report()) is not None:
            reports.post(report)
        done = self._awaiting & self._loaded
        failed = {rid: self._failed.pop(rid) for rid in sorted(done & self._failed.keys())}
        self._awaiting, self._loaded = self._awaiting - failed.keys(), self._loaded - failed.keys()
        if failed:
            raise KvbmLoadError("kvbm could not load stored KV blocks, so these requests' KV is not valid: "
                                + "; ".join(f"request {rid}: {w}" for rid, why in failed.items() for w in why))
        self._awaiting, self._loaded, sent, self._sent = self._awaiting - done, self._loaded - done, self._sent, set()
        return sorted(int(r) for r in sent), sorted(int(r) for r in done)

    def _start_stores(self) -> None:
        if self._unrun.stores:
            stores, self._unrun.stores = self._unrun.stores, []
            self._require_worker().start_stores(stores)

    def _require_worker(self) -> ConnectorWorker:
        if self.worker is None:
            raise RuntimeError("register_kv_caches has not been called on this worker")
        return self.worker
