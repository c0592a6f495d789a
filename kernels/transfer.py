"""Device <-> host transfer paths between an engine's GPU cache and a pinned host cache (block-major).

Three paths, each enqueued on the engine's own transfer streams and signalled by a CUDA event (the caller's stream
is never blocked):

- "staged": gather the blocks into a bounded device staging buffer with the Triton kernel, then one DMA piece per
  run of consecutive host blocks (one 2-D copy per run of a layer view), the pieces of a chunk of many split
  between two DMA streams (`MIN_PIECES_TO_SPLIT`);
  pipelined in chunks over staging slots so the gather of chunk i+1 overlaps the DMA of chunk i (H2D: DMA into
  staging, then scatter). The SM part is a short full-speed burst; PCIe is crossed by the copy engine. The default.
- "zero_copy": the kernel reads or writes pinned host memory directly over UVA. Lowest latency for small
  transfers on an idle GPU, but it holds SMs for the whole PCIe transfer: never the default beside a model.
- "dma": `cudaMemcpyBatchAsync` over the pieces that are dense in both caches (whole blocks when both caches keep a
  block in one dense run, as cross-layer layouts do; no SM time at all), split between the two DMA streams in the
  same way.

"auto" takes "dma" when every block is one dense run of at least `DMA_MIN_PIECE_BYTES` in both caches, else
"staged". A staged transfer is enqueued by one compiled call (`staged_enqueue`) when its kernels can be launched
directly, else in Python (`_staged`). Measured on the H200 (bench/results/): staged moves 97-99% of the PCIe ceiling
at 16 blocks (back-to-back transfers), 97-100% at 256 and 98-100% at 1024 (single transfers, start-up included);
batched DMA of the engines' small pieces far less.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from kvbm.layouts import PagedKVCache, block_major
from kvbm.layouts.conversion import block_id_array, check_caches, check_transfer

from . import host_memory, host_runs, id_check, staged_enqueue, stream_events as events
from .batch_memcpy import ATTRS_INDEX_ADDRESS, attributes_address, memcpy_batch_unchecked
from .copy_2d import DEVICE, HOST, memcpy_2d_async
from .copy_plan import CopyPlan, IdentityMemo, IdentitySequenceMemo, build_plan, memo_on
from .cuda_runtime import CudaUnavailableError, check, cuda_rt
from .device_pointer import DevicePointer
from .host_runs import Chunk, chunk_starts  # noqa: F401 (chunk_starts: re-exported)

Path = Literal["auto", "staged", "zero_copy", "dma"]
PATHS: tuple[str, ...] = ("auto", "staged", "zero_copy", "dma")
#: Smallest dense run "auto" hands to batched DMA (batched DMA of small pieces falls far below the ceiling).
DMA_MIN_PIECE_BYTES = 1 << 20
#: Default device staging size, split into two halves for the pipeline.
DEFAULT_STAGING_BYTES = 256 << 20
#: Fewest DMA pieces a chunk must have to be split over the lane's two DMA streams. Below it one stream moves small
#: pieces faster: on the H100, 16 scattered 128 KiB pieces per transfer, queued behind a GPU sleep, moved at 93.2%
#: (H2D) / 94.7% (D2H) of one large copy on one stream against 87.4 / 90.4% split over two (`bench/dma_streams.py`),
#: and in the piece sweep (two runs of each setting, alternating) bursts of 16-block transfers of 2 KiB pieces moved
#: 92.6 / 92.7% H2D and 75.0 / 94.8% D2H staged with this threshold, 92.6 / 92.8% and 95.0 / 94.1% never split,
#: against 86.4 / 60.5% and 89.7 / 59.9% split from 16 pieces (`bench/results/pieces_split_h100_b.log`); 256-block
#: transfers of 2 KiB pieces (chunks of 256 pieces) moved 93.7-94.9% H2D split against 93.2-93.4% on one stream.
#: A split also costs a second batched call and two event operations on the host.
MIN_PIECES_TO_SPLIT = 64
#: Slots of a lane's id ring (uploads whose kernels may still be queued) and ids per slot. The ids are copied to the
#: device: read by the kernels straight from pinned host memory instead, they made the gather 2-3x slower (measured
#: on the H200: 8 blocks 13 -> 41 us, 64 blocks 74 -> 154 us).
ID_RING_SLOTS, ID_RING_SLOT_IDS = 16, 16384
_NO_GROUP_EVENT = np.zeros(1, dtype=np.int64)  # a single transfer's enqueue records no event: its caller does
_HOST_TO_DEVICE = cuda_rt.cudaMemcpyKind.cudaMemcpyHostToDevice if cuda_rt is not None else None  # looked up once


@dataclass
class TransferHandle:
    """Completion of one enqueued transfer: `done()` polls its CUDA event without blocking; `wait()` blocks.

    `num_blocks` blocks were moved by `path`. `error` is set when enqueueing failed part-way (nothing after the
    failure was enqueued and the transfer counts as failed for every block).
    """

    path: str
    num_blocks: int
    nbytes: int
    event: torch.cuda.Event | None = None
    error: BaseException | None = None

    def done(self) -> bool:
        """True once the transfer has finished (successfully or not); never blocks."""
        return self.error is not None or self.event is None or self.event.query()

    def wait(self) -> None:
        """Block the calling thread until the transfer finishes; raise if it failed."""
        if self.event is not None and self.error is None:
            self.event.synchronize()
        if self.error is not None:
            raise self.error

    @property
    def ok(self) -> bool:
        """Whether the finished transfer succeeded (only meaningful once `done()`)."""
        return self.error is None


@dataclass(frozen=True)
class TransferSpec:
    """One transfer for `TransferEngine.submit`: an offload ("d2h": `src` is the GPU cache, `dst` a pinned host
    cache) or an onboard ("h2d": the reverse), with the arguments of `offload` / `onboard`."""

    direction: Literal["d2h", "h2d"]
    src: PagedKVCache
    dst: PagedKVCache
    src_ids: Any
    dst_ids: Any
    path: Path = "auto"
    options: Mapping[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def _triton_copy():
    """The Triton kernel module, imported on first use (importing Triton is slow; the CPU-only paths never need it)."""
    from . import triton_copy

    return triton_copy


def _whole_block_dense(plan: CopyPlan, block_bytes: int) -> bool:
    """Every block is one dense run of bytes in both caches: pieces back to back, in the same order (kept on the
    plan, whose caches share one block size: "auto" asks on every transfer)."""
    return plan.memo("whole_block_dense", lambda p: _check_whole_block_dense(p, block_bytes))


def _check_whole_block_dense(plan: CopyPlan, block_bytes: int) -> bool:
    piece_units = plan.rows * plan.row_len
    if plan.rows != 1 or plan.dims[2][1] != 1 or plan.dims[2][2] != 1:
        return False
    for o in (plan.src_offsets_host, plan.dst_offsets_host):
        if any(o[i] - o[0] != i * piece_units for i in range(len(o))):
            return False
    return piece_units * plan.unit * plan.num_pieces == block_bytes


def choose_path(src: PagedKVCache, dst: PagedKVCache) -> str:
    """The "auto" rule: DMA when whole blocks are dense runs of >= DMA_MIN_PIECE_BYTES in both caches, else staged."""
    dense = _whole_block_dense(build_plan(src, dst), src.geometry.block_bytes)
    return "dma" if dense and src.geometry.block_bytes >= DMA_MIN_PIECE_BYTES else "staged"


class _PinnedIdRing:
    """Pinned host slots and device slots for uploading block ids without allocating memory per transfer.

    Host slot k is rewritten only once the upload that last used it has finished (its event), so ids are never
    overwritten in flight. Device slot k is written and read on one stream (the lane's kernel stream), so stream
    order keeps an upload from overwriting ids a queued kernel still reads. Longer id lists get tensors of their own.
    """

    def __init__(self, device: torch.device, stream: torch.cuda.Stream, slots: int, slot_ids: int,
                 state: np.ndarray):
        self.host = torch.empty(slots, slot_ids, dtype=torch.int64).pin_memory()
        self.dev = torch.empty(slots, slot_ids, dtype=torch.int64, device=device)
        self.host_array = self.host.numpy()
        self.host_address, self.dev_address = self.host.data_ptr(), self.dev.data_ptr()
        self.slot_bytes = 8 * slot_ids
        # re-recorded by each upload through the slot (recorded once here: a finished event before first use)
        self.events = [torch.cuda.Event() for _ in range(slots)]
        self.event_handles = np.array([events.handle(e, stream) for e in self.events], dtype=np.int64)
        self.state = state  # state[1]: the next slot (shared with the compiled enqueue, which uploads too)
        self.large: torch.Tensor | None = None  # the last over-long id list, kept until the next one replaces it

    def upload(self, ids: np.ndarray, stream: torch.cuda.Stream) -> DevicePointer:
        """Copy int64 ids to the device on `stream` (one raw async memcpy); returns their device address."""
        n = ids.size
        if n > self.host.shape[1]:
            with torch.cuda.stream(stream):  # freed only after later work on this stream: stream order keeps it safe
                self.large = torch.from_numpy(ids).pin_memory().to(self.dev.device, non_blocking=True)
            return DevicePointer(self.large.data_ptr(), torch.int64)
        k = int(self.state[1])
        self.state[1] = (k + 1) % self.host.shape[0]
        self.events[k].synchronize()  # issued `slots` uploads ago: finished in practice
        self.host_array[k, :n] = ids
        handle = stream.cuda_stream
        check(cuda_rt.cudaMemcpyAsync(self.dev_address + k * self.slot_bytes, self.host_address + k * self.slot_bytes,
                                      8 * n, _HOST_TO_DEVICE, handle), "cudaMemcpyAsync(block ids)")
        events.record(int(self.event_handles[k]), handle)
        return DevicePointer(self.dev_address + k * self.slot_bytes, torch.int64)


class _Lane:
    """One direction's streams and device staging split into `slots` equal slots, so offload and onboard run at once
    and a chunk's gather or scatter overlaps the other slots' DMAs.

    `kernel_priority` is the CUDA stream priority of the gather/scatter kernels (-1 high, 0 normal). The lane's
    events are recorded anew by every transfer: a stream wait takes an event's latest record when it is enqueued, so
    one event per role (and per slot) serves all transfers, without creating events on the hot path. They are
    recorded and waited on through their raw handles (`stream_events`), each recorded once here so that it exists.
    """

    def __init__(self, device: torch.device, staging_bytes: int, kernel_priority: int = -1, slots: int = 2):
        self.kernel_stream = torch.cuda.Stream(device, priority=kernel_priority)
        # A chunk of many DMA pieces is split between two streams (`MIN_PIECES_TO_SPLIT`): with one, the copy engine
        # idles between pieces (measured on the H200, 256 random 2 MiB pieces against one large copy: 95.9-98.3% on
        # one stream, 97.4-99.0% on two).
        self.dma_streams = (torch.cuda.Stream(device, priority=-1), torch.cuda.Stream(device, priority=-1))
        self.kernel_handle = self.kernel_stream.cuda_stream
        self.dma_handles = tuple(s.cuda_stream for s in self.dma_streams)
        # state[0]: the next staging slot (slots rotate across chunks and transfers, so back-to-back transfers
        # overlap); state[1]: the id ring's next slot. Shared by the Python and the compiled enqueue.
        self.state = np.zeros(2, dtype=np.int64)
        self.ids = _PinnedIdRing(device, self.kernel_stream, ID_RING_SLOTS, ID_RING_SLOT_IDS, self.state)
        self.slot_bytes = staging_bytes // slots
        self.staging = torch.empty(self.slot_bytes * slots, dtype=torch.uint8, device=device)
        self.staging_address = self.staging.data_ptr()
        # slot_done[k]: the last chunk through slot k is finished with it (a slot is free until first used)
        self._events = [torch.cuda.Event() for _ in range(4 + slots)]  # owned here; used by their handles below
        handles = [events.handle(e, self.kernel_stream) for e in self._events]
        self.ready, self.gathered, self.second_landed, self.landed = handles[:4]
        self.slot_done = np.array(handles[4:], dtype=np.int64)
        L = staged_enqueue.Lane
        self.row = np.zeros(len(L), dtype=np.int64)  # the lane for the compiled enqueue
        self.row[[L.KERNEL_STREAM, L.DMA_STREAM, L.SECOND_DMA_STREAM]] = (self.kernel_handle, *self.dma_handles)
        self.row[[L.READY, L.GATHERED, L.SECOND_LANDED, L.LANDED]] = handles[:4]
        self.row[[L.STAGING, L.SLOT_BYTES, L.RING_DEVICE, L.RING_SLOT_BYTES]] = (
            self.staging_address, self.slot_bytes, self.ids.dev_address, self.ids.slot_bytes)
        # Staging caches by host layout and slot, and the compiled enqueue's tables by cache pair with the copy plans
        # whose device tables the rows point to: one entry per live layout or pair (a model's layer-group views among
        # them: 54 per host tier at 80 layers), and kept as long as those live. A memo that started afresh would drop
        # plans whose tables kernels queued earlier, or other groups of the same load, still read.
        self._caches = IdentityMemo(limit=None)
        self._compiled_pairs = IdentityMemo(limit=None)
        self._stage_ids = [torch.empty(0, dtype=torch.int64, device=device)]  # all kept: pair rows hold addresses

    def stage_ids(self, n: int) -> DevicePointer:
        """Device address of the int64 ids 0..n-1 (staging block ids), made on the kernel stream and kept."""
        if self._stage_ids[-1].numel() < n:
            with torch.cuda.stream(self.kernel_stream):
                self._stage_ids.append(torch.arange(n, dtype=torch.int64, device=self.staging.device))
        return DevicePointer(self._stage_ids[-1].data_ptr(), torch.int64)

    def compiled_pair(self, gpu: PagedKVCache, host: PagedKVCache, d2h: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """(launch row per staging slot, pair row as a 1-row matrix) of the compiled enqueue of staged transfers
        between `gpu` and `host` in this lane's direction (kernels compiled now if needed), or None when it cannot run
        them: a kernel that cannot be launched directly (see `staged_enqueue.launch_row`), or chunks of 2**31 tiles
        or more.

        Kept per cache pair while both caches live (`IdentityMemo`), with the plans whose addresses the rows hold."""
        key = (id(gpu), id(host))
        entry = self._compiled_pairs.find(key, gpu, gpu.layout, host, host.layout)
        if entry is not None:
            return entry[0]
        compiled_kernel, launch_constants = _triton_copy().compiled_kernel, _triton_copy().launch_constants
        bb = gpu.geometry.block_bytes
        per_chunk = self.slot_bytes // bb
        rows, plans = [], []
        for slot in range(len(self.slot_done) if per_chunk else 0):
            staging = self.staging_cache(host, slot)
            plan = build_plan(gpu, staging) if d2h else build_plan(staging, gpu)
            plans.append(plan)
            kernel = compiled_kernel(plan, self.kernel_stream)
            row = None if kernel is None else staged_enqueue.launch_row(kernel, *launch_constants(plan))
            if row is None or per_chunk * int(row[staged_enqueue.Launch.TILES_PER_PAIR]) >= 1 << 31:
                break
            rows.append(row)
        found = None
        if per_chunk and len(rows) == len(self.slot_done):
            P = staged_enqueue.Pair
            pair = np.zeros(len(P), dtype=np.int64)
            pair[P.HOST_BASE] = host.first_piece_address()
            pair[P.HOST_STRIDE] = host.layout.stride["block"] * gpu.geometry.itemsize
            pair[P.BLOCK_BYTES] = bb
            pair[P.PER_CHUNK] = per_chunk
            pair[P.STAGE_IDS] = self.stage_ids(per_chunk).data_ptr()
            pair[P.ATTRS] = attributes_address("d2h" if d2h else "h2d", self.staging.device.index)
            pair[P.ATTRS_INDEX] = ATTRS_INDEX_ADDRESS
            pair[P.MIN_PIECES_TO_SPLIT] = MIN_PIECES_TO_SPLIT
            found = np.stack(rows), pair[None, :]
        self._compiled_pairs.keep(key, (found, plans), gpu, gpu.layout, host, host.layout)
        return found

    def staging_cache(self, host: PagedKVCache, slot: int) -> PagedKVCache:
        """A block-major device cache filling one staging slot, in the host cache's inner order (kept while the host
        layout lives, so the copy plans built for it are reused whatever the chunk size)."""
        key = (id(host.layout), slot)
        staging = self._caches.find(key, host.layout)
        if staging is None:
            staging = self._caches.keep(
                key, self._make_staging(host, slot, self.slot_bytes // host.geometry.block_bytes), host.layout)
        return staging

    def _make_staging(self, host: PagedKVCache, slot: int, num_blocks: int) -> PagedKVCache:
        order = _inner_order(host)
        g = host.geometry
        sizes = {"layer": g.num_layers, "kv": g.num_kv, "token": g.block_size, "head": g.num_heads,
                 "channel": g.head_dim}
        start = slot * self.slot_bytes
        buf = self.staging[start: start + num_blocks * g.block_bytes].view(host.dtype)
        return block_major(buf.view(num_blocks, *[sizes[n] for n in order]), order)


class TransferEngine:
    """Moves blocks between one GPU cache and pinned host caches, on its own high-priority streams.

    `host` caches must be block-major (`kvbm.layouts.block_major`) in pinned CPU memory; the device staging buffer
    takes the host cache's inner order so its blocks are byte-identical to the host's and one DMA moves a run of
    them. `staging_bytes` bounds the device memory used per direction, split into `staging_slots` slots (a chunk
    of a transfer fills one slot; measured on the H200 with the default of two).
    """

    def __init__(self, device: torch.device | str | int = "cuda", staging_bytes: int = DEFAULT_STAGING_BYTES,
                 kernel_priority: int = -1, staging_slots: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("TransferEngine needs a CUDA GPU; without one, copy_blocks runs on the CPU backend")
        if staging_bytes <= 0:
            raise ValueError(f"staging_bytes must be positive, got {staging_bytes}")
        if isinstance(staging_slots, bool) or not isinstance(staging_slots, int) or staging_slots < 2:
            raise ValueError(f"staging_slots must be an int >= 2 (one slot gathers while another is copied), got "
                             f"{staging_slots!r}")
        self.device = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.lanes = {direction: _Lane(self.device, staging_bytes, kernel_priority, staging_slots)
                      for direction in ("d2h", "h2d")}
        host_runs.warm_up()  # the compiled host-side passes compile (or load) on first use: not in a first transfer
        id_check.warm_up()
        #: `onboard_groups`: per sequence of cache pairs (and their layouts), the pairs' tables concatenated and their
        #: bytes per block, so that a load over groups seen before checks and looks up nothing per group
        self._group_tables = IdentitySequenceMemo()
        try:
            self._enqueue = staged_enqueue.compiled()
        except CudaUnavailableError:  # a driver without an entry point it calls: staged transfers enqueue in Python
            self._enqueue = None

    # -- public API ---------------------------------------------------------------------------------------------
    def offload(self, gpu: PagedKVCache, host: PagedKVCache, gpu_ids, host_ids, path: Path = "auto",
                **options) -> TransferHandle:
        """Device to host: copy blocks `gpu_ids` of the GPU cache into blocks `host_ids` of the pinned host cache.

        Ordered after the work queued so far on the caller's current stream (the writes to those blocks); the caller's
        stream does not wait for the transfer: poll or wait on the returned handle."""
        return self.submit([TransferSpec("d2h", gpu, host, gpu_ids, host_ids, path, options)])[0]

    def onboard(self, host: PagedKVCache, gpu: PagedKVCache, host_ids, gpu_ids, path: Path = "auto",
                **options) -> TransferHandle:
        """Host to device: copy blocks `host_ids` of the pinned host cache into blocks `gpu_ids` of the GPU cache.

        Ordered after the work queued so far on the caller's current stream (its last reads of the overwritten
        blocks); the caller must wait on the returned handle before its kernels read the onboarded blocks."""
        return self.submit([TransferSpec("h2d", host, gpu, host_ids, gpu_ids, path, options)])[0]

    def prepare(self, direction: str, src: PagedKVCache, dst: PagedKVCache) -> None:
        """Check ``src`` -> ``dst`` in ``direction`` ("d2h" or "h2d") and build what a staged transfer between them
        needs (copy plans, kernels compiled for their number of layers, the compiled enqueue's tables) now, moving
        nothing: the first transfer between them then starts without that cost (a kernel of a layer count not
        compiled yet took about 150 ms inside the load that first needed it on an H100). Raises as `submit` does for
        caches it cannot move between."""
        empty = np.zeros(0, dtype=np.int64)
        spec = TransferSpec(direction, src, dst, empty, empty)
        if self._check(spec)[2] == "staged":
            self._compiled_pair(spec, 0, self.lanes[direction])

    def onboard_groups(self, pairs: Sequence[tuple[PagedKVCache, PagedKVCache]], host_ids, gpu_ids, *,
                       ids_checked: bool = False) -> list[TransferHandle]:
        """Host to device: blocks `host_ids` into blocks `gpu_ids` of each (host, GPU) cache pair of `pairs`, in order,
        each pair its own transfer and handle: the layer groups of a layer-wise load (`select_layers` views of one
        host cache and one GPU cache), each waited for by the layers that read it. Ordered after the caller's
        stream, as `onboard`.

        Where the compiled enqueue takes every pair (staged transfers, see `_compiled_pair`), all are enqueued in one
        call: the caller's stream is recorded and the GPU ids uploaded once, each group's completion recorded as its
        last scatter is queued (measured on H100 machines, six groups of 128 blocks: 208 us of host time for the
        whole start, where a submit per group took about 97 us each). Otherwise they go through `submit`.
        ``ids_checked`` as for `submit`; with it, the groups' checks and concatenated tables are kept per sequence of
        cache pairs, so a later load over the same groups checks and looks up nothing per group."""
        if not pairs:
            return []
        lane = self.lanes["h2d"]
        caches = kept = None
        if ids_checked:
            caches = [c for host, gpu in pairs for c in (host, host.layout, gpu, gpu.layout)]
            kept = self._group_tables.find(caches)
        if kept is not None:  # every pair checked and its tables built by an earlier call: only the ids are new
            s, d = (np.ascontiguousarray(ids, dtype=np.int64) for ids in (host_ids, gpu_ids))
            if s.size and self._compiled_enqueue_takes(s.size, {}):
                return self._enqueue_groups(s, d, lane, *kept)
        specs = [TransferSpec("h2d", host, gpu, host_ids, gpu_ids) for host, gpu in pairs]
        checked = [self._check(spec, ids_checked) for spec in specs]
        s, d = checked[0][:2]
        tables = [self._compiled_pair(spec, s.size, lane) if path == "staged" else None
                  for spec, (_, _, path) in zip(specs, checked)]
        if s.size == 0 or any(t is None for t in tables):
            return self.submit(specs, ids_checked=True)
        kept = (np.concatenate([t[0] for t in tables]), np.concatenate([t[1] for t in tables]),
                tuple(host.geometry.block_bytes for host, _ in pairs))
        if ids_checked:  # (the lane keeps the plans these rows point into while the caches live)
            self._group_tables.keep(caches, kept)
        return self._enqueue_groups(s, d, lane, *kept)

    def _enqueue_groups(self, s: np.ndarray, d: np.ndarray, lane: _Lane, rows: np.ndarray, pair_rows: np.ndarray,
                        block_bytes: tuple[int, ...]) -> list[TransferHandle]:
        """`onboard_groups` of checked pairs and ids by one compiled call over the pairs' tables (``rows``,
        ``pair_rows``: each pair's `_compiled_pair` tables, concatenated in order; ``block_bytes``: each pair's bytes
        per block)."""
        handles = [TransferHandle("staged", s.size, s.size * bb) for bb in block_bytes]
        done = [torch.cuda.Event() for _ in block_bytes]
        marks = np.array([events.handle(e, lane.kernel_stream) for e in done], dtype=np.int64)
        try:
            code, step = self._enqueue(False, d, s, events.current_stream(self.device.index), lane.row,
                                       lane.slot_done, lane.ids.event_handles, lane.ids.host_array, lane.state, rows,
                                       pair_rows, marks, -1)
            if code:
                staged_enqueue.raise_failure(code, step)
        except Exception as e:  # enqueue failed: every group is failed, the caller is told per block
            for handle in handles:
                handle.error = e
            return handles
        for handle, event in zip(handles, done):
            handle.event = event
        return handles

    def submit(self, transfers: Sequence[TransferSpec], *, ids_checked: bool = False) -> list[TransferHandle]:
        """Enqueue several transfers at once and return their handles in order.

        ``ids_checked``: the caller (`kvbm.kernels.transfers.Transfers`, through its GPU <-> host path) has already
        checked the ids (int64 arrays, in range, no repeated destination) and the host caches' pinning, so they are
        not checked twice on the transfer's path to its first DMA.

        A staged transfer taken by the compiled enqueue (`_staged_compiled`) is enqueued whole in one call; those
        enqueued in Python are interleaved, one chunk of each in turn, so an onboard submitted with an offload starts
        after one chunk of the offload is enqueued, not after all of it. Each transfer is ordered after the work
        queued so far on the caller's current stream, as with `offload` / `onboard`. Every transfer is checked before
        anything is enqueued: bad input raises and enqueues nothing; a failure while enqueueing fails that transfer's
        handle only."""
        checked = [self._check(spec, ids_checked) for spec in transfers]
        handles, steps = [], []
        for spec, (s, d, path) in zip(transfers, checked):
            handle, work = self._begin(spec, s, d, path)
            handles.append(handle)
            if work is not None:
                steps.append((handle, work))
        while steps:  # round robin: one chunk of each unfinished transfer per round
            unfinished = []
            for handle, work in steps:
                try:
                    next(work)
                    unfinished.append((handle, work))
                except StopIteration as finished:
                    handle.event = finished.value
                except Exception as e:  # enqueue failed: the whole transfer is failed, the caller is told per block
                    handle.error = e
            steps = unfinished
        return handles

    # -- implementation -----------------------------------------------------------------------------------------
    def _check(self, spec: TransferSpec, ids_checked: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
        """Validate one transfer (raising on bad input): its ids as int64 arrays and the path it will take.

        The checks of the two caches are done once per cache pair and kept (`_check_pair`); the ids are checked in
        one compiled pass, and only when that finds a fault does `check_transfer` run to name it."""
        if spec.direction not in ("d2h", "h2d"):
            raise ValueError(f"direction must be 'd2h' or 'h2d', got {spec.direction!r}")
        if spec.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {spec.path!r}")
        src, dst = spec.src, spec.dst
        if not isinstance(src, PagedKVCache) or not isinstance(dst, PagedKVCache):
            check_caches(src, dst)  # raises the TypeError
        auto = self._check_pair(spec.direction, src, dst)
        if ids_checked:
            s, d = (np.ascontiguousarray(ids, dtype=np.int64) for ids in (spec.src_ids, spec.dst_ids))
            return s, d, auto if spec.path == "auto" else spec.path
        host = dst if spec.direction == "d2h" else src
        if host.__dict__.get("_pinned_while") != host_memory.unregistrations():  # (a buffer closed since: again)
            if not host_memory.cache_is_pinned(host):
                raise ValueError(f"host cache {host.name} must be in pinned CPU memory (see kernels.host_memory)")
            host.__dict__["_pinned_while"] = host_memory.unregistrations()
        s, d = block_id_array(spec.src_ids, "src_ids"), block_id_array(spec.dst_ids, "dst_ids")
        if not id_check.ids_valid(s, d, src.num_blocks, dst.num_blocks):
            check_transfer(src, dst, s, d)  # raises the precise error
            raise AssertionError(f"block ids rejected by ids_valid but accepted by check_transfer: {s}, {d}")
        return s, d, auto if spec.path == "auto" else spec.path

    def _check_pair(self, direction: str, src: PagedKVCache, dst: PagedKVCache) -> str:
        """Check that `src` -> `dst` is a transfer this engine can run in `direction` (raising if not) and return the
        path "auto" takes for it. Kept on `src` per destination while it lives (`IdentityMemo`, as `build_plan` keeps
        its plans), so repeated transfers between two caches skip it; the engine's device is part of the key."""
        key = (direction, self.device.index, id(dst))
        checked = memo_on(src, "_transfer_engine_pairs")
        path = checked.find(key, dst, dst.layout, src.layout)
        if path is not None:
            return path
        check_caches(src, dst)
        gpu = src if direction == "d2h" else dst
        if gpu.device != self.device:
            raise ValueError(f"GPU cache is on {gpu.device}, this engine serves {self.device}")
        return checked.keep(key, choose_path(src, dst), dst, dst.layout, src.layout)

    def _begin(self, spec: TransferSpec, s: np.ndarray, d: np.ndarray, path: str
               ) -> tuple[TransferHandle, Iterator[None] | None]:
        """Order one checked transfer after the caller's stream and enqueue it, or for "staged" return the generator
        that enqueues one chunk per step (its return value is the completion event)."""
        handle = TransferHandle(path, s.size, s.size * spec.src.geometry.block_bytes)
        if s.size == 0:
            return handle, None
        lane = self.lanes[spec.direction]
        caller = events.current_stream(self.device.index)  # ordered after the caller's work on G1 so far
        try:
            tables = self._compiled_pair(spec, s.size, lane) if path == "staged" else None
            if tables is not None:
                handle.event = self._staged_compiled(spec, s, d, lane, caller, tables, **spec.options)
                return handle, None
            events.record(lane.ready, caller)
            if path == "staged":
                return handle, self._staged(spec.src, spec.dst, s, d, lane, spec.direction, **spec.options)
            run = self._zero_copy if path == "zero_copy" else self._dma
            handle.event = run(spec.src, spec.dst, s, d, lane, spec.direction, **spec.options)
        except Exception as e:  # enqueue failed: the whole transfer is failed, the caller is told per block
            handle.error = e
        return handle, None

    def _compiled_pair(self, spec: TransferSpec, n: int, lane: _Lane) -> tuple[np.ndarray, np.ndarray] | None:
        """The tables of `_staged_compiled` when it can enqueue this staged transfer, else None (the Python path
        `_staged` then does): kernel gather, ids that fit an id-ring slot, no Triton launch hook set (a profiler's:
        only Triton's launcher calls it), and a cache pair `_Lane.compiled_pair` accepts."""
        if not self._compiled_enqueue_takes(n, spec.options):
            return None
        if spec.direction == "d2h":
            return lane.compiled_pair(spec.src, spec.dst, True)
        return lane.compiled_pair(spec.dst, spec.src, False)

    def _compiled_enqueue_takes(self, n: int, options: Mapping[str, Any]) -> bool:
        """Whether the compiled enqueue can take a staged transfer of ``n`` blocks with ``options`` (the conditions
        of `_compiled_pair` that are not the cache pair's)."""
        if options and (not set(options) <= {"max_ctas", "gather"} or options.get("gather", "kernel") != "kernel"):
            return False
        return self._enqueue is not None and n <= ID_RING_SLOT_IDS and not _triton_copy().launch_hooks_set()

    def _staged_compiled(self, spec: TransferSpec, s: np.ndarray, d: np.ndarray, lane: _Lane, caller: int,
                         tables: tuple[np.ndarray, np.ndarray], max_ctas: int | None = None,
                         gather: str = "kernel") -> torch.cuda.Event:
        """The staged transfer enqueued by one compiled call (`staged_enqueue`): the chunks, slots, streams and events
        of `_staged`, with every driver call made from compiled code."""
        d2h = spec.direction == "d2h"
        code, step = self._enqueue(
            d2h, s if d2h else d, d if d2h else s, caller, lane.row, lane.slot_done, lane.ids.event_handles,
            lane.ids.host_array, lane.state, *tables, _NO_GROUP_EVENT, -1 if max_ctas is None else max_ctas)
        if code:
            staged_enqueue.raise_failure(code, step)
        return self._finish(lane.dma_streams[0] if d2h else lane.kernel_stream)

    def _dma_pieces(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: int, direction: str) -> None:
        """Batched DMA on raw stream `stream` of pieces this engine built from validated caches and ids (no
        re-validation)."""
        memcpy_batch_unchecked(np.ascontiguousarray(dsts, dtype=np.uint64), np.ascontiguousarray(srcs, dtype=np.uint64),
                               np.ascontiguousarray(sizes, dtype=np.uint64), stream, direction=direction,
                               device=self.device.index)

    def _dma_split(self, dsts: np.ndarray, srcs: np.ndarray, widths: np.ndarray, lane: _Lane, after: int | None,
                   direction: str, landed: int, rows: np.ndarray | None = None, pitches: tuple[int, int] = (0, 0)
                   ) -> None:
        """DMA pieces once event `after` (if any) has happened, as the compiled enqueue's `dma` does: pieces of one
        row batched, with `MIN_PIECES_TO_SPLIT` or more the first half on the lane's first DMA stream and the rest on
        its second, else all on the first; each piece of several `rows` (host pitch, staging pitch: `pitches`) one
        2-D copy on the stream with fewer bytes queued so far. Records event `landed` (on the first stream) once all
        have landed."""
        first, second = lane.dma_handles
        multi = np.flatnonzero(rows > 1) if rows is not None else np.zeros(0, dtype=np.int64)
        one = rows == 1 if multi.size else slice(None)
        one_d, one_s, one_w = dsts[one], srcs[one], widths[one]
        singles = one_d.size
        half = (singles + 1) // 2 if singles >= MIN_PIECES_TO_SPLIT else singles
        two = half < singles or multi.size > 1
        if after is not None:
            events.wait(first, after)
            if two:
                events.wait(second, after)
        if half:
            self._dma_pieces(one_d[:half], one_s[:half], one_w[:half], first, direction)
        if half < singles:
            self._dma_pieces(one_d[half:], one_s[half:], one_w[half:], second, direction)
        queued = [int(one_w[:half].sum()), int(one_w[half:].sum())]
        for i in multi.tolist():
            k = 1 if two and queued[1] < queued[0] else 0
            self._copy_rows(int(dsts[i]), int(srcs[i]), int(widths[i]), int(rows[i]), pitches, direction,
                            second if k else first)
            queued[k] += int(widths[i]) * int(rows[i])
        if two:
            events.record(lane.second_landed, second)
            events.wait(first, lane.second_landed)
        events.record(landed, first)

    @staticmethod
    def _copy_rows(dst: int, src: int, width: int, rows: int, pitches: tuple[int, int], direction: str,
                   stream: int) -> None:
        """One 2-D copy of a run of a layer view between the host cache and staging (`copy_2d`)."""
        host_pitch, stage_pitch = pitches
        if direction == "d2h":
            memcpy_2d_async(dst, host_pitch, HOST, src, stage_pitch, DEVICE, width, rows, stream)
        else:
            memcpy_2d_async(dst, stage_pitch, DEVICE, src, host_pitch, HOST, width, rows, stream)

    @staticmethod
    def _finish(stream: torch.cuda.Stream) -> torch.cuda.Event:
        """A new event recorded on `stream`: the transfer's completion, owned by its handle."""
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def _zero_copy(self, src, dst, s, d, lane, direction, max_ctas=None):
        launch = _triton_copy().launch

        stream = lane.kernel_stream
        events.wait(lane.kernel_handle, lane.ready)
        # the kernel reads / writes the pinned host cache over UVA
        launch(build_plan(src, dst), lane.ids.upload(s, stream), lane.ids.upload(d, stream), num_blocks=s.size,
               max_ctas=max_ctas, stream=stream)
        return self._finish(stream)

    def _dma(self, src, dst, s, d, lane, direction):
        plan = build_plan(src, dst)
        if _whole_block_dense(plan, src.geometry.block_bytes):
            size = src.geometry.block_bytes
            srcs = src.first_piece_address() + s * (src.layout.stride["block"] * src.geometry.itemsize)
            dsts = dst.first_piece_address() + d * (dst.layout.stride["block"] * dst.geometry.itemsize)
            sizes = np.full(s.size, size, dtype=np.uint64)
        else:
            srcs, dsts, sizes = dense_pieces(plan, src, dst, s, d)
        self._dma_split(dsts, srcs, sizes, lane, lane.ready, direction, lane.landed)
        return self._finish(lane.dma_streams[0])

    def _staged(self, src, dst, s, d, lane, direction, max_ctas=None, gather="kernel") -> Iterator[None]:
        """The staged transfer enqueued in Python: the plan of `host_runs.schedule` (chunks of at most one staging
        slot each, slots in rotation also across transfers so back-to-back transfers overlap, one DMA piece per run
        of consecutive host blocks), executed with the streams and events of the compiled enqueue. Per chunk, D2H:
        gather into the slot on the kernel stream, then the chunk's DMA pieces, split over the two DMA streams; H2D
        the reverse. A slot is reused once the chunk that last used it is done. H2D uploads the GPU ids after the
        first DMA is queued.

        Checks the options and orders the transfer after `lane.ready` at once, then returns a generator that enqueues
        one chunk per step and returns the completion event (`submit` interleaves the steps of several transfers).

        `gather="copy_engine"` moves pieces to/from staging with batched device-to-device memcpy instead of the
        kernel (needs pieces that are dense runs in both caches; measured far slower, see bench/results)."""
        launch = _triton_copy().launch

        if gather not in ("kernel", "copy_engine"):
            raise ValueError(f"gather must be 'kernel' or 'copy_engine', got {gather!r}")
        kernel_stream = lane.kernel_stream
        d2h = direction == "d2h"
        host, gpu = (dst, src) if d2h else (src, dst)
        host_ids, gpu_host_ids = (d, s) if d2h else (s, d)
        bb = src.geometry.block_bytes
        per_chunk = lane.slot_bytes // bb
        if per_chunk == 0:
            raise ValueError(f"staging slot of {lane.slot_bytes} bytes cannot hold one block of {bb} bytes")
        kernel_gather = gather == "kernel"
        # Now (the next transfer re-records `ready`): the kernel stream, and for an onboard the DMA streams too. An
        # offload's DMAs wait for its gathers, queued on the kernel stream after this wait.
        for handle in (lane.kernel_handle,) if d2h else (lane.kernel_handle, *lane.dma_handles):
            events.wait(handle, lane.ready)

        def repack(gpu_ids: int | None, start: int, n: int, staging: PagedKVCache) -> None:
            """Gather chunk [start, start + n) of the GPU blocks into staging (D2H), or scatter it back (H2D)."""
            a, b = (gpu, staging) if d2h else (staging, gpu)
            if kernel_gather:
                chunk = DevicePointer(gpu_ids + 8 * start, torch.int64), lane.stage_ids(n)
                launch(build_plan(a, b), *(chunk if d2h else chunk[::-1]), num_blocks=n, max_ctas=max_ctas,
                       stream=kernel_stream)
            else:
                chunk = gpu_host_ids[start:start + n], np.arange(n, dtype=np.int64)
                srcs, dsts, sizes = dense_pieces(build_plan(a, b), a, b, *(chunk if d2h else chunk[::-1]))
                self._dma_pieces(dsts, srcs, sizes, lane.kernel_handle, "d2d")

        def chunks() -> Iterator[None]:
            gpu_ids = None  # device address of the GPU ids (kernel gather), uploaded when first needed
            host_stride = host.layout.stride["block"] * src.geometry.itemsize
            table, hosts, stage, widths, rows = host_runs.schedule(
                host_ids, per_chunk, direction, host.first_piece_address(), host_stride, bb, lane.staging_address,
                lane.slot_bytes, lane.state, len(lane.slot_done))
            for chunk in table.tolist():
                start, n, slot = chunk[Chunk.START], chunk[Chunk.COUNT], chunk[Chunk.SLOT]
                pieces = slice(chunk[Chunk.FIRST_PIECE], chunk[Chunk.END_PIECE])
                staging = lane.staging_cache(host, slot)
                done = int(lane.slot_done[slot])  # also: the slot is free once its last chunk recorded this
                if d2h:
                    if kernel_gather and gpu_ids is None:
                        gpu_ids = lane.ids.upload(gpu_host_ids, kernel_stream).data_ptr()
                    events.wait(lane.kernel_handle, done)
                    repack(gpu_ids, start, n, staging)
                    events.record(lane.gathered, lane.kernel_handle)
                    self._dma_split(hosts[pieces], stage[pieces], widths[pieces], lane, lane.gathered, "d2h", done,
                                    rows[pieces], (host_stride, bb))
                else:
                    self._dma_split(stage[pieces], hosts[pieces], widths[pieces], lane, done, "h2d", lane.landed,
                                    rows[pieces], (host_stride, bb))
                    if kernel_gather and gpu_ids is None:  # the first DMA is queued: now the ids its scatter needs
                        gpu_ids = lane.ids.upload(gpu_host_ids, kernel_stream).data_ptr()
                    events.wait(lane.kernel_handle, lane.landed)
                    repack(gpu_ids, start, n, staging)
                    events.record(done, lane.kernel_handle)
                yield
            return self._finish(lane.dma_streams[0] if d2h else kernel_stream)

        return chunks()


