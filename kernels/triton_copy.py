"""Triton gather/scatter kernel: copy many blocks x layers x K/V between any two layouts in one launch.

Gather (engine layout -> contiguous staging) and scatter (staging -> engine layout) are the same kernel with the
roles swapped, and so is a permuting copy (HND -> NHD): each program copies one tile of one (block pair, piece)
box, computing both addresses from the block ids, the per-piece offset tables and the strides of the `CopyPlan`.
Dimension permutations are fused into the same pass; tails are masked; ids are validated on the host before launch.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel

from kvbm.layouts import PagedKVCache

from .copy_plan import CopyPlan, build_plan
from .device_pointer import DevicePointer


def _kernel_pointer(base: torch.Tensor, on_gpu: bool):
    """A plan's base as a kernel argument: pinned CPU memory is passed by its UVA address to a GPU launch."""
    return DevicePointer(base.data_ptr(), base.dtype) if on_gpu and base.device.type == "cpu" else base


#: Parameters of the kernel before its compile-time constants.
_RUNTIME_ARGS = 7
#: Bytes one program moves per tile: large enough to keep many 16-byte accesses in flight per thread.
TILE_BYTES = 16384


# The ids, offset tables and tile count vary per launch and only feed scalar loads and the loop bound: not specialized
# on, so one compiled kernel per cache pair serves every launch (see `launch`). The cache bases keep their alignment
# specialization (fixed per pair; it lets the compiler emit 16-byte accesses).
@triton.jit(do_not_specialize=["total_tiles"],
            do_not_specialize_on_alignment=["src_piece_off", "dst_piece_off", "src_ids", "dst_ids"])
