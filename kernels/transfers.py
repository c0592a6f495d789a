"""The one transfer face: ``Transfers.submit(src, dst, src_ids, dst_ids) -> BlockTransfer``, for any two caches
whose mediums have a registered path.

A path is registered per (source medium, destination medium) with `register_path`; `kvbm.kernels.paths` registers
the built-in ones (GPU <-> host staged/zero-copy/DMA, host <-> host, host <-> disk O_DIRECT, GPU <-> disk through
cuFile or a pinned bounce). A `Transfers` object builds each path on first use and owns what paths share: the
GPU transfer engine, the disk I/O threads and the bounce buffers, so no caller ever holds a side stream, a bounce
buffer or a thread of its own. Adding a path is one module that calls `register_path`.
"""
from __future__ import annotations

import importlib
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from . import id_check
from .block_transfer import BlockTransfer
from .copy_plan import IdentityMemo, IdentitySequenceMemo
from .medium import Medium, medium_of

__all__ = ["Transfers", "TransferPath", "register_path", "registered_paths", "checked_ids"]

log = logging.getLogger(__name__)


class TransferPath(Protocol):
    """Moves blocks between caches of one (source medium, destination medium) pair.

    A path may also define ``submit_groups(pairs, src_ids, dst_ids) -> list[BlockTransfer]``: the same ids for
    several cache pairs at once (`Transfers.submit_groups`; without it, each pair is submitted alone), and
    ``prepare(src, dst)``: build what moving blocks between two caches needs before the first transfer
    (`Transfers.prepare`; without it, nothing is built ahead)."""

    name: str

    def submit(self, src: Any, dst: Any, src_ids: np.ndarray, dst_ids: np.ndarray) -> BlockTransfer:
        """Start moving blocks ``src_ids`` of ``src`` into ``dst_ids`` of ``dst`` (ids already checked); raise
        ValueError before starting anything when the caches cannot be moved by this path."""

    def close(self) -> None:
        """Release what the path holds; its transfers have finished."""


PathFactory = Callable[["Transfers"], TransferPath]
_PATHS: dict[tuple[Medium, Medium], PathFactory] = {}
_BUILTIN = "kvbm.kernels.paths"


def register_path(src: Medium, dst: Medium, factory: PathFactory) -> None:
    """Make ``factory(transfers)`` the path for caches on ``src`` -> ``dst`` (replacing any earlier one)."""
    if not isinstance(src, Medium) or not isinstance(dst, Medium):
        raise TypeError(f"register_path takes two Medium values, got {src!r} and {dst!r}")
    _PATHS[(src, dst)] = factory


def registered_paths() -> list[tuple[Medium, Medium]]:
    """The medium pairs that have a path."""
    importlib.import_module(_BUILTIN)
    return sorted(_PATHS, key=lambda pair: (pair[0].value, pair[1].value))


