"""TensorRT-LLM KV cache connector pair (PyTorch backend), compatible with Dynamo KVBM's YAML::

    kv_connector_config:
      connector_module: kvbm.trtllm_integration.connector
      connector_scheduler_class: DynamoKVBMConnectorLeader
      connector_worker_class: DynamoKVBMConnectorWorker

Sizes come from ``DYN_KVBM_*``. The leader holds the block index (`ConnectorLeader`): it matches whole stored
blocks after the engine's own match (not one ending inside a block, nor a multimodal request) and plans each
step's loads, stores (blocks the coming forward pass completes) and cascades, sent as a `StepPlan`. The worker runs
them (`ConnectorWorker`) over the pool tensor ``[num_blocks, num_layers, 2, num_kv_heads, tokens_per_block,
head_dim]`` and posts the results back to the leader. Loaded requests wait out of the forward pass until
``get_finished`` reports them. Stores start from the forward-pass callable, else after the last
layer's ``save_kv_layer``, else in ``wait_for_save`` (on a GPU ordered after the forward pass by a CUDA event);
those of a step whose forward pass never ran are reported failed: nothing is stored under their hashes.
``request_finished`` is True (the engine keeps the blocks) while the request has moves not reported to the leader.
A failed load raises ``KvbmLoadError`` from ``get_finished``: TensorRT-LLM cannot recompute, it fails the request.
The leader is built once the worker has registered its KV cache; until then it matches and stores nothing (the
requests admitted meanwhile are computed and not stored), and a worker still missing
``DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS`` after the leader's construction is an error naming rank 0
(`kvbm.connectors.registration`).

Tensor / pipeline parallelism: TensorRT-LLM runs the leader on rank 0 only, a worker on every rank, and broadcasts
the leader's metadata to all of them. Rank 0's worker posts to the leader in-process (`reports`); the others send
their block geometry and reports over a local socket whose address the metadata carries (`rank_channel`: every
rank on rank 0's host). Once every rank registered, the leader sizes the tiers for a block's bytes summed over the
ranks (each rank holds the same number of blocks of its own size) and sends them in the metadata; each worker
allocates them before running its first plan. A move completes once every rank reported it (a block failed on any
rank fails for all), and the outcome of each load goes to every rank in the next step's metadata
(`load_outcomes`), so that all ranks report it loaded, or raise ``KvbmLoadError``, in the same ``get_finished``.
The registration wait (``DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS``) starts when the first metadata hands out the
channel; the missing ranks are named once it has passed. Stores start after the rank's last ``save_kv_layer`` of
the step when the forward-pass callable is not used (TensorRT-LLM numbers a pipeline stage's layers globally).
"""
from __future__ import annotations

try:
    from tensorrt_llm._torch.pyexecutor.kv_cache_connector import (KvCacheConnectorScheduler, KvCacheConnectorWorker,
                                                                    SchedulerOutput)
    from tensorrt_llm._utils import mpi_rank
except ImportError as _exc:
    raise ImportError(f"kvbm.trtllm_integration.connector needs TensorRT-LLM 1.1 or newer (PyTorch backend), whose "
                      f"module tensorrt_llm._torch.pyexecutor.kv_cache_connector could not be imported: {_exc}. On an "
                      "NVIDIA GPU machine: `pip install --extra-index-url https://pypi.nvidia.com tensorrt-llm` (see "
                      "TensorRT-LLM's installation guide), or use kvbm's vLLM connector.") from _exc

import weakref
from itertools import chain
from typing import Any, Callable, Sequence

import torch

from kvbm.config import KvbmConfig
from kvbm.connectors import process_metrics
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import StepPlan
from kvbm.connectors.registration import WorkerRegistry
from kvbm.connectors.worker import ConnectorWorker
from kvbm.hashing import salt_hash
from kvbm.layouts import PagedKVCache
from kvbm.layouts.presets import trtllm_pool
from kvbm.tiers import TierSpec, kvbm_tiers
from kvbm.trtllm_integration import reports
from kvbm.trtllm_integration.load_outcomes import LoadOutcomes
from kvbm.trtllm_integration.metadata import ConnectorMetadata, RequestProgress, non_negative_int
from kvbm.trtllm_integration.rank_channel import RankInbox, RankSender

__all__ = ["DynamoKVBMConnectorLeader", "DynamoKVBMConnectorWorker", "ConnectorMetadata", "KvbmLoadError"]


class KvbmLoadError(RuntimeError):
    """Blocks of a request could not be loaded from G2/G3; its KV in the engine's cache is not valid."""


