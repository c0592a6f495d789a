"""A staged transfer enqueued in one compiled call: every chunk's driver calls made from numba.

Between transfers the host's caches are cold, and every Python step of an enqueue then cost several times its
hot-loop time: the first DMA of a 256-block offload started 0.3-0.6 ms after the call, 3-6% of the transfer
(measured on the H200 machine). Here one numba function does all of it: uploads the GPU block ids, launches each
chunk's gather or scatter (the compiled Triton kernel, through ``cuLaunchKernel``), orders the streams with events
and issues each chunk's batched DMA. The driver's entry points are ctypes functions, which numba calls in nopython
mode; `build(calls)` also takes stand-ins, so the enqueue logic is tested without a GPU. A chunk's pieces of one row
go in batched copies, those of several rows (a run of a layer view of the host cache, see `host_runs`) one 2-D copy
each (`copy_2d`).

A kernel is launched directly only when `launch_row` can vouch for its parameters (``cuFuncGetParamInfo``: the
seven arguments and at most two scratch pointers, no scratch memory, one CTA per program, no special launch); else
the engine takes its Python path.
"""
from __future__ import annotations

import ctypes
import enum
import functools
from typing import Any, Callable, NamedTuple

import numba
import numpy as np

from .batch_memcpy import MAX_PIECES_PER_CALL, batch_entry
from .copy_2d import DESCRIPTOR_FIELDS, DEVICE, HOST, copy_2d_entry, describe
from .cuda_runtime import CudaError, CudaUnavailableError, driver_error_name, driver_function
from .host_runs import Chunk, _schedule
from .stream_events import entry_points

_U64, _UINT = ctypes.c_uint64, ctypes.c_uint
SYNC = ctypes.CFUNCTYPE(ctypes.c_int, _U64)  # cuEventSynchronize(event)
HTOD = ctypes.CFUNCTYPE(ctypes.c_int, _U64, _U64, _U64, _U64)  # cuMemcpyHtoDAsync(dst, src, bytes, stream)
# cuLaunchKernel(function, grid x/y/z, block x/y/z, shared bytes, stream, kernelParams, extra)
LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, _U64, _UINT, _UINT, _UINT, _UINT, _UINT, _UINT, _UINT, _U64, _U64, _U64)
# cuMemcpyBatchAsync(dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, stream): the CUDA 13.0 ABI; the 12.8 one
# has a failIdx pointer before the stream
BATCH = ctypes.CFUNCTYPE(ctypes.c_int, _U64, _U64, _U64, _U64, _U64, _U64, _U64, _U64)
BATCH_WITH_FAIL_INDEX = ctypes.CFUNCTYPE(ctypes.c_int, _U64, _U64, _U64, _U64, _U64, _U64, _U64, _U64, _U64)
_PARAM_INFO = ctypes.CFUNCTYPE(ctypes.c_int, _U64, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                               ctypes.POINTER(ctypes.c_size_t))  # cuFuncGetParamInfo(function, index, offset, size)



class Launch(enum.IntEnum):
    """Columns of a launch row (one per staging slot): the compiled kernel and the cache pair's addresses."""

    FUNCTION = 0
    THREADS = 1
    SHARED = 2
    NUM_PARAMS = 3
    TILES_PER_PAIR = 4
    SRC_BASE = 5
    DST_BASE = 6
    SRC_OFFSETS = 7
    DST_OFFSETS = 8


class Pair(enum.IntEnum):
    """Columns of a pair row: the host cache's block addressing, the chunking, and constants of the batched copies."""

    HOST_BASE = 0
    HOST_STRIDE = 1
    BLOCK_BYTES = 2
    PER_CHUNK = 3
    STAGE_IDS = 4
    ATTRS = 5
    ATTRS_INDEX = 6
    MIN_PIECES_TO_SPLIT = 7


class Lane(enum.IntEnum):
    """Columns of a lane row: its streams, events and buffers."""

    KERNEL_STREAM = 0
    DMA_STREAM = 1
    SECOND_DMA_STREAM = 2
    READY = 3
    GATHERED = 4
    SECOND_LANDED = 5
    LANDED = 6
    STAGING = 7
    SLOT_BYTES = 8
    RING_DEVICE = 9
    RING_SLOT_BYTES = 10


