"""Device <-> host transfer paths between an engine's GPU cache and a pinned host cache (block-major).

Three paths, each enqueued on the engine's own transfer streams and signalled by a CUDA event (the caller's stream
is never blocked):

- "staged": gather the blocks into a bounded device staging buffer with the Triton kernel, then one DMA per run of
  consecutive host blocks; pipelined in chunks over two staging halves so the gather of chunk i+1 overlaps the DMA
  of chunk i (H2D: DMA into staging, then scatter). The SM part is a short full-speed burst; PCIe is crossed by
  the copy engine. The default.
- "zero_copy": the kernel reads or writes pinned host memory directly over UVA. Lowest latency for small
  transfers on an idle GPU, but it holds SMs for the whole PCIe transfer: never the default beside a model.
- "dma": `cudaMemcpyBatchAsync` over the pieces that are dense in both caches (whole blocks when both caches keep a
  block in one dense run, as cross-layer layouts do; no SM time at all).

"auto" takes "dma" when every block is one dense run of at least `DMA_MIN_PIECE_BYTES` in both caches, else
"staged". Measured on the H200 (bench/results/): staged moves 81-90% of the PCIe ceiling at 16 blocks and 90-99% at
256-1024; batched DMA of 32 KiB pieces 48-87%.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from kvbm.layouts import PagedKVCache, block_major, validate_transfer
from kvbm.layouts.conversion import INT_VIEW

from .batch_memcpy import memcpy_batch_async
from .copy_plan import CopyPlan, build_plan

Path = Literal["auto", "staged", "zero_copy", "dma"]
PATHS: tuple[str, ...] = ("auto", "staged", "zero_copy", "dma")
#: Smallest dense run "auto" hands to batched DMA (batched DMA of small pieces falls far below the ceiling).
DMA_MIN_PIECE_BYTES = 1 << 20
#: Default device staging size, split into two halves for the pipeline.
DEFAULT_STAGING_BYTES = 256 << 20


class DevicePointer:
    """A raw device-visible address typed for a Triton pointer argument (pinned host memory under UVA)."""

    def __init__(self, address: int, dtype: torch.dtype):
        self.address, self.dtype = address, dtype

    def data_ptr(self) -> int:
        return self.address


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


def _whole_block_dense(plan: CopyPlan, block_bytes: int) -> bool:
    """Every block is one dense run of bytes in both caches: pieces back to back, in the same order."""
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


def _runs(ids: np.ndarray) -> list[tuple[int, int, int]]:
    """Split ids into runs of consecutive values: (position in ids, first id, length)."""
    if ids.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [ids.size]))
    return [(int(s), int(ids[s]), int(e - s)) for s, e in zip(starts, ends)]


class _PinnedIdRing:
    """Pinned host slots for uploading block ids without allocating pinned memory per transfer.

    Slot k is reused only once the upload that last used it has finished (its event), so a transfer's ids are
    never overwritten in flight. Id lists longer than a slot get a pinned tensor of their own.
    """

    def __init__(self, slots: int = 16, slot_ids: int = 16384):
        self.buffer = torch.empty(slots, slot_ids, dtype=torch.int64).pin_memory()
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.next = 0

    def upload(self, ids: torch.Tensor, stream: torch.cuda.Stream, device: torch.device) -> torch.Tensor:
        """Copy int64 CPU ids to the device on `stream`; returns the device tensor."""
        n = ids.numel()
        if n > self.buffer.shape[1]:
            host = ids.pin_memory()
        else:
            k, self.next = self.next, (self.next + 1) % self.buffer.shape[0]
            if self.events[k] is not None:
                self.events[k].synchronize()  # issued `slots` uploads ago: finished in practice
            host = self.buffer[k, :n]
            host.copy_(ids)
        with torch.cuda.stream(stream):
            out = host.to(device, non_blocking=True)
            if n <= self.buffer.shape[1]:
                self.events[k] = torch.cuda.Event()
                self.events[k].record(stream)
        return out


class _Lane:
    """One direction's streams and double-buffered device staging, so offload and onboard run at once.

    `kernel_priority` is the CUDA stream priority of the gather/scatter kernels (-1 high, 0 normal).
    """

    def __init__(self, device: torch.device, staging_bytes: int, kernel_priority: int = -1):
        self.kernel_stream = torch.cuda.Stream(device, priority=kernel_priority)
        self.dma_stream = torch.cuda.Stream(device, priority=-1)
        self.ids = _PinnedIdRing()
        self.half = staging_bytes // 2
        self.staging = torch.empty(self.half * 2, dtype=torch.uint8, device=device)
        self.half_free: list[torch.cuda.Event | None] = [None, None]  # after which each half may be overwritten
        self._caches: dict = {}
        self._stage_ids = torch.empty(0, dtype=torch.int64, device=device)

    def stage_ids(self, n: int) -> torch.Tensor:
        """Device tensor 0..n-1 (staging block ids), made on the kernel stream and kept."""
        if self._stage_ids.numel() < n:
            with torch.cuda.stream(self.kernel_stream):
                self._stage_ids = torch.arange(n, dtype=torch.int64, device=self.staging.device)
        return self._stage_ids[:n]

    def staging_cache(self, host: PagedKVCache, half: int, num_blocks: int) -> PagedKVCache:
        """A block-major device cache over one staging half, in the host cache's inner order (kept, so the copy
        plans built for it are reused)."""
        key = (host.layout, half, num_blocks)
        if key not in self._caches:
            self._caches[key] = self._make_staging(host, half, num_blocks)
        return self._caches[key]

    def _make_staging(self, host: PagedKVCache, half: int, num_blocks: int) -> PagedKVCache:
        order = _inner_order(host)
        g = host.geometry
        sizes = {"layer": g.num_layers, "kv": g.num_kv, "token": g.block_size, "head": g.num_heads,
                 "channel": g.head_dim}
        buf = self.staging[half * self.half: half * self.half + num_blocks * g.block_bytes].view(host.dtype)
        return block_major(buf.view(num_blocks, *[sizes[n] for n in order]), order)


class TransferEngine:
    """Moves blocks between one GPU cache and pinned host caches, on its own high-priority streams.

    `host` caches must be block-major (`kvbm.layouts.block_major`) in pinned CPU memory; the device staging buffer
    takes the host cache's inner order so its blocks are byte-identical to the host's and one DMA moves a run of
    them. `staging_bytes` bounds the device memory used (two halves for the pipeline).
    """

    def __init__(self, device: torch.device | str | int = "cuda", staging_bytes: int = DEFAULT_STAGING_BYTES,
                 kernel_priority: int = -1):
        if not torch.cuda.is_available():
            raise RuntimeError("TransferEngine needs a CUDA GPU; without one, copy_blocks runs on the CPU backend")
        if staging_bytes <= 0:
            raise ValueError(f"staging_bytes must be positive, got {staging_bytes}")
        self.device = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.lanes = {direction: _Lane(self.device, staging_bytes, kernel_priority) for direction in ("d2h", "h2d")}

    # -- public API ---------------------------------------------------------------------------------------------
    def offload(self, gpu: PagedKVCache, host: PagedKVCache, gpu_ids, host_ids, path: Path = "auto",
                **options) -> TransferHandle:
        """Device to host: copy blocks `gpu_ids` of the GPU cache into blocks `host_ids` of the pinned host cache."""
        return self._transfer(gpu, host, gpu_ids, host_ids, path, "d2h", **options)

    def onboard(self, host: PagedKVCache, gpu: PagedKVCache, host_ids, gpu_ids, path: Path = "auto",
                **options) -> TransferHandle:
        """Host to device: copy blocks `host_ids` of the pinned host cache into blocks `gpu_ids` of the GPU cache."""
        return self._transfer(host, gpu, host_ids, gpu_ids, path, "h2d", **options)

    # -- implementation -----------------------------------------------------------------------------------------
    def _transfer(self, src, dst, src_ids, dst_ids, path, direction, **options) -> TransferHandle:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        s, d = validate_transfer(src, dst, src_ids, dst_ids)
        gpu, host = (src, dst) if direction == "d2h" else (dst, src)
        if gpu.device != self.device:
            raise ValueError(f"GPU cache is on {gpu.device}, this engine serves {self.device}")
        if host.device.type != "cpu" or not all(t.is_pinned() for t in host.tensors):
            raise ValueError(f"host cache {host.name} must be in pinned CPU memory (see kernels.host_memory)")
        if path == "auto":
            path = choose_path(src, dst)
        handle = TransferHandle(path, int(s.numel()), int(s.numel()) * src.geometry.block_bytes)
        if s.numel() == 0:
            return handle
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # the engine's writes to G1 so far
        try:
            run = {"staged": self._staged, "zero_copy": self._zero_copy, "dma": self._dma}[path]
            handle.event = run(src, dst, s, d, direction, ready, **options)
        except Exception as e:  # enqueue failed: the whole transfer is failed, the caller is told per block
            handle.error = e
        return handle

    def _upload_ids(self, ids: torch.Tensor, lane: _Lane) -> torch.Tensor:
        """Copy ids to the device on the lane's kernel stream (never on the caller's stream)."""
        return lane.ids.upload(ids, lane.kernel_stream, self.device)

    def _zero_copy(self, src, dst, s, d, direction, ready, max_ctas=None):
        from .triton_copy import launch

        plan = build_plan(src, dst)
        host_base = plan.dst_base if direction == "d2h" else plan.src_base
        pointer = DevicePointer(host_base.data_ptr(), INT_VIEW[plan.unit])
        lane = self.lanes[direction]
        stream = lane.kernel_stream
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            kwargs = {"dst_base": pointer} if direction == "d2h" else {"src_base": pointer}
            launch(plan, self._upload_ids(s, lane), self._upload_ids(d, lane), max_ctas=max_ctas, **kwargs)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def _dma(self, src, dst, s, d, direction, ready):
        plan = build_plan(src, dst)
        if _whole_block_dense(plan, src.geometry.block_bytes):
            size = src.geometry.block_bytes
            srcs = src.piece_addresses()[0] + s.numpy() * src.layout.stride["block"] * src.geometry.itemsize
            dsts = dst.piece_addresses()[0] + d.numpy() * dst.layout.stride["block"] * dst.geometry.itemsize
            sizes = np.full(s.numel(), size, dtype=np.uint64)
        else:
            srcs, dsts, sizes = dense_pieces(plan, src, dst, s.numpy(), d.numpy())
        stream = self.lanes[direction].dma_stream
        stream.wait_event(ready)
        memcpy_batch_async(dsts, srcs, sizes, stream, direction=direction, check_overlap=False)
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def _staged(self, src, dst, s, d, direction, ready, max_ctas=None, gather="kernel"):
        """`gather="copy_engine"` moves pieces to/from staging with batched device-to-device memcpy instead of the
        kernel (needs pieces that are dense runs in both caches; measured far slower for D2H, see bench/results)."""
        from .triton_copy import launch

        if gather not in ("kernel", "copy_engine"):
            raise ValueError(f"gather must be 'kernel' or 'copy_engine', got {gather!r}")

        def repack(a, b, a_ids, b_ids, a_host, b_host):
            if gather == "kernel":
                with torch.cuda.stream(lane.kernel_stream):
                    launch(build_plan(a, b), a_ids, b_ids, max_ctas=max_ctas)
            else:
                srcs, dsts, sizes = dense_pieces(build_plan(a, b), a, b, a_host, b_host)
                memcpy_batch_async(dsts, srcs, sizes, lane.kernel_stream, direction="d2d", check_overlap=False)

        lane = self.lanes[direction]
        host, gpu = (dst, src) if direction == "d2h" else (src, dst)
        g = src.geometry
        per_chunk = lane.half // g.block_bytes
        if per_chunk == 0:
            raise ValueError(f"staging half of {lane.half} bytes cannot hold one block of {g.block_bytes} bytes")
        host_ids = (d if direction == "d2h" else s).numpy()
        gpu_ids = self._upload_ids(s if direction == "d2h" else d, lane)
        stage_ids = lane.stage_ids(min(per_chunk, s.numel()))
        host_base = host.piece_addresses()[0]
        host_stride = host.layout.stride["block"] * g.itemsize
        lane.kernel_stream.wait_event(ready)
        lane.dma_stream.wait_event(ready)
        done = None
        for c, start in enumerate(range(0, s.numel(), per_chunk)):
            half = c % 2
            n = min(per_chunk, s.numel() - start)
            staging = lane.staging_cache(host, half, n)
            stage_base = staging.piece_addresses()[0]
            runs = _runs(host_ids[start:start + n])
            hosts = [host_base + first * host_stride for _, first, _ in runs]
            stage = [stage_base + pos * g.block_bytes for pos, _, _ in runs]
            sizes = [length * g.block_bytes for _, _, length in runs]
            if lane.half_free[half] is not None:  # the previous chunk through this half is finished with it
                first_stream = lane.kernel_stream if direction == "d2h" else lane.dma_stream
                first_stream.wait_event(lane.half_free[half])
            chunk_host_ids = (s if direction == "d2h" else d).numpy()[start:start + n], np.arange(n, dtype=np.int64)
            if direction == "d2h":
                repack(gpu, staging, gpu_ids[start:start + n], stage_ids[:n], *chunk_host_ids)
                gathered = torch.cuda.Event()
                gathered.record(lane.kernel_stream)
                lane.dma_stream.wait_event(gathered)
                memcpy_batch_async(hosts, stage, sizes, lane.dma_stream, direction="d2h", check_overlap=False)
                done = torch.cuda.Event()
                done.record(lane.dma_stream)
            else:
                memcpy_batch_async(stage, hosts, sizes, lane.dma_stream, direction="h2d", check_overlap=False)
                landed = torch.cuda.Event()
                landed.record(lane.dma_stream)
                lane.kernel_stream.wait_event(landed)
                repack(staging, gpu, stage_ids[:n], gpu_ids[start:start + n], *chunk_host_ids[::-1])
                done = torch.cuda.Event()
                done.record(lane.kernel_stream)
            lane.half_free[half] = done
        return done


def _inner_order(host: PagedKVCache) -> tuple[str, ...]:
    """The inner dimension order of a block-major cache, outermost first, from its strides."""
    lay, g = host.layout, host.geometry
    if not lay.name.startswith(("kvbm_staging", "block_major")):
        raise ValueError(f"host cache must be block-major (kvbm.layouts.block_major), got layout {lay.name!r}")
    kv_stride = (host.layout.piece_offset[1] - host.layout.piece_offset[0]) if g.num_kv == 2 else 0
    layer_stride = host.layout.piece_offset[g.num_kv] - host.layout.piece_offset[0] if g.num_layers > 1 else 0
    strides = {"layer": layer_stride, "kv": kv_stride, **{k: v for k, v in lay.stride.items() if k != "block"}}
    sizes = {"layer": g.num_layers, "kv": g.num_kv, "token": g.block_size, "head": g.num_heads, "channel": g.head_dim}
    default = ("layer", "kv", "token", "head", "channel")
    big = iter(sorted((n for n in default if sizes[n] > 1), key=lambda n: -strides[n]))
    # size-1 dimensions have no meaningful stride: they keep their default place, the others follow their strides
    return tuple(n if sizes[n] == 1 else next(big) for n in default)


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
