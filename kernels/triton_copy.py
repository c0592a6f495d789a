"""Triton gather/scatter kernel: copy many blocks x layers x K/V between any two layouts in one launch.

Gather (engine layout -> contiguous staging) and scatter (staging -> engine layout) are the same kernel with the
roles swapped, and so is a permuting copy (HND -> NHD): each program copies one tile of one (block pair, piece)
box, computing both addresses from the block ids, the per-piece offset tables and the strides of the `CopyPlan`.
Dimension permutations are fused into the same pass; tails are masked; ids are validated on the host before launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvbm.layouts import PagedKVCache

from .copy_plan import CopyPlan, build_plan

#: Bytes one program moves per tile: large enough to keep many 16-byte accesses in flight per thread.
TILE_BYTES = 16384


@triton.jit
def copy_blocks_kernel(
    src_ptr, dst_ptr, src_piece_off, dst_piece_off, src_ids, dst_ids,
    num_pieces, src_block_stride, dst_block_stride,
    d1, d2, s0, s1, t0, t1, s2, t2, rows, col_tiles, tiles_per_piece, total_tiles,
    ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Tiles are numbered (block pair, piece, row tile, column tile); program k copies tiles k, k + grid, ...

    With a full grid each program copies one tile; a capped grid (the CTA-cap knob) loops.
    """
    for t in range(tl.program_id(0), total_tiles, tl.num_programs(0)):
        pair = t // tiles_per_piece
        tile = t - pair * tiles_per_piece
        j = pair // num_pieces
        p = pair - j * num_pieces
        src_off = tl.load(src_piece_off + p) + tl.load(src_ids + j) * src_block_stride
        dst_off = tl.load(dst_piece_off + p) + tl.load(dst_ids + j) * dst_block_stride
        row_tile = tile // col_tiles
        col_tile = tile - row_tile * col_tiles
        r = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
        c = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
        r0 = r // d1
        r1 = r - r0 * d1
        # Row starts are multiples of ALIGN units (checked on the host): lets the compiler issue 16-byte accesses.
        src_row = tl.multiple_of(src_off + r0.to(tl.int64) * s0 + r1.to(tl.int64) * s1, ALIGN)
        dst_row = tl.multiple_of(dst_off + r0.to(tl.int64) * t0 + r1.to(tl.int64) * t1, ALIGN)
        mask = (r < rows)[:, None] & (c < d2)[None, :]
        x = tl.load(src_ptr + src_row[:, None] + (c * s2)[None, :], mask=mask)
        tl.store(dst_ptr + dst_row[:, None] + (c * t2)[None, :], x, mask=mask)


def tile_shape(plan: CopyPlan) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): columns cover the dense row up to a tile, rows fill the rest of it."""
    tile_units = max(TILE_BYTES // plan.unit, 16)
    block_c = min(triton.next_power_of_2(plan.row_len), tile_units)
    block_r = min(triton.next_power_of_2(plan.rows), max(tile_units // block_c, 1))
    return block_r, block_c


def launch(
    plan: CopyPlan,
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
    *,
    max_ctas: int | None = None,
    num_warps: int = 4,
    src_base=None,
    dst_base=None,
) -> None:
    """Launch the copy for validated int64 id tensors already on the kernel's device, on the current stream.

    `max_ctas` caps the grid (programs then loop over tiles); None launches one program per tile.
    `src_base` / `dst_base` replace the plan's base pointers (a mapped pointer of pinned host memory, say).
    """
    n = int(src_ids.numel())
    if n == 0:
        return
    (d0, s0, t0), (d1, s1, t1), (d2, s2, t2) = plan.dims
    block_r, block_c = tile_shape(plan)
    rows = d0 * d1
    col_tiles = triton.cdiv(d2, block_c)
    tiles_per_piece = triton.cdiv(rows, block_r) * col_tiles
    total = n * plan.num_pieces * tiles_per_piece
    grid = (total if max_ctas is None else max(1, min(total, max_ctas)),)
    copy_blocks_kernel[grid](
        plan.src_base if src_base is None else src_base, plan.dst_base if dst_base is None else dst_base,
        plan.src_piece_offsets, plan.dst_piece_offsets, src_ids, dst_ids,
        plan.num_pieces, plan.src_block_stride, plan.dst_block_stride,
        d1, d2, s0, s1, t0, t1, s2, t2, rows, col_tiles, tiles_per_piece, total,
        ALIGN=plan.align, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )


def triton_copy(
    src: PagedKVCache, dst: PagedKVCache, src_ids: torch.Tensor, dst_ids: torch.Tensor, *, max_ctas: int | None = None
) -> None:
    """Conversion backend: one Triton launch for the whole transfer (ids already validated on the host)."""
    plan = build_plan(src, dst)
    device = plan.src_piece_offsets.device
    launch(plan, src_ids.to(device, non_blocking=True), dst_ids.to(device, non_blocking=True), max_ctas=max_ctas)
