"""Copy-engine (DMA) helpers: many (dst, src, size) pieces on one CUDA stream, batched or one call per piece.

- :func:`memcpy_batch_async` enqueues all pieces with ``cuMemcpyBatchAsync`` (CUDA 12.8+): one driver call per up
  to :data:`MAX_PIECES_PER_CALL` pieces, source accessed in stream order unless asked otherwise. It is called
  through the driver entry point (``cudaGetDriverEntryPointByVersion``) with numpy ``uint64`` arrays, because
  cuda-python's own binding (``cudaMemcpyBatchAsync(dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, stream)``
  in cuda-bindings 13) accepts only Python lists/tuples for ``sizes`` and converts every element in Python: measured
  ~0.7 us per piece, i.e. ~46 ms of host time for the 65536 pieces of 1024 blocks of a 32-layer K/V cache, as long
  as the DMA itself.
  The ABI is chosen by the version asked for: 13.0 (no ``failIdx``) or, on 12.8/12.9 drivers, 12.8 (with one).
- :func:`memcpy_loop_async` issues one ``cudaMemcpyAsync`` per piece: the per-piece method of vLLM's
  ``swap_blocks``, kept as a baseline for the benchmarks.

Pointers are ints in the unified (UVA) address space: device memory, pinned host memory (see
:mod:`kvbm.kernels.host_memory`) or, more slowly, pageable host memory; the direction is inferred by the driver.
Nothing here synchronizes: record an event on ``stream`` to learn when the bytes have landed, and keep sources and
destinations alive until then.
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from .cuda_runtime import (
    CudaError, CudaUnavailableError, check, cuda_driver, cuda_rt, driver_error_name, driver_function,
    ensure_stream_context, require_cuda, stream_handle,
)

__all__ = ["MAX_PIECES_PER_CALL", "memcpy_batch_async", "memcpy_loop_async", "prepare_pieces"]

# Pieces per cuMemcpyBatchAsync call. CUDA documents no maximum; bounding the count bounds the per-call work and
# descriptor memory of the driver. Several calls on one stream are ordered, so results are identical.
MAX_PIECES_PER_CALL = 1 << 16

Direction = Literal["d2h", "h2d", "d2d", "h2h"]
SrcAccessOrder = Literal["stream", "any"]
_LEGACY_STREAM_HANDLES = (0, 1)  # NULL and cudaStreamLegacy: rejected by cuMemcpyBatchAsync
_UINT64_MAX = np.uint64(np.iinfo(np.uint64).max)
_ATTRS_INDEX = np.zeros(1, dtype=np.uint64)  # one attribute set, applying from piece 0 on
ATTRS_INDEX_ADDRESS = _ATTRS_INDEX.ctypes.data  # (the attrsIdxs argument of every batch)

# CUresult cuMemcpyBatchAsync(CUdeviceptr* dsts, CUdeviceptr* srcs, size_t* sizes, size_t count,
#                             CUmemcpyAttributes* attrs, size_t* attrsIdxs, size_t numAttrs, [size_t* failIdx,]
#                             CUstream hStream)   -- failIdx only in the CUDA 12.8 ABI, removed in 13.0.
_ARGS_13 = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_size_t, ctypes.c_void_p]
_PROTO_CUDA13 = ctypes.CFUNCTYPE(ctypes.c_int, *_ARGS_13)
_PROTO_CUDA12 = ctypes.CFUNCTYPE(ctypes.c_int, *_ARGS_13[:7], ctypes.c_void_p, ctypes.c_void_p)


class _BatchEntry(NamedTuple):
    """The driver's cuMemcpyBatchAsync as a ctypes function, and whether it takes the 12.8 ``failIdx`` argument."""

    function: Any
    has_fail_index: bool


