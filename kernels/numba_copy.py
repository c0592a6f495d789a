"""CPU backend: the same block copy as the Triton kernel, compiled by numba and run in parallel over pieces
(`serial_copier`: on one thread, for threads other than the caller's).

numba has no float16 or bfloat16, so it moves the integer units of the `CopyPlan` (same bytes). Each cache's
memory is seen as one flat array spanning its tensors' storages; only addresses inside the tensors are touched.
"""
from __future__ import annotations

import ctypes
from typing import Callable

import numba
import numpy as np
import torch

from kvbm.layouts import PagedKVCache

from .copy_plan import CopyPlan, build_plan

_NP_UNIT = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


@numba.njit(cache=True, nogil=True)
def _copy_piece(src, dst, so, do, d0, s0, t0, d1, s1, t1, d2, s2, t2):  # pragma: no cover
    for a in range(d0):
        for b in range(d1):
            sr = so + a * s0 + b * s1
            dr = do + a * t0 + b * t1
            if s2 == 1 and t2 == 1:
                dst[dr:dr + d2] = src[sr:sr + d2]
            else:
                for c in range(d2):
                    dst[dr + c * t2] = src[sr + c * s2]


@numba.njit(parallel=True, cache=True, nogil=True)
def _copy_pieces(src, dst, s_off, d_off, s_ids, d_ids, sb, db, d0, s0, t0, d1, s1, t1, d2, s2, t2):  # pragma: no cover
    num_pieces = s_off.shape[0]
    for i in numba.prange(s_ids.shape[0] * num_pieces):
        j = i // num_pieces
        p = i - j * num_pieces
        _copy_piece(src, dst, s_off[p] + s_ids[j] * sb, d_off[p] + d_ids[j] * db, d0, s0, t0, d1, s1, t1, d2, s2, t2)


@numba.njit(cache=True, nogil=True)
def _copy_pieces_serial(src, dst, s_off, d_off, s_ids, d_ids, sb, db, d0, s0, t0, d1, s1, t1, d2, s2,
                        t2):  # pragma: no cover
    for j in range(s_ids.shape[0]):
        for p in range(s_off.shape[0]):
            _copy_piece(src, dst, s_off[p] + s_ids[j] * sb, d_off[p] + d_ids[j] * db, d0, s0, t0, d1, s1, t1, d2,
                        s2, t2)


def _flat_memory(cache: PagedKVCache, base: torch.Tensor, unit: int) -> np.ndarray:
    """A numpy array of units from the cache's base address to the end of its last storage."""
    lo = base.data_ptr()
    hi = max(t.untyped_storage().data_ptr() + t.untyped_storage().nbytes() for t in cache.tensors)
    raw = (ctypes.c_uint8 * (hi - lo)).from_address(lo)
    return np.frombuffer(raw, dtype=np.uint8)[: (hi - lo) // unit * unit].view(_NP_UNIT[unit])


def _kernel_args(plan: CopyPlan, src: PagedKVCache, dst: PagedKVCache) -> tuple[tuple, tuple]:
    """The kernel's arguments before the ids (memories, piece offsets) and after them (strides, dims)."""
    (d0, s0, t0), (d1, s1, t1), (d2, s2, t2) = plan.dims
    head = (_flat_memory(src, plan.src_base, plan.unit), _flat_memory(dst, plan.dst_base, plan.unit),
            np.asarray(plan.src_offsets_host, dtype=np.int64), np.asarray(plan.dst_offsets_host, dtype=np.int64))
    return head, (plan.src_block_stride, plan.dst_block_stride, d0, s0, t0, d1, s1, t1, d2, s2, t2)


def run_plan(plan: CopyPlan, src: PagedKVCache, dst: PagedKVCache, src_ids: np.ndarray, dst_ids: np.ndarray) -> None:
    """Execute a plan on CPU memory for int64 id arrays."""
    head, tail = _kernel_args(plan, src, dst)
    _copy_pieces(*head, src_ids, dst_ids, *tail)


def serial_copier(src: PagedKVCache, dst: PagedKVCache) -> Callable[[np.ndarray, np.ndarray], None]:
    """A block copy ``src`` -> ``dst`` of two CPU caches, called with int64 id arrays the caller validated, that
    runs on the calling thread alone and without the GIL: several threads may call it at once, also while another
    thread runs a parallel copy (numba's workqueue threading layer aborts the process when two parallel regions
    run at once, so parallel copies stay on one thread)."""
    head, tail = _kernel_args(build_plan(src, dst), src, dst)

    def copy(src_ids: np.ndarray, dst_ids: np.ndarray) -> None:
        _copy_pieces_serial(*head, src_ids, dst_ids, *tail)

    return copy


def numba_copy(src: PagedKVCache, dst: PagedKVCache, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """Conversion backend for two CPU caches (ids already validated on the host)."""
    run_plan(build_plan(src, dst), src, dst, src_ids.numpy(), dst_ids.numpy())


def warm_up() -> None:
    """Compile (or load from numba's cache) the copies for every unit size, so a first transfer (whose time the
    cost rule learns from) does not pay for it."""
    ids = np.zeros(1, dtype=np.int64)
    for unit in _NP_UNIT.values():
        memory = np.zeros(2, dtype=unit)
        for kernel in (_copy_pieces, _copy_pieces_serial):
            kernel(memory, memory.copy(), ids, ids, ids, ids, 1, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1)