#: Enqueue steps, named in the error of a failed driver call.
STEPS = ("cuEventRecord", "cuStreamWaitEvent", "cuEventSynchronize(id ring slot)", "cuMemcpyHtoDAsync(block ids)",
         "cuLaunchKernel(gather/scatter)", "cuMemcpyBatchAsync", "cuMemcpy2DAsync")
_RUNTIME_PARAMS = 7  # the kernel's arguments before its compile-time constants
_SCRATCH_PARAMS_MAX = 2  # pointers Triton appends (global and profile scratch); passed as null


class DriverCalls(NamedTuple):
    """The driver entry points the compiled enqueue calls, as ctypes functions of `stream_events.RECORD` /
    `stream_events.WAIT`, the prototypes above and `copy_2d.COPY_2D`."""

    record: Any
    wait: Any
    sync: Any
    htod: Any
    launch: Any
    batch: Any
    batch_has_fail_index: bool
    copy_2d: Any


@functools.lru_cache(maxsize=None)
def driver_calls() -> DriverCalls:
    """The driver's entry points (resolved once; event record and wait as `stream_events` has them, the batched
    copy's ABI as `batch_memcpy` chose it)."""
    found = [driver_function(name, 12000, proto) for name, proto in
             (("cuEventSynchronize", SYNC), ("cuMemcpyHtoDAsync", HTOD), ("cuLaunchKernel", LAUNCH))]
    if None in found:
        raise CudaUnavailableError("this CUDA driver lacks an entry point of the compiled enqueue")
    entry = batch_entry()
    address = ctypes.cast(entry.function, ctypes.c_void_p).value
    batch = (BATCH_WITH_FAIL_INDEX if entry.has_fail_index else BATCH)(address)
    return DriverCalls(*entry_points(), *found, batch, entry.has_fail_index, copy_2d_entry())


@functools.lru_cache(maxsize=None)
def _param_info() -> Any:
    return driver_function("cuFuncGetParamInfo", 12040, _PARAM_INFO)


def launch_row(kernel: Any, tiles_per_pair: int, pointers: tuple[int, int, int, int]) -> np.ndarray | None:
    """The launch row of a compiled Triton kernel (`triton.compiler.CompiledKernel`) for a cache pair whose four
    addresses (`triton_copy.launch_constants`) and tiles per block pair are given, or None when it cannot be launched
    directly: parameters other than the seven arguments (six pointers and an int32 tile count) and up to two scratch
    pointers, scratch memory, clusters, cooperative or programmatic-dependent launches, or no ``cuFuncGetParamInfo``."""
    meta = kernel.metadata
    special = (getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_cooperative_grid", False)
               or getattr(meta, "launch_pdl", False) or getattr(meta, "global_scratch_size", 0)
               or getattr(meta, "profile_scratch_size", 0))
    info = _param_info()
    if special or info is None:
        return None
    kernel.run  # noqa: B018 -- loads the module: `function` is set from then on
    sizes = []
    offset, size = ctypes.c_size_t(), ctypes.c_size_t()
    while len(sizes) <= _RUNTIME_PARAMS + _SCRATCH_PARAMS_MAX:
        if info(kernel.function, len(sizes), ctypes.byref(offset), ctypes.byref(size)) != 0:
            break  # past the last parameter
        sizes.append(size.value)
    expected = [8] * 6 + [4]
    if sizes[:_RUNTIME_PARAMS] != expected or any(s != 8 for s in sizes[_RUNTIME_PARAMS:]) or \
            len(sizes) > _RUNTIME_PARAMS + _SCRATCH_PARAMS_MAX:
        return None
    row = np.zeros(len(Launch), dtype=np.int64)
    row[Launch.FUNCTION] = kernel.function
    row[Launch.THREADS] = meta.num_warps * getattr(meta, "warp_size", 32)
    row[Launch.SHARED] = meta.shared
    row[Launch.NUM_PARAMS] = len(sizes)
    row[Launch.TILES_PER_PAIR] = tiles_per_pair
    row[[Launch.SRC_BASE, Launch.DST_BASE, Launch.SRC_OFFSETS, Launch.DST_OFFSETS]] = pointers
    return row