def copy_blocks_kernel(
    src_ptr, dst_ptr, src_piece_off, dst_piece_off, src_ids, dst_ids, total_tiles,
    num_pieces: tl.constexpr, src_block_stride: tl.constexpr, dst_block_stride: tl.constexpr,
    d1: tl.constexpr, d2: tl.constexpr, s0: tl.constexpr, s1: tl.constexpr, t0: tl.constexpr, t1: tl.constexpr,
    s2: tl.constexpr, t2: tl.constexpr, rows: tl.constexpr, col_tiles: tl.constexpr, tiles_per_piece: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Tiles are numbered (block pair, piece, row tile, column tile); program k copies tiles k, k + grid, ...

    With a full grid each program copies one tile; a capped grid (the CTA-cap knob) loops. Everything but the
    pointers and the tile count is fixed per cache pair, so it is compiled in (one specialization per pair): the
    index arithmetic folds to constants and a launch passes seven arguments.
    """
    for t in range(tl.program_id(0), total_tiles, tl.num_programs(0)):
        pair = t // tiles_per_piece
        tile = t - pair * tiles_per_piece
        j = pair // num_pieces
        p = pair - j * num_pieces
        # Piece offsets come in units of ALIGN and every stride is a multiple of ALIGN (both checked on the host),
        # so the compiler can prove each row start is ALIGN-aligned and emit 16-byte accesses.
        src_off = tl.load(src_piece_off + p) * ALIGN + tl.load(src_ids + j) * src_block_stride
        dst_off = tl.load(dst_piece_off + p) * ALIGN + tl.load(dst_ids + j) * dst_block_stride
        row_tile = tile // col_tiles
        col_tile = tile - row_tile * col_tiles
        r = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
        c = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
        r0 = r // d1
        r1 = r - r0 * d1
        src_row = src_off + r0.to(tl.int64) * s0 + r1.to(tl.int64) * s1
        dst_row = dst_off + r0.to(tl.int64) * t0 + r1.to(tl.int64) * t1
        mask = (r < rows)[:, None] & (c < d2)[None, :]
        x = tl.load(src_ptr + src_row[:, None] + (c * s2)[None, :], mask=mask)
        tl.store(dst_ptr + dst_row[:, None] + (c * t2)[None, :], x, mask=mask)


def tile_shape(plan: CopyPlan) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): columns cover the dense row up to a tile, rows fill the rest of it."""
    tile_units = max(TILE_BYTES // plan.unit, 16)
    block_c = min(triton.next_power_of_2(plan.row_len), tile_units)
    block_r = min(triton.next_power_of_2(plan.rows), max(tile_units // block_c, 1))
    return block_r, block_c


def _constants(plan: CopyPlan) -> tuple[int, dict]:
    """(tiles per block pair, compile-time arguments) of a plan."""
    (d0, s0, t0), (d1, s1, t1), (d2, s2, t2) = plan.dims
    block_r, block_c = tile_shape(plan)
    rows = d0 * d1
    col_tiles = triton.cdiv(d2, block_c)
    tiles_per_piece = triton.cdiv(rows, block_r) * col_tiles
    values = dict(num_pieces=plan.num_pieces, src_block_stride=plan.src_block_stride,
                  dst_block_stride=plan.dst_block_stride, d1=d1, d2=d2, s0=s0, s1=s1, t0=t0, t1=t1, s2=s2, t2=t2,
                  rows=rows, col_tiles=col_tiles, tiles_per_piece=tiles_per_piece, ALIGN=plan.align,
                  BLOCK_R=block_r, BLOCK_C=block_c)
    # in the kernel's parameter order: a compiled kernel takes them positionally after the runtime arguments
    consts = {name: values[name] for name in copy_blocks_kernel.arg_names[_RUNTIME_ARGS:]}
    return plan.num_pieces * tiles_per_piece, consts


def launch(
    plan: CopyPlan,
    src_ids: torch.Tensor | DevicePointer,
    dst_ids: torch.Tensor | DevicePointer,
    *,
    num_blocks: int | None = None,
    max_ctas: int | None = None,
    num_warps: int = 4,
    stream: torch.cuda.Stream | None = None,
    empty_launch: bool = False,
) -> None:
    """Launch the copy for validated int64 ids already on the kernel's device, on `stream` (default: the current
    stream).

    The ids are tensors, or `DevicePointer`s of dtype int64 with `num_blocks` given (the transfer engine passes
    addresses into its id buffers: slicing a tensor per chunk costs more host time than the launch). `max_ctas` caps
    the grid (programs then loop over tiles); None launches one program per tile. A cache in pinned CPU memory is
    read or written over UVA (zero-copy).

    The first launch of a plan goes through Triton's JIT (which compiles or finds the kernel); later launches call
    the compiled kernel kept on the plan directly (10-15 us of host time instead of 60-65 through the JIT, measured
    on the H200 machine), passing every pointer as a plain address (no `data_ptr()` call or pointer query per
    argument). Only the arguments the kernel is not specialized on differ between them. `empty_launch` launches one
    program with no tiles (it compiles the kernel, see `compiled_kernel`).
    """
    if num_blocks is None and not isinstance(src_ids, torch.Tensor):
        raise TypeError("launch needs num_blocks when the ids are given as DevicePointer addresses")
    n = int(src_ids.numel()) if num_blocks is None else num_blocks
    if n == 0 and not empty_launch:
        return
    tiles_per_pair, consts = plan.memo("triton_launch_constants", _constants)
    total = n * tiles_per_pair
    grid = max(1, total if max_ctas is None else min(total, max_ctas))
    # what the compiled kernel depends on beyond the plan: the ids' types, the tile count's integer type, the warps
    key = (src_ids.dtype, dst_ids.dtype, total < 1 << 31, num_warps)
    compiled = plan.memo("triton_compiled", lambda _: {})
    kernel = compiled.get(key)
    if kernel is not None:
        device = plan.src_offsets_aligned.device
        handle = stream.cuda_stream if stream is not None else torch.cuda.current_stream(device).cuda_stream
        _run_compiled(kernel, grid, handle, (*plan.memo("triton_pointers", _plan_pointers), src_ids.data_ptr(),
                                             dst_ids.data_ptr(), total, *consts.values()))
        return
    on_gpu = plan.src_offsets_aligned.device.type == "cuda"
    args = (_kernel_pointer(plan.src_base, on_gpu), _kernel_pointer(plan.dst_base, on_gpu), plan.src_offsets_aligned,
            plan.dst_offsets_aligned, src_ids, dst_ids, total)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        kernel = copy_blocks_kernel[(grid,)](*args, num_warps=num_warps, **consts)
    if isinstance(kernel, CompiledKernel):  # (the interpreter returns none: it always runs through the JIT path)
        compiled[key] = kernel


def compiled_kernel(plan: CopyPlan, stream: torch.cuda.Stream, num_warps: int = 4) -> CompiledKernel | None:
    """The plan's compiled kernel for int64 ids and tile counts below 2**31 (what `launch` takes for a transfer's
    chunks), compiled now if needed by a launch with no tiles on `stream`; None under Triton's interpreter."""
    key = (torch.int64, torch.int64, True, num_warps)
    compiled = plan.memo("triton_compiled", lambda _: {})
    if key not in compiled:
        ids = plan.src_offsets_aligned  # an int64 device tensor: never read, the launch has no tiles
        launch(plan, ids[:0], ids[:0], num_warps=num_warps, stream=stream, empty_launch=True)
    return compiled.get(key)


def launch_constants(plan: CopyPlan) -> tuple[int, tuple[int, int, int, int]]:
    """(tiles per block pair, the addresses of the plan's bases and offset tables in the kernel's argument order)."""
    return plan.memo("triton_launch_constants", _constants)[0], plan.memo("triton_pointers", _plan_pointers)


def _plan_pointers(plan: CopyPlan) -> tuple[int, int, int, int]:
    """The addresses of a plan's bases and offset tables, in the kernel's argument order."""
    return (plan.src_base.data_ptr(), plan.dst_base.data_ptr(), plan.src_offsets_aligned.data_ptr(),
            plan.dst_offsets_aligned.data_ptr())


def launch_hooks_set() -> bool:
    """Whether a Triton launch hook is set (a profiler's), or this Triton has no `knobs` to tell: launches must then
    go through Triton's own runner, which calls the hooks."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    return runtime is None or _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


def _hook_set(hook) -> bool:
    """A hook is a function or None, or in newer Tritons a chain of functions (`HookChain`), empty when unset."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _run_compiled(kernel: CompiledKernel, grid: int, stream: int, args: tuple) -> None:
    """Launch a compiled kernel over `grid` programs on raw stream `stream`: straight through its launcher when no
    Triton launch hook is set (a profiler's), else through the kernel's own runner, which calls the hooks."""
    if launch_hooks_set():
        kernel[(grid, 1, 1)](*args, stream=stream)
        return
    kernel.run(grid, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *args)


def triton_copy(
    src: PagedKVCache, dst: PagedKVCache, src_ids: torch.Tensor, dst_ids: torch.Tensor, *, max_ctas: int | None = None
) -> None:
    """Conversion backend: one Triton launch for the whole transfer (ids already validated on the host)."""
    plan = build_plan(src, dst)
    device = plan.src_offsets_aligned.device
    launch(plan, src_ids.to(device, non_blocking=True), dst_ids.to(device, non_blocking=True), max_ctas=max_ctas)
