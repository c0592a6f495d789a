"""`KvbmStorage`: an SGLang HiCache storage (L3) backend on kvbm's tiers (G2 pinned host, G3 disk).

SGLang loads it through its storage backend factory (``--hicache-storage-backend dynamic`` with
``module_path`` / ``class_name`` in ``--hicache-storage-backend-extra-config``). Each tensor-parallel rank builds
its own backend over its own shard of the KV (its heads): its own block index and tiers, sized from
``DYN_KVBM_*`` (environment, overridden by such entries of the extra config) for a block's bytes summed over
the TP x PP ranks, as kvbm sizes tiers for every engine. ``batch_exists`` answers for this rank only; SGLang
reduces the answers of all ranks with a minimum, so every rank loads the same prefix. With ``DYN_KVBM_METRICS``
each rank of a multi-rank engine serves its own metrics on ``DYN_KVBM_METRICS_PORT + 1 + rank`` (rank = pp rank x
tp size + tp rank; its transfer series labelled ``rank``), a single-rank engine on ``DYN_KVBM_METRICS_PORT``.

Keys are SGLang's page hashes (hex strings chained from a seed of the request's extra key and cache salt, so two
salts never share a key); each maps to a 64-bit kvbm sequence hash, and the full key is kept beside it so that
two keys meeting on one hash are a miss, never the other key's bytes. One kvbm block is one SGLang page.

* set: ``plan_store`` on the index, the host pool's pages copied into G2 (G3 in disk-only mode) through
  ``Transfers.submit``; G2 blocks go down to G3 through the disk admission filter, as in every kvbm set-up.
* get: ``plan_load``, the pages copied back from the first tier holding them; a block not found, or whose read
  fails (I/O error, checksum mismatch), is reported False and its stored copy dropped: never wrong bytes.
* exists: the index's prefix lookup (no data moves).

SGLang's zero-copy calls (``batch_get_v1`` / ``batch_set_v1``, chosen by ``"interface_v1": 1`` in the extra
config) hand host-pool indices: kvbm reads and writes the host pool in place, in its layout. The older calls
(``get`` / ``set`` / ``batch_get`` / ``batch_set``) hand flat page tensors, copied through a stack of those pages
described as a cache. Calls come from SGLang's prefetch and backup threads; one lock serialises them, and each
call returns when its copies have landed. Hybrid-model pools (``batch_*_v2``: Mamba, SWA, sidecar pools) are not
served.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo, PoolName

from kvbm.config import KvbmConfigError
from kvbm.connectors import kvbm_config_from, process_metrics
from kvbm.kernels.disk_file import align_up
from kvbm.layouts import PagedKVCache
from kvbm.leader import ENGINE_TIER, BlockIndex, Move, MoveResult
from kvbm.policies.admission import DiskAdmissionFilter
from kvbm.tiers import HOST_TIER, kvbm_tiers
from kvbm.worker.store import BlockStore

from .host_pool import UnsupportedHostPool, describe_host_pool, flat_pages_cache, host_pool_layout

__all__ = ["KvbmStorage", "key_hash"]

log = logging.getLogger(__name__)

#: Extra-config keys read by SGLang's factory and controller, or by this backend.
_KNOWN_KEYS = {"backend_name", "module_path", "class_name", "interface_v1"}


def key_hash(key: str) -> int:
    """The 64-bit kvbm sequence hash of an SGLang storage key (BLAKE2b-64 of its UTF-8 bytes)."""
    if not isinstance(key, str):
        raise TypeError(f"storage keys must be str, got {type(key).__name__}")
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


class KvbmStorage(HiCacheStorage):
    """SGLang ``HiCacheStorage`` over kvbm's block index and tiers (see the module docstring).

    Built by SGLang's ``StorageBackendFactory`` as ``KvbmStorage(storage_config, kwargs)``; the tiers are
    allocated when SGLang registers its host pool (``register_mem_pool_host``), whose geometry sizes a block.
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        extra = dict(storage_config.extra_config or {})
        unknown = sorted(k for k in extra if k not in _KNOWN_KEYS and not k.startswith("DYN_KVBM_"))
        if unknown:
            log.warning("kvbm storage backend: ignoring extra-config keys %s", unknown)
        if storage_config.is_mla_model and storage_config.tp_size > 1:
            raise NotImplementedError(
                "the kvbm storage backend keeps one store per rank, and SGLang writes replicated MLA KV from one "
                "rank only: run MLA models with tensor parallel size 1, or use a shared storage backend")
        if storage_config.dcp_size > 1 or storage_config.attn_cp_size > 1:
            raise NotImplementedError("the kvbm storage backend does not serve context-parallel ranks")
        self.storage_config = storage_config
        self.config = kvbm_config_from(extra)
        if not (self.config.host_enabled or self.config.disk_enabled):
            raise KvbmConfigError("no kvbm tier configured: set DYN_KVBM_CPU_CACHE_GB and/or DYN_KVBM_DISK_CACHE_GB "
                                  "(or their *_OVERRIDE_NUM_BLOCKS), in the environment or the extra config")
        self.interface_v1 = bool(extra.get("interface_v1", 0))
        self._lock = threading.RLock()
        self._host: PagedKVCache | None = None
        self._index: BlockIndex | None = None
        self._store: BlockStore | None = None
        self._keys: dict[int, str] = {}
        self._loads: set[int] = set()  # ids of load moves in flight
        self._metrics = None
        self._closed = False

    # -- set-up ------------------------------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        """Ranks whose shards a block's bytes are summed over when sizing the tiers (TP x PP)."""
        c = self.storage_config
        return (1 if c.is_mla_model else c.tp_size) * c.pp_size

    @property
    def metrics_rank(self) -> int | None:
        """This rank's number among the engine's TP x PP rank processes, whose metrics it serves on a port of its
        own (`kvbm.connectors.process_metrics`); None for a single-rank engine (one port, no rank label)."""
        c = self.storage_config
        return None if c.tp_size * c.pp_size == 1 else c.pp_rank * c.tp_size + c.tp_rank

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Describe SGLang's host pool as the engine cache and allocate the tiers for its page size."""
        with self._lock:
            if self._store is not None:
                raise RuntimeError("a host pool is already registered with this kvbm storage backend")
            super().register_mem_pool_host(mem_pool_host)
            self._layout = host_pool_layout(mem_pool_host)
            host = describe_host_pool(mem_pool_host)
            block_bytes = host.geometry.block_bytes
            total = block_bytes * self.num_shards
            self.config.check_fits(total, disk_bytes_per_block=align_up(block_bytes) * self.num_shards)
            tiers = kvbm_tiers(self.config, total)
            admission = DiskAdmissionFilter(enabled=not self.config.disable_disk_offload_filter)
            index = BlockIndex([t.index_config(admission if k else None) for k, t in enumerate(tiers)],
                               batch_size=self.config.max_transfer_batch_size,
                               min_priority=self.config.host_offload_prefix_min_priority)
            self._metrics = process_metrics.acquire(self.config, rank=self.metrics_rank)
            try:
                self._store = BlockStore.open(host, tiers, self.config, metrics=self._metrics)
            except BaseException:
                process_metrics.release(self.metrics_rank)
                raise
            self._index, self._host, self._tiers = index, host, tiers
            log.info("kvbm storage backend (tp rank %d/%d): %s, host pool %s, pages of %d tokens (%d bytes)",
                     self.storage_config.tp_rank, self.storage_config.tp_size,
                     ", ".join(f"{t.name} {t.num_blocks} blocks on {t.medium.value}" for t in tiers),
                     self._layout.layout, host.geometry.block_size, block_bytes)

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """Hybrid models register their extra pools (Mamba, SWA, ...) here: only the KV pool is served."""
        if str(host_pool_name) != PoolName.KV.value:
            raise UnsupportedHostPool(f"the kvbm storage backend serves the KV pool only, not SGLang's "
                                      f"{host_pool_name} pool (hybrid models are not served)")
        super().register_mem_host_pool_v2(host_pool, host_pool_name)

    # -- SGLang's zero-copy interface --------------------------------------------------------------------------

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many of ``keys``, from the first, this rank holds (G2, then G3)."""
        with self._lock:
            self._ready()
            hashes = [key_hash(k) for k in keys]
            self._apply(self._store.poll())
            n = next((i for i, (k, h) in enumerate(zip(keys, hashes)) if not self._holds(k, h)), len(keys))
            self._index.lookup(hashes[:n], whole_prompt=False)  # hits count for the disk admission filter
            host = sum(1 for h in hashes[:n] if self._host_holds(h))
            self._metrics.record_request_lookup(len(keys), host, n - host)
            return n

    def exists(self, key: str) -> bool:
        """Whether this rank holds ``key``."""
        return self.batch_exists([key]) == 1

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Store the host pool's pages at ``host_indices`` (``len(keys) * page_size`` token slots) as ``keys``."""
        with self._lock:
            self._ready()
            return self._store_pages(keys, self._page_ids(keys, host_indices))

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Load ``keys`` into the host pool's pages at ``host_indices``; False for a key not held or not read."""
        with self._lock:
            self._ready()
            return self._load_pages(keys, self._page_ids(keys, host_indices))

    # -- SGLang's flat-page interface --------------------------------------------------------------------------

    def batch_set(self, keys: list[str], values: Sequence[torch.Tensor] | None = None,
                  target_locations: Any = None, target_sizes: Any = None) -> bool:
        """Store flat data pages ``values`` as ``keys``; True when every page is stored."""
        with self._lock:
            self._ready()
            if values is None or len(values) != len(keys):
                raise ValueError(f"batch_set needs one value per key, got {len(keys)} keys and "
                                 f"{None if values is None else len(values)} values")
            if not keys:
                return True
            pages = torch.stack([self._flat(v, "value") for v in values])
            return all(self._with_pages(pages, lambda: self._store_pages(keys, range(len(keys)))))

    def set(self, key: str, value: torch.Tensor | None = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        """Store one flat data page."""
        return self.batch_set([key], [value])

    def batch_get(self, keys: list[str], target_locations: Sequence[torch.Tensor] | None = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        """Load ``keys`` into the flat pages ``target_locations``; per key the filled page, or None (not held or
        not read: the page is left as it was)."""
        with self._lock:
            self._ready()
            if target_locations is None or len(target_locations) != len(keys):
                raise ValueError("batch_get needs one target page per key")
            targets = [self._flat(t, "target") for t in target_locations]
            if not keys:
                return []
            pages = torch.empty((len(keys), self._page_numel()), dtype=self._host.dtype)
            ok = self._with_pages(pages, lambda: self._load_pages(keys, range(len(keys))))
            out: list[torch.Tensor | None] = []
            for i, target in enumerate(target_locations):
                if ok[i]:
                    targets[i].copy_(pages[i])
                out.append(target_locations[i] if ok[i] else None)
            return out

    def get(self, key: str, target_location: torch.Tensor | None = None,
            target_sizes: Any = None) -> torch.Tensor | None:
        """Load one flat data page into ``target_location``; None when not held or not read."""
        if target_location is None:
            target_location = torch.empty(self._page_numel(), dtype=self._host.dtype)
        return self.batch_get([key], [target_location])[0]

    # -- housekeeping ------------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every stored page (the tiers' memory is kept)."""
        with self._lock:
            if self._store is None:
                return
            self._store.wait_all()
            self._apply(self._store.poll())
            self._store.wait_all()
            self._store.poll()
            admission = DiskAdmissionFilter(enabled=not self.config.disable_disk_offload_filter)
            self._index = BlockIndex([t.index_config(admission if k else None) for k, t in enumerate(self._tiers)],
                                     batch_size=self.config.max_transfer_batch_size,
                                     min_priority=self.config.host_offload_prefix_min_priority)
            self._keys.clear()

    def close(self) -> None:
        """Finish every copy and release the tiers (removes the disk file); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._store is None:
                return
            try:
                self._store.wait_all()
                self._apply(self._store.poll())
            finally:
                self._store.close()
                process_metrics.release(self.metrics_rank)

    def check_invariants(self) -> None:
        """Verify the index (O(n), for tests)."""
        with self._lock:
            self._ready()
            self._index.check_invariants()

    # -- internals ---------------------------------------------------------------------------------------------

    def _ready(self) -> None:
        if self._closed:
            raise ValueError("this kvbm storage backend is closed")
        if self._store is None:
            raise RuntimeError("no host pool registered: SGLang calls register_mem_pool_host first")

    def _page_numel(self) -> int:
        return self._host.geometry.block_bytes // self._host.geometry.itemsize

    def _flat(self, page: Any, what: str) -> torch.Tensor:
        """``page`` as a flat view of one page, checked against the host pool's page."""
        if not isinstance(page, torch.Tensor):
            raise TypeError(f"each {what} must be a tensor, got {type(page).__name__}")
        if page.dtype != self._host.dtype or page.numel() != self._page_numel() or page.device.type != "cpu":
            raise ValueError(f"each {what} must be one host page of {self._page_numel()} {self._host.dtype} "
                             f"elements on the CPU, got {page.numel()} {page.dtype} on {page.device}")
        if not page.is_contiguous():
            raise ValueError(f"each {what} must be contiguous")
        return page.view(-1)

    def _page_ids(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[int]:
        """Host pool page ids of ``host_indices``: whole pages, ``page_size`` consecutive token slots each."""
        size = self._host.geometry.block_size
        idx = torch.as_tensor(host_indices).reshape(-1).to(torch.int64)
        if idx.numel() != len(keys) * size:
            raise ValueError(f"host_indices must hold {len(keys)} pages of {size} token slots "
                             f"({len(keys) * size}), got {idx.numel()}")
        if not keys:
            return []
        rows = idx.view(len(keys), size)
        starts = rows[:, 0]
        if bool((starts % size != 0).any()) or not torch.equal(rows - starts[:, None],
                                                                 torch.arange(size).expand_as(rows)):
            raise ValueError("host_indices must cover whole host pool pages (page-aligned runs of page_size slots)")
        return (starts // size).tolist()

    def _with_pages(self, pages: torch.Tensor, run: Any) -> list[bool]:
        """Run ``run()`` with the stack of flat ``pages`` as the store's engine cache instead of the host pool.

        Safe under the lock: every call waits for its own engine-side moves, so none is in flight before or
        after, and cascades never touch the engine cache."""
        self._store.caches[ENGINE_TIER] = flat_pages_cache(self._layout, self._host, pages)
        try:
            return run()
        finally:
            self._store.caches[ENGINE_TIER] = self._host

    def _store_pages(self, keys: Sequence[str], page_ids: Sequence[int]) -> list[bool]:
        hashes = [key_hash(k) for k in keys]
        ok = [False] * len(keys)
        first: dict[int, int] = {}
        todo: list[int] = []
        for i, (k, h) in enumerate(zip(keys, hashes)):
            held = self._keys.get(h)
            if held is not None and held != k and self._in_any_tier(h):
                log.warning("storage keys %s and %s share a kvbm hash: %s not stored", held, k, k)
            elif h in first:
                continue  # the same key twice in one call: stored once, reported like its first copy
            else:
                first[h] = i
                todo.append(i)
        self._apply(self._store.poll())
        while todo:
            plan = self._index.plan_store([hashes[i] for i in todo], [page_ids[i] for i in todo])
            for local, reason in plan.skipped.items():
                ok[todo[local]] = reason.startswith("already stored")
            results = self._run(plan.moves)
            for move in plan.moves:
                failed = results[move.move_id].failed
                for k, local in enumerate(plan.positions[move.move_id]):
                    i = todo[local]
                    ok[i] = k not in failed
                    if ok[i]:
                        self._keys[hashes[i]] = keys[i]
            busy = [todo[local] for local in plan.busy]
            if not busy or not self._store.busy:
                break  # every slot of the first tier is being read by nothing we can wait for: not stored
            self._store.wait_oldest()
            self._apply(self._store.poll())
            todo = busy
        for i, h in enumerate(hashes):
            if h in first and first[h] != i:
                ok[i] = ok[first[h]]
        self._prune_keys()
        return ok

    def _load_pages(self, keys: Sequence[str], page_ids: Sequence[int]) -> list[bool]:
        hashes = [key_hash(k) for k in keys]
        ok = [False] * len(keys)
        mine = [i for i in range(len(keys)) if self._keys.get(hashes[i]) == keys[i]]
        self._apply(self._store.poll())
        plan = self._index.plan_load([hashes[i] for i in mine], [page_ids[i] for i in mine])
        self._loads.update(m.move_id for m in plan.moves)
        results = self._run(plan.moves)
        for move in plan.moves:
            failed = results[move.move_id].failed
            for k, local in enumerate(plan.positions[move.move_id]):
                ok[mine[local]] = k not in failed
                if k in failed:
                    log.warning("kvbm storage: page %s not loaded: %s", keys[mine[local]], failed[k])
        return ok

    def _run(self, moves: list[Move]) -> dict[int, MoveResult]:
        """Execute ``moves`` and wait for their results, applying every result that comes back meanwhile
        (cascades included)."""
        want = {m.move_id for m in moves}
        got: dict[int, MoveResult] = {}
        self._store.execute(moves)
        while want - got.keys():
            self._store.wait_oldest()
            for result in self._apply(self._store.poll()):
                if result.move_id in want:
                    got[result.move_id] = result
        return got

    def _apply(self, results: list[MoveResult]) -> list[MoveResult]:
        """Hand finished moves to the index, then start the cascades that follow; returns ``results``. A block
        whose load failed is dropped from its tier, whatever the cause: a later call recomputes it rather than
        read it again."""
        for result in results:
            lost = set(result.failed) if result.move_id in self._loads else result.lost
            self._loads.discard(result.move_id)
            self._index.complete(result.move_id, result.failed, lost)
        if self._index.has_cascades():
            self._store.execute(self._index.plan_cascades())
        return results

    def _holds(self, key: str, seq_hash: int) -> bool:
        """Whether ``key`` is stored (committed) in some tier."""
        return self._keys.get(seq_hash) == key and any(
            self._index.pool(name).lookup(seq_hash) is not None for name in self._index.tier_names)

    def _host_holds(self, seq_hash: int) -> bool:
        return HOST_TIER in self._index.tier_names and self._index.pool(HOST_TIER).lookup(seq_hash) is not None

    def _in_any_tier(self, seq_hash: int) -> bool:
        return any(self._index.pool(name).contains(seq_hash) for name in self._index.tier_names)

    def _prune_keys(self) -> None:
        """Forget keys of evicted blocks once the key table outgrows twice the tiers' slots."""
        slots = sum(t.num_blocks for t in self._tiers)
        if len(self._keys) > 2 * slots:
            self._keys = {h: k for h, k in self._keys.items() if self._in_any_tier(h)}

