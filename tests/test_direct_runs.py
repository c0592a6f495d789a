"""The copy-engine-only moves of `kvbm.kernels.direct_runs`, on the CPU: the runs a transfer's ids split into, and
the 2-D copies of the runs' rows between a layer view of a block-major host cache and engine layouts, executed row
by row with plain memory copies and compared byte for byte with the torch reference (poisoned destinations: every
byte not named keeps its poison)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from layout_oracle import fill_random

from kvbm.kernels.copy_plan import build_plan
from kvbm.kernels.direct_runs import MIN_ROW_BYTES, row_copies, split_runs
from kvbm.layouts import KVGeometry, allocate, copy_blocks, select_layers

# one (layer, kv) piece of a block: 16 tokens x 4 heads x 128 channels x 2 bytes = 16 KiB
G = KVGeometry(num_layers=5, num_kv=2, block_size=16, num_heads=4, head_dim=128, itemsize=2)


def execute(copies, width: int, src_pitch: int, dst_pitch: int) -> None:
    """Run 2-D copies (source, destination, rows) one row at a time."""
    for src, dst, rows in copies:
        for r in range(rows):
            ctypes.memmove(dst + r * dst_pitch, src + r * src_pitch, width)


@pytest.mark.parametrize("n,min_run,want", [
    (10, 3, ([0, 5], [4, 5], [4])),  # runs 0..3 and 5..9; position 4 alone
    (10, 5, ([5], [5], [0, 1, 2, 3, 4])),
    (4, 5, ([], [], [0, 1, 2, 3])),
    (1, 1, ([0], [1], [])),
])
def test_split_runs_needs_both_ids_to_count_up(n, min_run, want):
    s = np.array([10, 11, 12, 13, 30, 40, 41, 42, 43, 44][:n])
    d = np.array([5, 6, 7, 8, 9, 2, 3, 4, 5, 6][:n])  # 13 -> 30 breaks the source run, 9 -> 2 the destination one
    starts, lengths, rest = split_runs(s, d, min_run)
    assert (starts.tolist(), lengths.tolist(), rest.tolist()) == tuple(want)


@pytest.mark.parametrize("preset", ["vllm_flash_attn_nhd", "vllm_flashinfer_nhd"])
@pytest.mark.parametrize("onboard", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_row_copies_of_runs_move_exactly_the_layers_of_the_blocks(preset, onboard, seed):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    engine = allocate(preset, G, 64, dtype=torch.bfloat16)
    host = allocate("kvbm_staging", G, 48, dtype=torch.bfloat16)
    fill_random(engine, gen)
    fill_random(host, gen)
    start, stop = sorted(rng.choice(G.num_layers + 1, 2, replace=False).tolist())
    hv, ev = select_layers(host, start, stop), select_layers(engine, start, stop)
    src, dst = (hv, ev) if onboard else (ev, hv)
    s_run, d_run = np.arange(3, 23), np.arange(20, 40)  # a run of 20 blocks, then 16 scattered ones
    s = np.concatenate([s_run, rng.choice(np.setdiff1d(np.arange(src.num_blocks), s_run), 16, replace=False)])
    d = np.concatenate([d_run, rng.choice(np.setdiff1d(np.arange(dst.num_blocks), d_run), 16, replace=False)])
    rows = row_copies(build_plan(src, dst))
    assert rows is not None and rows.width == MIN_ROW_BYTES
    want = [t.clone() for t in dst.tensors]
    reference = type(dst)(want, dst.layout)
    starts, lengths, rest = split_runs(s, d, 8)
    assert starts.tolist() == [0] and lengths.tolist()[0] >= 20
    copy_blocks(src, reference, s[:lengths[0]], d[:lengths[0]], backend="torch")
    execute(rows.runs(s, d, starts, lengths), rows.width, rows.src_pitch, rows.dst_pitch)
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(dst.tensors, want))  # bytes


def test_no_row_copies_for_narrow_or_permuted_rows():
    narrow = KVGeometry(num_layers=2, num_kv=2, block_size=16, num_heads=2, head_dim=64, itemsize=2)  # 4 KiB
    host = allocate("kvbm_staging", narrow, 4, dtype=torch.bfloat16)
    assert row_copies(build_plan(select_layers(host, 0, 1), allocate("vllm_flash_attn_nhd", narrow, 4,
                                                                      dtype=torch.bfloat16))) is None
    hnd = allocate("vllm_flash_attn_hnd", G, 4, dtype=torch.bfloat16)  # heads outside tokens: 256-byte rows
    assert row_copies(build_plan(allocate("kvbm_staging", G, 4, dtype=torch.bfloat16), hnd)) is None
