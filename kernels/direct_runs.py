"""Blocks moved between a GPU cache and a layer view of a host cache by the copy engines alone: no staging buffer,
no gather or scatter kernel.

Where every (layer, kv) piece of a block is made of rows dense in both caches, at least `MIN_ROW_BYTES` wide (a layer
view of a block-major host cache against vLLM's FlashAttention layout: one row per piece, 32 KiB for
Llama-3.1-8B), a run of blocks whose source and destination ids both count up moves as one 2-D copy per row of a
block (`copy_2d`): as many rows as the run has blocks, at the two caches' block strides. A layer-wise onboard's
blocks then land in the engine's cache with no SM work, so nothing waits behind the model's kernels that run
beside it. Runs shorter than `MIN_RUN` blocks, and blocks in no run, stay on the staged path (each 2-D copy is a
driver call per row).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .copy_plan import CopyPlan

__all__ = ["MIN_ROW_BYTES", "MIN_RUN", "RowCopies", "row_copies", "split_runs"]

#: Narrowest row moved by 2-D copies.
MIN_ROW_BYTES = 16 << 10
#: Fewest blocks of a run moved by 2-D copies.
MIN_RUN = 16


@dataclass(frozen=True)
class RowCopies:
    """The rows of a block pair: their addresses in block 0 of each cache (uint64), their width, and the caches'
    block strides in bytes (the pitches of a run's 2-D copies)."""

    src_rows: np.ndarray
    dst_rows: np.ndarray
    width: int
    src_pitch: int
    dst_pitch: int

    def runs(self, s: np.ndarray, d: np.ndarray, starts: np.ndarray, lengths: np.ndarray
             ) -> list[tuple[int, int, int]]:
        """(source address, destination address, rows) of every 2-D copy of the runs of blocks at positions
        ``starts`` (lengths ``lengths``) of the id arrays ``s`` / ``d``: one per run and row."""
        out = []
        for start, m in zip(starts.tolist(), lengths.tolist()):
            src = self.src_rows + np.uint64(int(s[start]) * self.src_pitch)
            dst = self.dst_rows + np.uint64(int(d[start]) * self.dst_pitch)
            out += [(a, b, m) for a, b in zip(src.tolist(), dst.tolist())]
        return out


def row_copies(plan: CopyPlan) -> RowCopies | None:
    """The `RowCopies` of a cache pair's plan, or None where its rows are not dense in both caches or narrower than
    `MIN_ROW_BYTES`."""
    (d0, s0, t0), (d1, s1, t1), (d2, s2, t2) = plan.dims
    width = d2 * plan.unit
    if s2 != 1 or t2 != 1 or width < MIN_ROW_BYTES:
        return None
    r0, r1 = np.divmod(np.arange(d0 * d1, dtype=np.int64), d1)
    so = np.asarray(plan.src_offsets_host, dtype=np.int64)[:, None]
    do = np.asarray(plan.dst_offsets_host, dtype=np.int64)[:, None]
    src = plan.src_base.data_ptr() + (so + r0 * s0 + r1 * s1).reshape(-1) * plan.unit
    dst = plan.dst_base.data_ptr() + (do + r0 * t0 + r1 * t1).reshape(-1) * plan.unit
    return RowCopies(src.astype(np.uint64), dst.astype(np.uint64), width, plan.src_block_stride * plan.unit,
                     plan.dst_block_stride * plan.unit)


def split_runs(s: np.ndarray, d: np.ndarray, min_run: int = MIN_RUN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of at least ``min_run`` positions where both ``s`` and ``d`` count up by one: (their starts, their
    lengths, the positions in no such run)."""
    n = s.size
    cut = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    starts = np.concatenate(([0], cut))
    lengths = np.diff(np.concatenate((starts, [n])))
    long = lengths >= min_run
    rest = np.flatnonzero(np.repeat(~long, lengths))
    return starts[long], lengths[long], rest