def _inner_order(host: PagedKVCache) -> tuple[str, ...]:
    """The inner dimension order of a block-major cache, outermost first, from its strides.

    Block-major is structural: every block is one dense run of `geometry.block_bytes` bytes (its (layer, kv) pieces
    evenly spaced and, with token, head and channel, tiling the run without gaps) and the block stride is that run, so
    a run of consecutive blocks is one DMA piece and a staging buffer in this order is byte-identical. A layer view
    of a block-major cache (`select_layers`) keeps the full block stride: each block is then its own DMA piece."""
    lay, g = host.layout, host.geometry
    sizes = {"layer": g.num_layers, "kv": g.num_kv, "token": g.block_size, "head": g.num_heads, "channel": g.head_dim}
    addresses = host.piece_addresses()
    steps = [a - addresses[0] for a in addresses]
    kv_step = steps[1] if g.num_kv == 2 else 0
    layer_step = steps[g.num_kv] if g.num_layers > 1 else 0
    strides = {"layer": layer_step // g.itemsize, "kv": kv_step // g.itemsize,
               **{k: v for k, v in lay.stride.items() if k != "block"}}
    default = ("layer", "kv", "token", "head", "channel")
    big = sorted((n for n in default if sizes[n] > 1), key=lambda n: -strides[n])
    dense, expected = True, 1  # each dimension's stride is the span of those inside it
    for name in reversed(big):
        dense = dense and strides[name] == expected
        expected *= sizes[name]
    evenly_spaced = kv_step % g.itemsize == 0 and layer_step % g.itemsize == 0 and all(
        steps[layer * g.num_kv + kv] == layer * layer_step + kv * kv_step
        for layer in range(g.num_layers) for kv in range(g.num_kv))
    if not (evenly_spaced and dense and lay.stride["block"] * g.itemsize >= g.block_bytes):
        raise ValueError(f"host cache must be block-major (kvbm.layouts.block_major), or a layer view of one: each "
                         f"block one dense run of {g.block_bytes} bytes, the block stride outermost; got layout "
                         f"{lay.name!r}")
    big_in_order = iter(big)
    # size-1 dimensions have no meaningful stride: they keep their default place, the others follow their strides
    return tuple(n if sizes[n] == 1 else next(big_in_order) for n in default)


