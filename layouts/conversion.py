"""The conversion API: copy blocks `src_ids` of one paged cache into blocks `dst_ids` of another, any layouts.

This is also the transfer API: every tier is a paged cache with a layout, so moving blocks between tiers is one
call. Backends plug in behind `copy_blocks` through `register_backend`: this module ships the plain-torch
reference, which every other backend is tested against; `kvbm.kernels` registers the Triton (GPU) and numba (CPU)
kernels. Every input is validated before anything is written, so bad input raises and leaves the destination
untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .layout import LayoutError, PagedKVCache, ranges_overlap

#: Integer dtype of each element size: byte-exact copies move integers, whatever the cache's dtype.
INT_VIEW: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

BlockIds = Sequence[int] | np.ndarray | torch.Tensor
CopyFn = Callable[[PagedKVCache, PagedKVCache, torch.Tensor, torch.Tensor], None]
SupportsFn = Callable[[PagedKVCache, PagedKVCache, int], bool]


@dataclass(frozen=True)
class Backend:
    """A conversion backend: `copy` runs a validated transfer; `supports` says whether it can take one.

    `copy(src, dst, src_ids, dst_ids)` gets int64 CPU tensors of checked ids. "auto" picks the highest `priority`
    backend whose `prefer` (default: `supports`) accepts the transfer; `prefer` lets a backend that can run a
    transfer (the Triton interpreter on CPU, say) stay out of automatic choice.
    """

    name: str
    copy: CopyFn
    supports: SupportsFn
    priority: int = 0
    prefer: SupportsFn | None = None

    def preferred_for(self, src: PagedKVCache, dst: PagedKVCache, n: int) -> bool:
        """Whether automatic selection may pick this backend for the transfer."""
        return (self.prefer or self.supports)(src, dst, n)


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Make a backend available to `copy_blocks` by name and to automatic selection."""
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    """Names of the registered backends, highest priority first."""
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)]


def block_id_array(ids: BlockIds, what: str) -> np.ndarray:
    """Turn a list, numpy array or tensor of integer block ids into a 1-D int64 numpy array the caller owns (a copy
    of the input); TypeError for non-integers, ValueError for another shape."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{what} must be integers, got a tensor of dtype {ids.dtype}")
        arr = ids.detach().to("cpu", torch.int64).numpy()
    else:
        arr = np.asarray(ids)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":  # (not bool, float, object...; np.issubdtype costs 5 us on every transfer)
            raise TypeError(f"{what} must be integers, got {arr.dtype} values such as {arr.reshape(-1)[:3].tolist()}")
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {tuple(arr.shape)}")
    if arr.dtype == np.int64 and isinstance(ids, (list, tuple, range)):
        return arr  # np.asarray made a fresh array from the sequence: no second copy (this is on every transfer's path)
    return np.array(arr, dtype=np.int64)


def _device_pair_ok(a: torch.device, b: torch.device) -> bool:
    if a.type == "meta" or b.type == "meta":
        return False
    if a == b:
        return True
    return {a.type, b.type} == {"cpu", "cuda"}


def validate_transfer(
    src: PagedKVCache, dst: PagedKVCache, src_ids: BlockIds, dst_ids: BlockIds
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a transfer and return its ids as int64 CPU tensors; raise a clear error for any bad input."""
    s, d = check_transfer(src, dst, src_ids, dst_ids)
    return torch.from_numpy(s), torch.from_numpy(d)


def check_caches(src: PagedKVCache, dst: PagedKVCache) -> None:
    """The cache-level checks of `check_transfer`: two `PagedKVCache`s of one geometry and dtype, on the same device
    or on CPU and one CUDA device. Raises TypeError, LayoutError or ValueError."""
    for what, cache in (("src", src), ("dst", dst)):
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"{what} must be a PagedKVCache (see kvbm.layouts.describe), got {type(cache).__name__}")
    if src.geometry != dst.geometry:
        raise LayoutError(f"geometry mismatch between {src.name} and {dst.name}: "
                          f"{src.geometry.describe_mismatch(dst.geometry)}")
    if src.dtype != dst.dtype:
        raise LayoutError(f"dtype mismatch: src {src.name} is {src.dtype}, dst {dst.name} is {dst.dtype}")
    if not _device_pair_ok(src.device, dst.device):
        raise ValueError(f"cannot copy from device {src.device} to device {dst.device}: expected the same device, "
                         f"or CPU and one CUDA device")