def _as_u64(name: str, values: Sequence[int] | np.ndarray) -> np.ndarray:
    """``values`` as a contiguous uint64 array, rejecting non-integers, bools and negative numbers."""
    array = np.asarray(values)
    if array.dtype.kind in "fO" and not isinstance(values, np.ndarray):
        # numpy turns a list mixing ints >= 2**63 with smaller ones into float64 (or object past 2**64):
        # check the elements themselves, then convert exactly.
        for index, value in enumerate(values):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must hold ints, got {type(value).__name__} at index {index}")
            if not 0 <= int(value) < 1 << 64:
                raise ValueError(f"{name}[{index}] = {value} is not in [0, 2**64)")
        array = np.array(values, dtype=np.uint64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold ints, got dtype {array.dtype}")
    if array.dtype.kind == "i" and array.min() < 0:
        raise ValueError(f"{name} must be non-negative, got {int(array.min())} at index {int(array.argmin())}")
    return np.ascontiguousarray(array, dtype=np.uint64)


def _check_no_overlap(dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray) -> None:
    """Raise ValueError if two destination ranges overlap or a source range overlaps a destination range.

    Copies inside one batch run in no defined order, so either would give nondeterministic bytes.
    """
    order = np.argsort(dsts, kind="stable")  # stable = timsort: near linear for the usual sorted destinations
    starts = dsts[order]
    ends = starts + sizes[order]
    clash = np.flatnonzero(ends[:-1] > starts[1:])
    if clash.size:
        i, j = order[clash[0]], order[clash[0] + 1]
        raise ValueError(f"destinations of pieces {i} and {j} overlap ({int(dsts[i]):#x}+{int(sizes[i])} and "
                         f"{int(dsts[j]):#x}+{int(sizes[j])}); a batch has no order, so the result would be undefined")
    src_ends = srcs + sizes
    if src_ends.max() <= starts[0] or srcs.min() >= ends[-1]:
        return  # the usual case: sources and destinations in different allocations (device vs. host)
    # Destinations are now sorted and disjoint, so their ends are sorted too: the last destination that starts
    # before a source ends is the only one that can reach into that source.
    last = np.searchsorted(starts, src_ends, side="left") - 1
    hit = np.flatnonzero((last >= 0) & (ends[np.maximum(last, 0)] > srcs))
    if hit.size:
        i, j = int(hit[0]), int(order[last[hit[0]]])
        raise ValueError(f"source of piece {i} overlaps destination of piece {j}; a batch has no order, so the "
                         f"result would be undefined")


def prepare_pieces(
    dsts: Sequence[int] | np.ndarray,
    srcs: Sequence[int] | np.ndarray,
    sizes: Sequence[int] | np.ndarray,
    *,
    check_overlap: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate copy pieces and return them as contiguous uint64 arrays ``(dsts, srcs, sizes)``.

    Checks: equal lengths, integers, non-null pointers, positive sizes, no range past 2**64, and with
    ``check_overlap`` no destination overlapping another destination or a source (O(n log n)).
    """
    dst, src, size = _as_u64("dsts", dsts), _as_u64("srcs", srcs), _as_u64("sizes", sizes)
    if not dst.size == src.size == size.size:
        raise ValueError(f"dsts, srcs and sizes must have the same length, got {dst.size}, {src.size}, {size.size}")
    if dst.size == 0:
        return dst, src, size
    for name, array in (("dsts", dst), ("srcs", src), ("sizes", size)):
        if not array.all():
            first = int(np.flatnonzero(array == 0)[0])
            what = "a size of 0" if name == "sizes" else "a null pointer"
            raise ValueError(f"{name}[{first}] is {what}; every piece needs a pointer and a positive size")
    room = _UINT64_MAX - size
    for name, array in (("dsts", dst), ("srcs", src)):
        if (array > room).any():
            first = int(np.flatnonzero(array > room)[0])
            raise ValueError(f"{name}[{first}] + sizes[{first}] runs past the end of the address space")
    if check_overlap:
        _check_no_overlap(dst, src, size)
    return dst, src, size


@functools.lru_cache(maxsize=None)
def batch_entry() -> _BatchEntry:
    """Resolve the driver's cuMemcpyBatchAsync once: the CUDA 13.0 ABI if the driver has it, else the 12.8 one."""
    require_cuda("memcpy_batch_async")
    for version, proto, has_fail_index in ((13000, _PROTO_CUDA13, False), (12080, _PROTO_CUDA12, True)):
        # A version newer than the driver is not found: then try the older ABI.
        function = driver_function("cuMemcpyBatchAsync", version, proto)
        if function is not None:
            return _BatchEntry(function, has_fail_index)
    driver_version = check(cuda_rt.cudaDriverGetVersion(), "cudaDriverGetVersion()")
    raise CudaUnavailableError(
        f"cuMemcpyBatchAsync needs a CUDA 12.8 or newer driver; this driver supports CUDA {driver_version // 1000}."
        f"{driver_version % 1000 // 10}"
    )


@functools.lru_cache(maxsize=None)  # few keys (direction x device x flags); entries must stay alive
def _attributes(direction: Direction | None, device: int, prefer_overlap: bool,
                src_access_order: SrcAccessOrder = "stream") -> Any:
    """The (cached, kept alive) CUmemcpyAttributes for a batch: source access order, location hints, flags."""
    attrs = cuda_driver.CUmemcpyAttributes()
    orders = cuda_driver.CUmemcpySrcAccessOrder
    attrs.srcAccessOrder = (orders.CU_MEMCPY_SRC_ACCESS_ORDER_ANY if src_access_order == "any"
                            else orders.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM)
    if direction is not None:
        kinds = {"d": cuda_driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE,
                 "h": cuda_driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST}
        attrs.srcLocHint.type, attrs.dstLocHint.type = kinds[direction[0]], kinds[direction[2]]
        attrs.srcLocHint.id = device if direction[0] == "d" else 0
        attrs.dstLocHint.id = device if direction[2] == "d" else 0
    if prefer_overlap:
        attrs.flags = cuda_driver.CUmemcpyFlags.CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE
    return attrs


def memcpy_batch_async(
    dsts: Sequence[int] | np.ndarray,
    srcs: Sequence[int] | np.ndarray,
    sizes: Sequence[int] | np.ndarray,
    stream: Any,
    *,
    direction: Direction | None = None,
    prefer_overlap_with_compute: bool = False,
    check_overlap: bool = True,
    src_access_order: SrcAccessOrder = "stream",
) -> None:
    """Enqueue ``sizes[i]`` bytes from ``srcs[i]`` to ``dsts[i]`` for every i with batched DMA on ``stream``.

    Args:
        dsts, srcs, sizes: pointers (ints, UVA) and byte counts, as sequences or integer numpy arrays.
        stream: a ``torch.cuda.Stream`` or raw handle; not the legacy default stream (CUDA refuses it).
        direction: optional location hint ('d2h', 'h2d', 'd2d', 'h2h'); CUDA uses it only for managed or pageable
            memory and ignores it for device and pinned memory.
        prefer_overlap_with_compute: ask the driver to prefer overlapping these copies with kernels (a hint).
        check_overlap: verify that no destination overlaps another piece's destination or source (pieces of one
            batch run in no order). Costs O(n log n) host time; turn off only for pieces built from disjoint layouts.
        src_access_order: ``"stream"`` (the default, ``CU_MEMCPY_SRC_ACCESS_ORDER_STREAM``): the source is read in
            stream order, so prior work on ``stream`` (e.g. a gather kernel) is seen. ``"any"``
            (``CU_MEMCPY_SRC_ACCESS_ORDER_ANY``): the driver may read the source out of stream order, before earlier
            work on ``stream`` and even after this call returns; only for sources nothing writes until the copy is
            done (e.g. host pages being loaded), where it lets the driver start reading early.

    Raises ValueError/TypeError on bad pieces (before anything is enqueued),
    :class:`CudaUnavailableError` without a GPU or CUDA 12.8+ driver, :class:`CudaError` if the driver refuses
    a call (earlier chunks of a very large batch may already be enqueued then).
    """
    if direction is not None and direction not in ("d2h", "h2d", "d2d", "h2h"):
        raise ValueError(f"direction must be one of 'd2h', 'h2d', 'd2d', 'h2h' or None, got {direction!r}")
    if src_access_order not in ("stream", "any"):
        raise ValueError(f"src_access_order must be 'stream' or 'any', got {src_access_order!r}")
    dst, src, size = prepare_pieces(dsts, srcs, sizes, check_overlap=check_overlap)
    handle = stream_handle(stream)
    if handle in _LEGACY_STREAM_HANDLES:
        raise ValueError(
            f"cuMemcpyBatchAsync cannot run on the legacy default stream (handle {handle}); pass a torch.cuda.Stream()"
        )
    if dst.size == 0:
        return
    entry = batch_entry()
    ensure_stream_context(handle)
    device = 0
    if direction is not None and "d" in direction:
        device = check(cuda_rt.cudaStreamGetDevice(handle), f"cudaStreamGetDevice({handle:#x})")
    attrs = attributes_address(direction, int(device), bool(prefer_overlap_with_compute), src_access_order)
    _enqueue(entry, dst, src, size, attrs, handle)


def memcpy_batch_unchecked(dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream_handle: int, *,
                           direction: Direction | None, device: int,
                           src_access_order: SrcAccessOrder = "stream") -> None:
    """:func:`memcpy_batch_async` without its checks, for hot paths (the transfer engine's).

    Only for pieces built by the caller from validated layouts and ids: contiguous uint64 arrays of one length,
    no overlaps, a raw stream handle of ``device``, called on a thread whose CUDA context is current (any CUDA
    runtime call on the thread makes it so). Saves the per-call validation, which costs more host time than the
    copy of a few blocks takes on the GPU. ``direction`` and ``src_access_order`` as in :func:`memcpy_batch_async`.
    """
    if dsts.size:
        attrs = attributes_address(direction, device, False, src_access_order)
        _enqueue(batch_entry(), dsts, srcs, sizes, attrs, stream_handle)


@functools.lru_cache(maxsize=None)  # few keys (direction x device x flags); entries must stay alive
def attributes_address(direction: Direction | None, device: int, prefer_overlap: bool = False,
                       src_access_order: SrcAccessOrder = "stream") -> int:
    """The address of the (cached, kept alive) attributes of `_attributes`: looked up once, not per call."""
    return int(_attributes(direction, device, prefer_overlap, src_access_order).getPtr())


def _address(array: np.ndarray) -> int:
    """The address of a contiguous array's first element (half the host time of ``array.ctypes.data``)."""
    return array.__array_interface__["data"][0]


def _enqueue(entry: _BatchEntry, dst: np.ndarray, src: np.ndarray, size: np.ndarray, attrs_address: int,
             handle: int) -> None:
    """Issue cuMemcpyBatchAsync over checked uint64 arrays, in calls of at most MAX_PIECES_PER_CALL pieces."""
    addresses = _address(dst), _address(src), _address(size)
    fail_index = ctypes.c_size_t(0)
    for start in range(0, dst.size, MAX_PIECES_PER_CALL):
        stop = min(start + MAX_PIECES_PER_CALL, dst.size)
        args = [a + 8 * start for a in addresses] + [stop - start, attrs_address, ATTRS_INDEX_ADDRESS, 1]
        if entry.has_fail_index:
            args.append(ctypes.addressof(fail_index))
        code = entry.function(*args, handle)
        if code != 0:
            where = f", failing piece {start + fail_index.value}" if entry.has_fail_index else ""
            raise CudaError(f"cuMemcpyBatchAsync(pieces {start}..{stop - 1} of {dst.size}{where})", code,
                            driver_error_name(code))


def memcpy_loop_async(
    dsts: Sequence[int] | np.ndarray,
    srcs: Sequence[int] | np.ndarray,
    sizes: Sequence[int] | np.ndarray,
    stream: Any,
) -> None:
    """Enqueue one ``cudaMemcpyAsync`` per piece on ``stream``, in order (the per-piece baseline).

    Same pieces and validation as :func:`memcpy_batch_async` (overlaps are allowed: the copies are ordered).
    Any stream, including the legacy default one (handle 0), is accepted.
    """
    dst, src, size = prepare_pieces(dsts, srcs, sizes, check_overlap=False)
    handle = stream_handle(stream)
    if dst.size == 0:
        return
    require_cuda("memcpy_loop_async")
    kind = cuda_rt.cudaMemcpyKind.cudaMemcpyDefault
    copy = cuda_rt.cudaMemcpyAsync
    for index, (d, s, n) in enumerate(zip(dst.tolist(), src.tolist(), size.tolist())):
        result = copy(d, s, n, kind, handle)
        if int(result[0]) != 0:
            check(result, f"cudaMemcpyAsync(piece {index} of {dst.size}: {n} bytes {s:#x} -> {d:#x})")