def _id_array(ids: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(ids)
    except Exception:  # noqa: BLE001 - any failure to read ids is bad input
        raise TypeError(f"{what} must be a sequence of ints, got {type(ids).__name__}") from None
    if arr.ndim != 1 or (arr.size and (arr.dtype.kind not in "iu" or arr.dtype == np.bool_)):
        if arr.size == 0 and arr.ndim == 1:
            return arr.astype(np.int64)
        raise TypeError(f"{what} must be a 1-D sequence of ints, got {ids!r:.80}")
    return arr.astype(np.int64, copy=False)


def checked_ids(src: Any, dst: Any, src_ids: Any, dst_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """``src_ids``/``dst_ids`` as int64 arrays, checked against the caches: equal lengths, in range, distinct
    destinations, same geometry and dtype. Raises TypeError / ValueError / IndexError naming the fault."""
    if src.geometry != dst.geometry:
        raise ValueError(f"caches differ in geometry: {src.geometry.describe_mismatch(dst.geometry)}")
    if src.dtype != dst.dtype:
        raise ValueError(f"caches differ in dtype: {src.dtype} vs {dst.dtype}")
    s, d = _id_array(src_ids, "src_ids"), _id_array(dst_ids, "dst_ids")
    if s.size != d.size:
        raise ValueError(f"src_ids and dst_ids differ in length: {s.size} vs {d.size}")
    for what, ids, n in (("src_ids", s, src.num_blocks), ("dst_ids", d, dst.num_blocks)):
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.size:
            raise IndexError(f"{what} holds {int(bad[0])}, out of range for a cache of {n} blocks [0, {n})")
    if d.size > 1 and np.unique(d).size != d.size:
        raise ValueError("dst_ids holds duplicates: two source blocks would be written into one destination block")
    return s, d


class Transfers:
    """Routes ``submit`` calls to the path of the caches' mediums and owns what the paths share.

    ``device`` is the GPU the GPU paths serve (default: the current one). ``disk_io`` is "auto" (GPUDirect
    Storage where the cuFile probe allows it, else POSIX), "gds" or "posix". ``disk_threads`` run the disk
    reads and writes; ``bounce_blocks`` sizes each pinned bounce chunk of the disk paths (blocks per chunk) and
    ``bounce_chunks`` how many chunks there are (disk batches through a bounce buffer in flight at once).
    """

    def __init__(self, *, device: Any = None, disk_io: str = "auto", disk_threads: int = 2,
                 bounce_blocks: int = 16, bounce_chunks: int = 5) -> None:
        if disk_io not in ("auto", "gds", "posix"):
            raise ValueError(f"disk_io must be 'auto', 'gds' or 'posix', got {disk_io!r}")
        for name, value in (("disk_threads", disk_threads), ("bounce_blocks", bounce_blocks),
                            ("bounce_chunks", bounce_chunks)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.device = device
        self.disk_io = disk_io
        self.bounce_blocks = bounce_blocks
        self.bounce_chunks = bounce_chunks
        self._disk_threads = disk_threads
        self._paths: dict[tuple[Medium, Medium], TransferPath] = {}
        self._shared: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[BlockTransfer] = weakref.WeakSet()
        self._pairs = IdentityMemo(limit=None)  # one entry per live cache pair (a model's layer-group views too)
        self._group_checks = IdentitySequenceMemo()  # `_checked_groups` per sequence of pairs
        self._closed = False

    def submit(self, src: Any, dst: Any, src_ids: Any, dst_ids: Any, *, tags: Sequence[int] | None = None
               ) -> BlockTransfer:
        """Copy blocks ``src_ids`` of ``src`` into blocks ``dst_ids`` of ``dst``, byte-exact, through the path of
        their mediums. Bad input raises before anything moves; failures after that are per block, in the
        returned handle. Ordered after the work queued so far on the caller's current CUDA stream.

        ``tags`` (one int per block, e.g. the blocks' sequence hashes) bind what a disk tier stores to what is
        read back: a slot written under one tag and read under another fails its block. Only paths to or from a
        disk take them."""
        path = self._path_of(src, dst)
        s, d = _id_array(src_ids, "src_ids"), _id_array(dst_ids, "dst_ids")
        if not id_check.ids_valid(s, d, src.num_blocks, dst.num_blocks):
            checked_ids(src, dst, s, d)  # raises the precise error
        if s.size == 0:
            return BlockTransfer.completed(0, path.name)
        transfer = path.submit(src, dst, s, d) if tags is None else path.submit(src, dst, s, d, tags=tags)
        self._live.add(transfer)
        return transfer

    def submit_groups(self, pairs: Sequence[tuple[Any, Any]], src_ids: Any, dst_ids: Any) -> list[BlockTransfer]:
        """``submit`` of blocks ``src_ids`` into ``dst_ids`` for each (src, dst) cache pair of ``pairs``, in order,
        one transfer each: the layer groups of a layer-wise load (`kvbm.layouts.select_layers` views of one source
        and one destination cache), each waited for on its own. Where the pairs share a path that moves such groups
        in one call (GPU <-> host), it gets them all. Bad input raises before anything moves."""
        paths, counts, group_path = self._checked_groups(pairs)
        s, d = _id_array(src_ids, "src_ids"), _id_array(dst_ids, "dst_ids")
        for src_blocks, dst_blocks in counts:  # (layer views share their cache's block counts: one check each)
            if not id_check.ids_valid(s, d, src_blocks, dst_blocks):
                src, dst = next(p for p in pairs if (p[0].num_blocks, p[1].num_blocks) == (src_blocks, dst_blocks))
                checked_ids(src, dst, s, d)  # raises the precise error
        if s.size == 0 or not paths:
            return [BlockTransfer.completed(0, path.name) for path in paths]
        if group_path is not None:
            transfers = group_path(pairs, s, d)
        else:
            transfers = [path.submit(src, dst, s, d) for path, (src, dst) in zip(paths, pairs)]
        self._live.update(transfers)
        return transfers

    def _checked_groups(self, pairs: Sequence[tuple[Any, Any]]
                        ) -> tuple[list[TransferPath], tuple[tuple[int, int], ...], Callable[..., Any] | None]:
        """The path of each pair of ``pairs``, the distinct (source, destination) block counts the ids must fit and
        the ``submit_groups`` of the one path they all share (None where they do not share one that has it), the
        pairs' checks done; kept per sequence of pairs while its caches live (a layer-wise load submits the same
        groups every step)."""
        if self._closed:
            raise ValueError("this Transfers object is closed")
        caches = [cache for pair in pairs for cache in pair]
        kept = self._group_checks.find(caches)
        if kept is None:
            paths = [self._path_of(src, dst) for src, dst in pairs]
            counts = tuple(dict.fromkeys((src.num_blocks, dst.num_blocks) for src, dst in pairs))
            shared = paths and all(path is paths[0] for path in paths)
            group_path = getattr(paths[0], "submit_groups", None) if shared else None
            kept = self._group_checks.keep(caches, (paths, counts, group_path))
        return kept

    def prepare(self, src: Any, dst: Any) -> None:
        """Check ``src`` -> ``dst`` and build what their path needs to move blocks between them (on the GPU <-> host
        path: the copy plans and compiled kernels), moving nothing, so that the first transfer does not pay for it.
        Bad pairs raise as `submit` does; paths with nothing to build do nothing more."""
        path = self._path_of(src, dst)
        prepare = getattr(path, "prepare", None)
        if prepare is not None:
            prepare(src, dst)

    def _path_of(self, src: Any, dst: Any) -> TransferPath:
        """The path of ``src`` -> ``dst``, the pair's checks done and kept while both caches live."""
        if self._closed:
            raise ValueError("this Transfers object is closed")
        key = (id(src), id(dst))
        path = self._pairs.find(key, src, dst)
        if path is None:
            checked_ids(src, dst, (), ())
            path = self._pairs.keep(key, self.path(medium_of(src), medium_of(dst)), src, dst)
        return path

    def path(self, src: Medium, dst: Medium) -> TransferPath:
        """The path object for ``src`` -> ``dst`` (built on first use); ValueError when none is registered."""
        key = (src, dst)
        path = self._paths.get(key)
        if path is None:
            importlib.import_module(_BUILTIN)
            factory = _PATHS.get(key)
            if factory is None:
                have = ", ".join(f"{a.value}->{b.value}" for a, b in registered_paths())
                raise ValueError(f"no transfer path from {src.value} to {dst.value} (paths: {have})")
            with self._lock:
                path = self._paths.get(key)
                if path is None:
                    path = self._paths[key] = factory(self)
        return path

    def shared(self, name: str, make: Callable[[], Any]) -> Any:
        """A resource the paths share (the GPU engine, bounce buffers), made on first use and closed with this
        object when it has a ``close`` method."""
        with self._lock:
            if name not in self._shared:
                self._shared[name] = make()
            return self._shared[name]

    def disk_executor(self) -> ThreadPoolExecutor:
        """The threads that run disk reads and writes (never the caller's thread)."""
        return self.shared("disk_executor",
                           lambda: ThreadPoolExecutor(self._disk_threads, thread_name_prefix="kvbm-disk"))

    def drain(self) -> None:
        """Wait for every transfer submitted and not yet finished."""
        for transfer in list(self._live):
            transfer.wait()

    def close(self) -> None:
        """Wait for transfers in flight, then close the paths and shared resources (idempotent)."""
        if self._closed:
            return
        self.drain()
        self._closed = True
        for path in self._paths.values():
            path.close()
        for name, resource in reversed(list(self._shared.items())):
            if name == "disk_executor":
                resource.shutdown(wait=True)
            elif hasattr(resource, "close"):
                resource.close()
        self._paths.clear()
        self._shared.clear()

    def __enter__(self) -> Transfers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