def check_transfer(src: PagedKVCache, dst: PagedKVCache, src_ids: BlockIds, dst_ids: BlockIds
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`validate_transfer` returning int64 numpy arrays (what the transfer engine's host side works on)."""
    check_caches(src, dst)
    s = block_id_array(src_ids, "src_ids")
    d = block_id_array(dst_ids, "dst_ids")
    if s.size != d.size:
        raise ValueError(f"src_ids and dst_ids must have the same length, got {s.size} and {d.size}")
    if not d.size:
        return s, d
    d_sorted = np.sort(d)  # gives dst's range and its duplicates in two comparisons
    for what, ids, lo, hi, n in (("src_ids", s, s.min(), s.max(), src.num_blocks),
                                 ("dst_ids", d, d_sorted[0], d_sorted[-1], dst.num_blocks)):
        if lo < 0 or hi >= n:
            bad = int(ids[(ids < 0) | (ids >= n)][0])
            raise IndexError(f"{what} holds {bad}, out of range for a cache of {n} blocks [0, {n})")
    if d.size > 1 and (d_sorted[1:] == d_sorted[:-1]).any():
        raise ValueError("dst_ids holds duplicates: two source blocks would be written into one destination block")
    if _share_memory(src, dst):
        _check_reads_apart_from_writes(src, dst, s, d)
    return s, d


def _share_memory(a: PagedKVCache, b: PagedKVCache) -> bool:
    """Whether the storages behind two caches share a byte (the common case, two separate allocations, is no)."""
    if a.device != b.device:
        return False
    ra, rb = a.storage_ranges(), b.storage_ranges()
    return ranges_overlap(ra[:, 0], ra[:, 1], rb[:, 0], rb[:, 1]) is not None


def _check_reads_apart_from_writes(src: PagedKVCache, dst: PagedKVCache, s: np.ndarray, d: np.ndarray) -> None:
    """Raise ValueError if a byte that blocks `s` of `src` occupy is also a byte of blocks `d` of `dst`."""
    read = src.block_byte_ranges(s)
    write = dst.block_byte_ranges(d)
    hit = ranges_overlap(read[0], read[1], write[0], write[1])
    if hit is not None:
        i, j = int(read[2][hit[0]]), int(write[2][hit[1]])
        raise ValueError(f"src block {int(s[i])} ({src.name}) and dst block {int(d[j])} ({dst.name}) are the same "
                         f"memory: the copy would read what it writes")


def torch_reference_copy(src: PagedKVCache, dst: PagedKVCache, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """Plain-torch reference: per (layer, kv) piece, index_select the source blocks and index_copy them over."""
    itype = INT_VIEW.get(src.geometry.itemsize)
    if itype is None:
        raise LayoutError(f"unsupported element size {src.geometry.itemsize}; expected one of {sorted(INT_VIEW)}")
    g = src.geometry
    s_ids, d_ids = src_ids.to(src.device), dst_ids.to(dst.device)
    for layer in range(g.num_layers):
        for kv in range(g.num_kv):
            rows = src.piece_view(layer, kv, itype).index_select(0, s_ids)
            dst.piece_view(layer, kv, itype).index_copy_(0, d_ids, rows.to(dst.device))


register_backend(Backend("torch", torch_reference_copy, lambda src, dst, n: True, priority=0))


def copy_blocks(
    src: PagedKVCache,
    dst: PagedKVCache,
    src_ids: BlockIds,
    dst_ids: BlockIds,
    *,
    backend: str = "auto",
) -> None:
    """Copy blocks `src_ids` of `src` into blocks `dst_ids` of `dst`, byte-exact, permuting dimensions as needed.

    Both caches must have the same geometry and dtype. `backend` is "auto" (the highest-priority registered
    backend that supports the transfer) or a name from `available_backends()`. GPU backends enqueue on the
    current CUDA stream. Bad input raises before anything is written.
    """
    s, d = validate_transfer(src, dst, src_ids, dst_ids)
    if s.numel() == 0:
        return
    if backend == "auto":
        chosen = next(b for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)
                      if b.preferred_for(src, dst, s.numel()))
    elif backend in _BACKENDS:
        chosen = _BACKENDS[backend]
        if not chosen.supports(src, dst, s.numel()):
            raise ValueError(f"backend {backend!r} cannot copy {src.name} on {src.device} to {dst.name} on "
                             f"{dst.device}")
    else:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {available_backends()}")
    chosen.copy(src, dst, s, d)
