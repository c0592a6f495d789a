"""Worker side of kvbm's offloading spec: vLLM's canonical KV pages moved through kvbm's transfer library.

vLLM 0.33's offloading worker receives ``CanonicalKVCaches``: per unique KV tensor an int8 ``[num_blocks,
page_bytes]`` view (one per layer for the standardized layouts the connector asks for). `describe_canonical_kv_caches`
describes them with `kvbm.layouts.describe` as a cache of ``num_tensors`` layers whose block piece is the layer's
page (bytes taken as they are: the canonical API hands pages, not heads); kvbm's tiers are allocated in that
geometry, so a G2 block holds the engine's pages verbatim. Jobs run as kvbm `Move`s on a `BlockStore`
(``Transfers.submit``: staged gather/scatter + DMA for GPU <-> pinned host, O_DIRECT / cuFile for disk), positions
mapped to vLLM's GPU block ids (``blocks_per_chunk`` GPU blocks per offloaded key, a load may start mid-key).

Failures: vLLM 0.33's ``OffloadingConnector`` asserts every job succeeded and has no channel for failed blocks,
so this worker always reports jobs as done and keeps the failures for `KvbmOffloadingConnector`
(``take_load_errors`` for vLLM to recompute, ``take_failures`` for the manager to discard). Without that connector
(``failure_reports`` off) a failed load raises, since vLLM would otherwise read the blocks; a failed store or
cascade marks its slot bad on this rank, so a later read of it fails instead of serving wrong bytes.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)

from kvbm.config import KvbmConfig
from kvbm.kernels.transfers import Transfers
from kvbm.layouts import PagedKVCache, describe
from kvbm.leader.plans import ENGINE_TIER, Move, MoveKind, MoveResult
from kvbm.tiers import TierSpec
from kvbm.worker.store import BlockStore

from .specs import KvbmLoadStoreSpec

__all__ = ["KvbmOffloadingWorker", "TransferFailedError", "describe_canonical_kv_caches"]

log = logging.getLogger(__name__)


class TransferFailedError(RuntimeError):
    """A load failed and the connector cannot tell vLLM (use ``KvbmOffloadingConnector``)."""


def describe_canonical_kv_caches(kv_caches: CanonicalKVCaches) -> PagedKVCache:
    """vLLM's canonical KV tensors as a kvbm cache: one layer per tensor, one piece of ``page_size_bytes`` per
    block and layer (int8). Supports one KV cache group whose layers each have a tensor of their own."""
    if len(kv_caches.group_data_refs) != 1:
        raise ValueError(f"KvbmOffloadingSpec supports one KV cache group (full attention); this model has "
                         f"{len(kv_caches.group_data_refs)} (a hybrid model)")
    tensors = [entry.tensor for entry in kv_caches.tensors]
    if not tensors:
        raise ValueError("no KV cache tensors to offload")
    refs = kv_caches.group_data_refs[0]
    if sorted(ref.tensor_idx for ref in refs) != list(range(len(tensors))):
        raise ValueError("KvbmOffloadingSpec needs one canonical KV tensor per layer (no shared or packed tensors)")
    pages = {entry.page_size_bytes for entry in kv_caches.tensors}
    shapes = {(tuple(t.shape), t.stride(), t.dtype) for t in tensors}
    if len(pages) != 1 or len(shapes) != 1:
        raise ValueError(f"KvbmOffloadingSpec needs equal pages in every layer, got page sizes {sorted(pages)} and "
                         f"tensor shapes/strides {sorted(str(s) for s in shapes)}")
    page = pages.pop()
    views = []
    for t in tensors:
        if t.dim() != 2 or t.dtype != torch.int8 or t.shape[1] != page or t.stride(1) != 1:
            raise ValueError(f"expected int8 [num_blocks, {page}] canonical tensors, got {t.dtype} "
                             f"{tuple(t.shape)} strides {t.stride()}")
        views.append(t.unsqueeze(1))  # [num_blocks, 1 token, page bytes]
    return describe(views, "block token channel", tensor_dims="layer", name="vllm_canonical_pages")


@dataclass
class _Job:
    job_id: int
    is_load: bool
    pending: set[int]
    started: float
    num_bytes: int
    gpu_of: dict[int, dict[int, int]] = field(default_factory=dict)  #: load move id -> block index -> GPU block


def _positions_to_gpu(spec: GPULoadStoreSpec, blocks_per_chunk: int) -> dict[int, int]:
    """Position (sub-block of the job's keys, see `KvbmLoadStoreSpec`) -> GPU block id."""
    if len(spec.group_sizes) != 1:
        raise ValueError(f"KvbmOffloadingSpec supports one KV cache group, got {len(spec.group_sizes)}")
    skip = int(spec.block_indices[0]) % blocks_per_chunk
    ids = spec.block_ids.tolist()
    return {skip + i: int(b) for i, b in enumerate(ids)}


class KvbmOffloadingWorker(OffloadingWorker):
    """vLLM's ``OffloadingWorker`` over kvbm's tiers and transfer library (see the module docstring)."""

    def __init__(self, kv_caches: CanonicalKVCaches, tiers: Sequence[TierSpec], config: KvbmConfig,
                 blocks_per_chunk: int, *, transfers: Transfers | None = None) -> None:
        """Describe the engine cache and allocate this rank's tiers in its geometry (nothing held on failure); on a
        GPU, build what the transfers between them use (`BlockStore.prepare_engine_pairs`)."""
        if not tiers:
            raise ValueError("no offload tier configured")
        engine = describe_canonical_kv_caches(kv_caches)
        self.engine_cache = engine
        self.blocks_per_chunk = blocks_per_chunk
        self.store = BlockStore.open(engine, tiers, config, transfers=transfers)
        if engine.device.type == "cuda":
            try:  # the first job would otherwise build the copy plans and kernels of its pair
                self.store.prepare_engine_pairs()
            except Exception as e:  # noqa: BLE001 - an optimisation: the first jobs build what they need
                log.warning("kvbm: transfer plans not built ahead (%r); the first jobs build them", e)
        self.failure_reports = False
        # Moves run under ids of this worker (vLLM jobs issued before a cache reset may still run): run id ->
        # (indices of the planned move's blocks it copies, the planned move, blocks failed before running, job id).
        self._runs: dict[int, tuple[list[int], Move, dict[int, str], int]] = {}
        self._run_ids = itertools.count(1)
        self._jobs: dict[int, _Job] = {}
        self._finished: list[TransferResult] = []
        self._failures: list[MoveResult] = []
        self._load_errors: set[int] = set()
        self._bad: dict[str, set[int]] = {name: set() for name in self.store.caches if name != ENGINE_TIER}
        self._closed = False

    # -- OffloadingWorker --------------------------------------------------------------------------------------

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        """Start copying the job's GPU blocks into their pending slots (and the cascades riding on it)."""
        spec = self._spec(dst_spec)
        gpu = _positions_to_gpu(src_spec, self.blocks_per_chunk)
        moves, dropped = [], {}
        for move in spec.moves:
            keep = [i for i, p in enumerate(move.src_ids) if p in gpu]
            if len(keep) != move.num_blocks:
                dropped[move.move_id] = {i: "no GPU block for this position" for i in range(move.num_blocks)
                                         if i not in keep}
            moves.append((move, keep, [gpu[move.src_ids[i]] for i in keep]))
        self._start(job_id, False, moves, spec.cascades, dropped, {})
        return True

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec,
                    expedited: bool = False) -> bool:
        """Start copying the held slots into the job's GPU blocks (positions before the first GPU block, or past
        the last, are not copied)."""
        spec = self._spec(src_spec)
        gpu = _positions_to_gpu(dst_spec, self.blocks_per_chunk)
        missing = {gpu[p] for p in spec.missing if p in gpu}
        moves, gpu_of = [], {}
        for move in spec.moves:
            keep = [i for i, p in enumerate(move.dst_ids) if p in gpu]
            gpu_of[move.move_id] = {i: gpu[move.dst_ids[i]] for i in keep}
            moves.append((move, keep, [gpu[move.dst_ids[i]] for i in keep]))
        if missing:
            self._fail_load(missing, f"job {job_id}: blocks left every tier before the load was planned")
        self._start(job_id, True, moves, spec.cascades, {}, gpu_of)
        return True

    def get_finished(self) -> list[TransferResult]:
        """Jobs whose moves all finished since the last call; never blocks. Every job is reported as done (see
        the module docstring for failures)."""
        self._collect(self.store.poll())
        finished, self._finished = self._finished, []
        return finished

    def wait(self, job_ids: set[int]) -> None:
        """Block until the given jobs' moves have finished (results kept for ``get_finished``)."""
        while any(j in self._jobs for j in job_ids):
            if not self.store.busy:
                raise RuntimeError(f"jobs {sorted(j for j in job_ids if j in self._jobs)} wait for moves that are "
                                   "not running")
            self.store.wait_oldest()
            self._collect(self.store.poll())

    def shutdown(self) -> None:
        """Finish every move, then release the tiers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.store.close()

    # -- failure channel (KvbmOffloadingConnector) -------------------------------------------------------------

    def take_load_errors(self) -> set[int]:
        """GPU block ids whose load failed since the last call (vLLM recomputes them)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_failures(self) -> list[MoveResult]:
        """Per move, the blocks that failed since the last call (the manager discards or drops their slots)."""
        failures, self._failures = self._failures, []
        return failures

    # -- internals ---------------------------------------------------------------------------------------------

    @staticmethod
    def _spec(spec: LoadStoreSpec) -> KvbmLoadStoreSpec:
        if not isinstance(spec, KvbmLoadStoreSpec):
            raise TypeError(f"KvbmOffloadingWorker moves KvbmLoadStoreSpec jobs, got {type(spec).__name__}")
        return spec

    def _start(self, job_id: int, is_load: bool, moves: list[tuple[Move, list[int], list[int]]],
               cascades: Sequence[Move], dropped: dict[int, dict[int, str]], gpu_of: dict[int, dict[int, int]]) -> None:
        if job_id in self._jobs:
            raise ValueError(f"job {job_id} was submitted twice")
        job = _Job(job_id, is_load, set(), time.perf_counter(), 0, gpu_of)
        self._jobs[job_id] = job
        runnable: list[Move] = []
        block_bytes = self.engine_cache.geometry.block_bytes
        for move, keep, gpu_ids in moves:
            bad = self._bad[move.src_tier] if move.kind is MoveKind.LOAD else set()
            failed = dict(dropped.get(move.move_id, {}))
            kept = []
            for i, g in zip(keep, gpu_ids):
                if move.kind is MoveKind.LOAD and move.src_ids[i] in bad:
                    failed[i] = f"{move.src_tier} slot {move.src_ids[i]}: an earlier write of it failed on this rank"
                else:
                    kept.append((i, g))
            # The run keeps the planned block order; its indices map back through `kept`.
            run_id = next(self._run_ids)
            if move.kind is MoveKind.STORE:
                sub = Move(run_id, move.kind, move.src_tier, move.dst_tier, tuple(g for _, g in kept),
                           tuple(move.dst_ids[i] for i, _ in kept), tuple(move.hashes[i] for i, _ in kept))
            else:
                sub = Move(run_id, move.kind, move.src_tier, move.dst_tier,
                           tuple(move.src_ids[i] for i, _ in kept), tuple(g for _, g in kept),
                           tuple(move.hashes[i] for i, _ in kept))
            self._runs[run_id] = ([i for i, _ in kept], move, failed, job_id)
            job.num_bytes += len(kept) * block_bytes
            job.pending.add(run_id)
            runnable.append(sub)
        for move in cascades:
            bad = self._bad[move.src_tier]
            failed = {i: f"{move.src_tier} slot {s}: an earlier write of it failed on this rank"
                      for i, s in enumerate(move.src_ids) if s in bad}
            keep = [i for i in range(move.num_blocks) if i not in failed]
            run_id = next(self._run_ids)
            sub = Move(run_id, move.kind, move.src_tier, move.dst_tier, tuple(move.src_ids[i] for i in keep),
                       tuple(move.dst_ids[i] for i in keep), tuple(move.hashes[i] for i in keep))
            self._runs[run_id] = (keep, move, failed, job_id)
            job.pending.add(run_id)
            runnable.append(sub)
        self.store.execute([m for m in runnable if m.num_blocks])
        for m in runnable:
            if not m.num_blocks:
                self._collect([MoveResult(m.move_id)])

    def _collect(self, results: list[MoveResult]) -> None:
        for result in results:
            keep, move, failed, job_id = self._runs.pop(result.move_id)
            failed = dict(failed)
            for j, reason in result.failed.items():
                failed[keep[j]] = reason
            lost = {keep[j] for j in result.lost}
            job = self._jobs[job_id]
            if move.kind is not MoveKind.LOAD:  # a write: remember slots this rank failed to write
                bad = self._bad[move.dst_tier]
                for i, slot in enumerate(move.dst_ids):
                    (bad.add if i in failed else bad.discard)(slot)
            if failed:
                self._report(job, move, failed, lost)
            job.pending.discard(result.move_id)
            if not job.pending:
                del self._jobs[job_id]
                self._finished.append(TransferResult(job_id, True, transfer_size=job.num_bytes,
                                                     transfer_time=time.perf_counter() - job.started))

    def _report(self, job: _Job, move: Move, failed: dict[int, str], lost: set[int]) -> None:
        self._failures.append(MoveResult(move.move_id, failed, frozenset(lost)))
        if move.kind is MoveKind.LOAD:
            gpu = job.gpu_of.get(move.move_id, {})
            self._fail_load({gpu[i] for i in failed if i in gpu},
                            f"move {move.move_id}: " + "; ".join(sorted(set(failed.values())))[:200])
        else:
            log.warning("%s move %d: %d of %d blocks failed (%s)", move.kind.value, move.move_id, len(failed),
                        move.num_blocks, next(iter(failed.values())))

    def _fail_load(self, gpu_blocks: set[int], why: str) -> None:
        if not gpu_blocks:
            return
        if not self.failure_reports:
            raise TransferFailedError(f"{len(gpu_blocks)} GPU blocks failed to load ({why}); vLLM 0.33's "
                                      "OffloadingConnector cannot be told: use kvbm.vllm_offloading.connector:"
                                      "KvbmOffloadingConnector to have them recomputed")
        self._load_errors.update(gpu_blocks)