def _engine_args(llm_args: Any) -> tuple[int, int]:
    """The engine's block size and world size (tensor x pipeline parallel ranks) from ``llm_args``."""
    try:
        world_size = llm_args.parallel_config.to_mapping().world_size
        value = llm_args.kv_cache_config.tokens_per_block
    except AttributeError as e:
        raise TypeError(f"llm_args must provide parallel_config.to_mapping().world_size and "
                        f"kv_cache_config.tokens_per_block (TensorRT-LLM's TorchLlmArgs does): {e}") from None
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"parallel_config.to_mapping().world_size must be a positive int, got {world_size!r}")
    return value, world_size  # the block size is checked against the workers' pool tensors


class DynamoKVBMConnectorLeader(KvCacheConnectorScheduler):
    """Scheduler side: prefix lookups and move plans on the block index, one `StepPlan` per step."""

    def __init__(self, llm_args: Any, *, config: KvbmConfig | None = None) -> None:
        """``config`` defaults to ``KvbmConfig.from_env()``; the wait for the worker starts now."""
        super().__init__(llm_args)
        self.block_size, self.world_size = _engine_args(llm_args)
        self._config = config if config is not None else KvbmConfig.from_env()
        #: ranks registered; with more than one rank, made when the first metadata hands out the channel
        self.workers = WorkerRegistry(1, self._config.leader_worker_init_timeout_secs) if self.world_size == 1 else None
        self._inbox = RankInbox(self.world_size) if self.world_size > 1 else None
        if self._inbox is not None:
            weakref.finalize(self, self._inbox.close)
        self._outcomes = LoadOutcomes(self.world_size) if self.world_size > 1 else None
        self._tiers: tuple[TierSpec, ...] = ()  # sent to the workers once every rank registered (several ranks)
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
        if self.world_size > 1:
            return self._ready_ranks()
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

    def _ready_ranks(self) -> ConnectorLeader | None:
        """With several ranks: the leader, built once every rank registered its geometry (rank 0 in-process, the
        others over the channel), with tiers sized for a block summed over the ranks; None while waiting (no
        channel handed out yet, or ranks missing: an error naming them once the timeout has passed)."""
        if self.workers is None:
            return None
        geometries = self._inbox.geometries()
        if (own := reports.geometry()) is not None:
            geometries[0] = own
        self.workers.register(geometries)
        if not self.workers.ready():
            return None
        for rank, (block_size, _) in sorted(geometries.items()):
            if block_size != self.block_size:
                raise ValueError(f"rank {rank}'s KV cache has {block_size} tokens per block, "
                                 f"llm_args.kv_cache_config.tokens_per_block is {self.block_size}")
        total = sum(block_bytes for _, block_bytes in geometries.values())
        metrics = process_metrics.acquire(self._config)
        weakref.finalize(self, process_metrics.release)
        tiers = kvbm_tiers(self._config, total)
        self._leader = ConnectorLeader(tiers, self._config, self.block_size, num_workers=self.world_size,
                                       metrics=metrics)
        self._tiers = tuple(tiers)
        return self._leader

    def _take_reports(self) -> ConnectorLeader | None:
        leader = self._ready_leader()
        if leader is None:
            return None
        ranked = [(0, r) for r in reports.drain()] + (self._inbox.drain() if self._inbox is not None else [])
        for rank, report in ranked:
            leader.apply(report)
            finished = self._outcomes.reported(rank, report) if self._outcomes is not None else report.results
            for move_id in finished:
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
        if self._inbox is not None and self.workers is None:  # the ranks learn the channel from this metadata
            self.workers = WorkerRegistry(self.world_size, self._config.leader_worker_init_timeout_secs)
        leader = self._take_reports()
        self._step += 1
        if leader is None:
            return self._metadata(StepPlan())
        for rid, (_, hashes, ids) in list(self._loads.items()):
            if ids is not None:
                del self._loads[rid]
                load = leader.plan_load(rid, hashes, ids)
                self._loading.update((m.move_id, rid) for m in load.moves)
                if self._outcomes is not None:
                    self._outcomes.planned(load)
        for data in chain(scheduler_output.new_requests, scheduler_output.cached_requests):
            progress = self._progress.get(str(data.request_id))
            if progress is not None:  # else not seen by get_num_new_matched_tokens: not cached
                progress.report(data.new_tokens, data.new_block_ids, data.computed_position,
                                data.num_scheduled_tokens)
                leader.plan_stores(progress.state, progress.tokens, progress.valid_tokens // self.block_size)
        return self._metadata(leader.take_step())

    def _metadata(self, plan: StepPlan) -> ConnectorMetadata:
        if self._inbox is None:
            return ConnectorMetadata(self._step, plan)
        return ConnectorMetadata(self._step, plan, self._inbox.address, self._tiers, self._outcomes.take())

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


class _Resources:
    """What a worker holds and ``close`` releases: its tiers, its channel to the leader, its in-process
    registration (rank 0) and its share of the process metrics."""

    def __init__(self) -> None:
        self.worker: ConnectorWorker | None = None
        self.sender: RankSender | None = None
        self.attached = False
        self.metrics: tuple[int | None] | None = None  # (the rank of) the process metrics acquired

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.attached:
            reports.attach(None)
        if self.metrics is not None:
            process_metrics.release(*self.metrics)
        if self.worker is not None:
            self.worker.close()
        self.sender, self.attached, self.metrics, self.worker = None, False, None, None


class DynamoKVBMConnectorWorker(KvCacheConnectorWorker):
    """Worker side: this rank's tiers over the engine's pool tensor, running the leader's plans."""

    def __init__(self, llm_args: Any, *, config: KvbmConfig | None = None) -> None:
        """``config`` defaults to ``KvbmConfig.from_env()`` (read when the tiers are allocated)."""
        super().__init__(llm_args)
        self.block_size, self.world_size = _engine_args(llm_args)
        self.rank = mpi_rank() if self.world_size > 1 else 0
        self._config = config
        self._cache: PagedKVCache | None = None
        self._held = _Resources()
        self.num_layers = 0
        self._unrun = StepPlan()  # the bound step's moves not started yet
        self._saved_layers = 0  # save_kv_layer calls in the bound step (several ranks)
        self._awaiting: set[str] = set()  # handed over by started_loading_req_ids, not reported yet
        self._loaded: set[str] = set()  # loads done (or failed), not reported yet
        self._failed: dict[str, list[str]] = {}  # request -> why its load failed
        self._sent: set[str] = set()  # finished requests whose stores no longer read their blocks, not reported
        self._use_callable = False
        self._finalizer = weakref.finalize(self, self._held.close)

    @property
    def worker(self) -> ConnectorWorker | None:
        """This rank's tiers and moves; None before they are allocated."""
        return self._held.worker

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        """Describe the pool tensor and announce its geometry to the leader; on a single rank also allocate the
        tiers (several ranks: once the leader sent them, sized over every rank's blocks)."""
        if self._cache is not None:
            raise RuntimeError("register_kv_caches was already called on this worker")
        cache = trtllm_pool(kv_cache_tensor)
        g = cache.geometry
        if g.block_size != self.block_size:
            raise ValueError(f"KV cache tensor has {g.block_size} tokens per block (dimension 4 of shape "
                             f"{tuple(kv_cache_tensor.shape)}), kv_cache_config.tokens_per_block is {self.block_size}")
        if self.rank == 0:
            reports.attach((g.block_size, g.block_bytes))
            self._held.attached = True
        self._cache, self.num_layers = cache, g.num_layers
        if self.world_size == 1:
            try:
                self._allocate(kvbm_tiers(self._settings(), g.block_bytes))
            except BaseException:
                self._held.close()
                self._cache = None
                raise

    def _settings(self) -> KvbmConfig:
        if self._config is None:
            self._config = KvbmConfig.from_env()
        return self._config

    def _allocate(self, tiers: Sequence[TierSpec]) -> None:
        """This rank's tiers; rank 0 records into the leader's process metrics, another rank (a process of its own)
        serves its transfer series on DYN_KVBM_METRICS_PORT + 1 + rank."""
        config = self._settings()
        if self.rank == 0:
            metrics, self._held.metrics = process_metrics.acquire(config), (None,)
        else:
            metrics = process_metrics.acquire(config, rank=self.rank, sides="worker")
            self._held.metrics = (self.rank,)
        self._held.worker = ConnectorWorker(self._cache, tiers, config, metrics=metrics, rank=self.rank)
        self._held.worker.prepare_transfers(layer_groups=False)  # this scheduler side plans no layer-wise loads

    def register_forward_pass_callable(self) -> Callable[[], None]:
        """The callable the executor runs at the end of each forward pass: it starts the step's stores."""
        self._use_callable = True
        return self._start_stores

    def close(self) -> None:
        """Finish transfers in flight, free G2/G3 and withdraw from the leader (idempotent)."""
        self._finalizer()

    def bind_connector_meta(self, metadata: object) -> None:
        """Take this step's plan; report moves of a step whose forward pass never ran failed (their KV is not there).
        With several ranks, first join the leader (register over its channel, allocate the tiers it sent) and take
        the outcomes of the loads every rank finished."""
        if not isinstance(metadata, ConnectorMetadata):
            raise TypeError(f"metadata must be the leader's ConnectorMetadata, got {type(metadata).__name__}")
        super().bind_connector_meta(metadata)
        if self.world_size > 1:
            self._join(metadata)
        old = self._unrun
        unrun = [m for job in chain(old.loads, old.stores) for m in job.moves] + old.cascades
        if unrun and self.worker is not None:
            self.worker.drop(unrun, "the forward pass of its step never ran")
        if self.world_size == 1:  # (several ranks: the leader's outcome says so)
            for load in old.loads:
                self._failed.setdefault(load.request_id, []).append("its load never started")
                self._loaded.add(load.request_id)
        plan = metadata.plan
        self._unrun = StepPlan(list(plan.loads), list(plan.stores), list(plan.cascades))
        self._saved_layers = 0

    def _join(self, metadata: ConnectorMetadata) -> None:
        if self._cache is None:
            raise RuntimeError("register_kv_caches has not been called on this worker")
        if self.rank != 0 and self._held.sender is None and metadata.channel is not None:
            self._held.sender = RankSender(metadata.channel, self.rank)
            self._held.sender.register(self._cache.geometry.block_size, self._cache.geometry.block_bytes)
        if self.worker is None and metadata.tiers:
            self._allocate(metadata.tiers)
        for rid, why in metadata.loads_done.items():
            self._loaded.add(rid)
            if why:
                self._failed.setdefault(rid, []).extend(why)

    def start_load_kv(self, stream: Any) -> None:
        """Start this step's loads (asynchronous: their requests are not in this forward pass) and cascades."""
        plan = self._unrun
        if self._waiting_for_tiers(plan):
            return
        worker = self._require_worker()
        worker.start_loads(plan.loads, plan.layer_ratio)
        worker.start_cascades(plan.cascades)
        plan.loads, plan.cascades = [], []

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        """Nothing to wait for: loaded requests join a forward pass only after ``get_finished`` reported them."""

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        """Without the forward-pass callable, start the stores (whole blocks) once the last layer is enqueued (with
        several ranks: once this rank's layers all were, whatever their global numbers)."""
        if self.world_size > 1:
            non_negative_int("layer_idx", layer_idx)
            self._saved_layers += 1
            if self._saved_layers == self.num_layers and not self._use_callable:
                self._start_stores()
            return
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
        KvbmLoadError for a failed load: never reported as loaded, the others done by then go in the next call.
        With several ranks a load is done once the leader's metadata said every rank finished it (then every rank
        reports it, or raises, in the same call)."""
        if self._waiting_for_tiers(self._unrun) and not finished_gen_req_ids and not started_loading_req_ids:
            return [], []
        worker = self._require_worker()
        worker.hold(str(r) for r in finished_gen_req_ids)
        self._awaiting.update(str(r) for r in started_loading_req_ids)
        sending, recving = worker.poll()
        self._sent |= sending
        failed_here = worker.take_failed_loads()
        if self.world_size == 1:
            self._loaded |= recving
            for rid, why in failed_here.items():
                self._failed.setdefault(rid, []).extend(why)
        if (report := worker.take_report()) is not None:
            if self._held.sender is not None:
                self._held.sender.report(report)
            else:
                reports.post(report)
        done = self._awaiting & self._loaded
        failed = {rid: self._failed.pop(rid) for rid in sorted(done & self._failed.keys())}
        self._awaiting, self._loaded = self._awaiting - failed.keys(), self._loaded - failed.keys()
        if failed:
            raise KvbmLoadError("kvbm could not load stored KV blocks, so these requests' KV is not valid: "
                                + "; ".join(f"request {rid}: {w}" for rid, why in failed.items() for w in why))
        self._awaiting, self._loaded, sent, self._sent = self._awaiting - done, self._loaded - done, self._sent, set()
        return sorted(int(r) for r in sent), sorted(int(r) for r in done)

    def _waiting_for_tiers(self, plan: StepPlan) -> bool:
        """Several ranks, tiers not sent yet, nothing planned: the steps before every rank registered."""
        return self.worker is None and self.world_size > 1 and plan.is_empty()

    def _start_stores(self) -> None:
        if self._unrun.stores:
            stores, self._unrun.stores = self._unrun.stores, []
            self._require_worker().start_stores(stores)

    def _require_worker(self) -> ConnectorWorker:
        if self.worker is None:
            raise RuntimeError("register_kv_caches has not been called on this worker"
                               + (" or the leader has not sent the tiers yet" if self.world_size > 1 else ""))
        return self.worker