def dense_pieces(plan: CopyPlan, src: PagedKVCache, dst: PagedKVCache, s: np.ndarray, d: np.ndarray):
    """(srcs, dsts, sizes) byte arrays of every dense row of a transfer: one DMA piece each (the peers' method)."""
    (d0, s0, t0), (d1, s1, t1), (d2, s2, t2) = plan.dims
    if s2 != 1 or t2 != 1:
        raise ValueError("rows are not dense in both caches: no DMA piece decomposition")
    unit = plan.unit
    src_lo, dst_lo = plan.src_base.data_ptr(), plan.dst_base.data_ptr()
    r0, r1 = np.divmod(np.arange(d0 * d1, dtype=np.int64), d1)
    s_rows = r0 * s0 + r1 * s1
    d_rows = r0 * t0 + r1 * t1
    so = np.asarray(plan.src_offsets_host, dtype=np.int64)
    do = np.asarray(plan.dst_offsets_host, dtype=np.int64)
    s_start = (s[:, None, None] * plan.src_block_stride + so[None, :, None] + s_rows[None, None, :]).reshape(-1)
    d_start = (d[:, None, None] * plan.dst_block_stride + do[None, :, None] + d_rows[None, None, :]).reshape(-1)
    srcs = (src_lo + s_start * unit).astype(np.uint64)
    dsts = (dst_lo + d_start * unit).astype(np.uint64)
    return srcs, dsts, np.full(srcs.size, d2 * unit, dtype=np.uint64)