def build(calls: DriverCalls) -> Callable:
    """The compiled enqueue over `calls` (driver entry points, or stand-ins with the same prototypes):

    ``enqueue(d2h, gpu_ids, host_ids, caller, lane, slot_events, ring_events, ring_host, state, rows, pairs,
    group_events, max_ctas)`` enqueues staged transfers of validated int64 ids (at most a ring slot of them) after the
    work on stream `caller`: one per row of `pairs` (`Pair` columns), in order, each with its `Launch` row per staging
    slot in `rows` (row ``g * slots + k`` for transfer g and slot k) and, where ``group_events[g]`` is not 0, that
    event recorded once transfer g is done. Several rows are layer groups of one set of blocks (the same ids, each
    group's own host view and kernels: `TransferEngine.onboard_groups`): the ids are uploaded once and the caller's
    stream recorded once. `lane` is a row of `Lane` columns, `max_ctas` -1 for a full grid. Returns (0, -1), or
    (driver error code, index in `STEPS`) at the first failed call (nothing after it enqueued). `state` holds the
    lane's next staging slot and next id-ring slot, and is advanced. The chunks, their slots and DMA pieces are
    those of `host_runs.schedule`, which the Python enqueue executes too.
    """
    record, wait, sync, htod, launch_fn, batch_fn = calls[:6]
    copy_2d = calls.copy_2d
    if calls.batch_has_fail_index:
        @numba.njit(nogil=True)
        def batch_call(dsts, srcs, sizes, count, attrs, attrs_index, stream, fail):  # pragma: no cover (compiled)
            return batch_fn(dsts, srcs, sizes, count, attrs, attrs_index, 1, fail, stream)
    else:
        @numba.njit(nogil=True)
        def batch_call(dsts, srcs, sizes, count, attrs, attrs_index, stream, fail):  # pragma: no cover (compiled)
            return batch_fn(dsts, srcs, sizes, count, attrs, attrs_index, 1, stream)

    @numba.njit(nogil=True)
    def batch(dsts, srcs, sizes, first, count, attrs, attrs_index, stream, fail):  # pragma: no cover (compiled)
        """Pieces [first, first + count) in calls of at most MAX_PIECES_PER_CALL."""
        for start in range(first, first + count, MAX_PIECES_PER_CALL):
            n = min(MAX_PIECES_PER_CALL, first + count - start)
            code = batch_call(dsts.ctypes.data + 8 * start, srcs.ctypes.data + 8 * start,
                              sizes.ctypes.data + 8 * start, n, attrs, attrs_index, stream, fail)
            if code:
                return code
        return 0

    @numba.njit(nogil=True)
    def dma(lane, dsts, srcs, widths, rows, count, after, landed, attrs, attrs_index, min_split, fail, d2h, pair,
            desc):  # pragma: no cover (compiled)
        """The pieces once event `after` has happened; `landed` recorded on the first DMA stream once all have landed.
        Pieces of one row in batched copies, split over the two DMA streams from `min_split` of them on; each piece
        of several rows one 2-D copy, on the stream with fewer bytes queued so far. (error code, step)."""
        first, second = lane[Lane.DMA_STREAM], lane[Lane.SECOND_DMA_STREAM]
        multi = 0
        for i in range(count):
            multi += rows[i] > 1
        singles = count - multi
        one_d, one_s, one_w = dsts, srcs, widths
        if multi:  # the one-row pieces, compacted for the batched copies
            keep = rows[:count] == 1
            one_d, one_s, one_w = dsts[:count][keep], srcs[:count][keep], widths[:count][keep]
        half = (singles + 1) // 2 if singles >= min_split else singles
        two = half < singles or multi > 1
        code = wait(first, after, 0)
        if code == 0 and two:
            code = wait(second, after, 0)
        if code:
            return code, 1
        code = batch(one_d, one_s, one_w, 0, half, attrs, attrs_index, first, fail)
        if code:
            return code, 5
        if half < singles:
            code = batch(one_d, one_s, one_w, half, singles - half, attrs, attrs_index, second, fail)
            if code:
                return code, 5
        if multi:
            queued = np.zeros(2, np.uint64)
            queued[0], queued[1] = one_w[:half].sum(), one_w[half:singles].sum()
            host_pitch, stage_pitch = pair[Pair.HOST_STRIDE], pair[Pair.BLOCK_BYTES]
            for i in range(count):
                if rows[i] > 1:
                    k = 1 if two and queued[1] < queued[0] else 0
                    if d2h:
                        describe(desc, dsts[i], host_pitch, HOST, srcs[i], stage_pitch, DEVICE, widths[i],
                                 rows[i])
                    else:
                        describe(desc, dsts[i], stage_pitch, DEVICE, srcs[i], host_pitch, HOST, widths[i],
                                 rows[i])
                    code = copy_2d(desc.ctypes.data, second if k else first)
                    if code:
                        return code, 6
                    queued[k] += widths[i] * rows[i]
        if two:
            code = record(lane[Lane.SECOND_LANDED], second)
            if code:
                return code, 0
            code = wait(first, lane[Lane.SECOND_LANDED], 0)
            if code:
                return code, 1
        return record(landed, first), 0

    @numba.njit(nogil=True)
    def upload(lane, ids, ring_events, ring_host, state):  # pragma: no cover (compiled)
        """Copy the ids to the next ring slot's device memory on the kernel stream: (device address, code, step)."""
        k = state[1]
        state[1] = (k + 1) % ring_events.shape[0]
        code = sync(ring_events[k])  # the upload `ring slots` ago through this slot: finished in practice
        if code:
            return 0, code, 2
        n = ids.shape[0]
        ring_host[k, :n] = ids
        device = lane[Lane.RING_DEVICE] + k * lane[Lane.RING_SLOT_BYTES]
        code = htod(device, ring_host[k].ctypes.data, 8 * n, lane[Lane.KERNEL_STREAM])
        if code:
            return 0, code, 3
        code = record(ring_events[k], lane[Lane.KERNEL_STREAM])
        return device, code, 0

    @numba.njit(nogil=True)
    def launch(row, src_ids, dst_ids, n, max_ctas, stream, argv, params):  # pragma: no cover (compiled)
        """The copy of `n` block pairs with ids at device addresses `src_ids` / `dst_ids` (see `triton_copy`)."""
        total = n * row[Launch.TILES_PER_PAIR]
        grid = total if max_ctas < 0 else max(1, min(total, max_ctas))
        argv[:] = 0
        argv[0], argv[1] = row[Launch.SRC_BASE], row[Launch.DST_BASE]
        argv[2], argv[3] = row[Launch.SRC_OFFSETS], row[Launch.DST_OFFSETS]
        argv[4], argv[5], argv[6] = src_ids, dst_ids, total  # the int32 tile count: the low half of its slot
        for i in range(row[Launch.NUM_PARAMS]):
            params[i] = argv.ctypes.data + 8 * i
        return launch_fn(row[Launch.FUNCTION], grid, 1, 1, row[Launch.THREADS], 1, 1, row[Launch.SHARED], stream,
                         params.ctypes.data, 0)

    @numba.njit(nogil=True)
    def chunks(d2h, gpu_ids, host_ids, lane, slot_events, ring_events, ring_host, state, rows, pair, max_ctas,
               ids_device, scratch):  # pragma: no cover (compiled)
        """One transfer's chunks (its streams already ordered after the caller): (code, step, ids' device address,
        uploaded by the first chunk that needs them unless `ids_device` is given)."""
        argv, params, fail, desc = scratch
        kernel = lane[Lane.KERNEL_STREAM]
        stage_ids, attrs, attrs_index = pair[Pair.STAGE_IDS], pair[Pair.ATTRS], pair[Pair.ATTRS_INDEX]
        min_split = pair[Pair.MIN_PIECES_TO_SPLIT]
        table, hosts, stage, widths, rows_of = _schedule(
            host_ids, pair[Pair.PER_CHUNK], d2h, pair[Pair.HOST_BASE], pair[Pair.HOST_STRIDE], pair[Pair.BLOCK_BYTES],
            lane[Lane.STAGING], lane[Lane.SLOT_BYTES], state, slot_events.shape[0])
        fail_address = fail.ctypes.data
        for c in range(table.shape[0]):
            start, m, slot = table[c, Chunk.START], table[c, Chunk.COUNT], table[c, Chunk.SLOT]
            a, b = table[c, Chunk.FIRST_PIECE], table[c, Chunk.END_PIECE]
            done = slot_events[slot]  # the slot is free once the chunk that last used it recorded this
            if d2h:
                if ids_device == 0:
                    ids_device, code, step = upload(lane, gpu_ids, ring_events, ring_host, state)
                    if code:
                        return code, step, ids_device
                code = wait(kernel, done, 0)
                if code:
                    return code, 1, ids_device
                code = launch(rows[slot], ids_device + 8 * start, stage_ids, m, max_ctas, kernel, argv, params)
                if code:
                    return code, 4, ids_device
                code = record(lane[Lane.GATHERED], kernel)
                if code:
                    return code, 0, ids_device
                code, step = dma(lane, hosts[a:b], stage[a:b], widths[a:b], rows_of[a:b], b - a, lane[Lane.GATHERED],
                                 done, attrs, attrs_index, min_split, fail_address, True, pair, desc)
                if code:
                    return code, step, ids_device
            else:
                code, step = dma(lane, stage[a:b], hosts[a:b], widths[a:b], rows_of[a:b], b - a, done,
                                 lane[Lane.LANDED], attrs, attrs_index, min_split, fail_address, False, pair, desc)
                if code:
                    return code, step, ids_device
                if ids_device == 0:  # the first DMA is queued: now the ids its scatter needs
                    ids_device, code, step = upload(lane, gpu_ids, ring_events, ring_host, state)
                    if code:
                        return code, step, ids_device
                code = wait(kernel, lane[Lane.LANDED], 0)
                if code:
                    return code, 1, ids_device
                code = launch(rows[slot], stage_ids, ids_device + 8 * start, m, max_ctas, kernel, argv, params)
                if code:
                    return code, 4, ids_device
                code = record(done, kernel)
                if code:
                    return code, 0, ids_device
        return 0, -1, ids_device

    @numba.njit(nogil=True)
    def enqueue(d2h, gpu_ids, host_ids, caller, lane, slot_events, ring_events, ring_host, state, rows, pairs,
                group_events, max_ctas):  # pragma: no cover (compiled)
        kernel = lane[Lane.KERNEL_STREAM]
        code = record(lane[Lane.READY], caller)  # the caller's work on the GPU cache so far
        if code:
            return code, 0
        code = wait(kernel, lane[Lane.READY], 0)
        if code == 0 and not d2h:  # an offload's DMAs wait for its gathers instead
            code = wait(lane[Lane.DMA_STREAM], lane[Lane.READY], 0)
            if code == 0:
                code = wait(lane[Lane.SECOND_DMA_STREAM], lane[Lane.READY], 0)
        if code:
            return code, 1
        scratch = (np.empty(16, np.uint64), np.empty(16, np.uint64), np.zeros(1, np.uint64),
                   np.empty(DESCRIPTOR_FIELDS, np.uint64))
        slots = slot_events.shape[0]
        done_on = lane[Lane.DMA_STREAM] if d2h else kernel  # where a transfer's last operation is ordered
        ids_device = 0
        for g in range(pairs.shape[0]):  # the groups' transfers in order, the ids uploaded once
            code, step, ids_device = chunks(d2h, gpu_ids, host_ids, lane, slot_events, ring_events, ring_host, state,
                                            rows[g * slots:(g + 1) * slots], pairs[g], max_ctas, ids_device, scratch)
            if code:
                return code, step
            if group_events[g]:
                code = record(group_events[g], done_on)
                if code:
                    return code, 0
        return 0, -1

    return enqueue


_ARRAY, _MATRIX = numba.types.int64[::1], numba.types.int64[:, ::1]
#: The types `enqueue` is compiled for (ids and tables are C-contiguous int64 arrays, every scalar an int).
SIGNATURE = (numba.types.boolean, _ARRAY, _ARRAY, numba.types.int64, _ARRAY, _ARRAY, _ARRAY, _MATRIX, _ARRAY,
             _MATRIX, _MATRIX, _ARRAY, numba.types.int64)


@functools.lru_cache(maxsize=None)
def compiled() -> Callable:
    """The enqueue over this process's driver, compiled once per process for `SIGNATURE` (it calls the driver at
    addresses known only at run time, so numba cannot keep it in its on-disk cache)."""
    enqueue = build(driver_calls())
    enqueue.compile(SIGNATURE)
    return enqueue


def raise_failure(code: int, step: int) -> None:
    """Raise the `CudaError` of an enqueue that returned (code, step)."""
    raise CudaError(f"{STEPS[step]} (staged transfer enqueue)", code, driver_error_name(code))
