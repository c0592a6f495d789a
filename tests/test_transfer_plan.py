"""The host-side planning of the transfer paths, on CPU: runs of host blocks, the staging order of a host cache,
DMA piece decomposition (checked by executing the pieces with plain memory copies) and the "auto" rule."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from kvbm.kernels.copy_plan import build_plan
from kvbm.kernels.host_runs import HostRuns
from kvbm.kernels.transfer import _inner_order, choose_path, chunk_starts, dense_pieces
from kvbm.layouts import KVGeometry, allocate, block_major, copy_blocks, describe
from layout_oracle import fill_random, to_logical

G = KVGeometry(num_layers=2, num_kv=2, block_size=4, num_heads=2, head_dim=8, itemsize=2)


def runs(ids, chunk: int | None = None) -> list[tuple[int, int, int]]:
    """(position, first id, length) of every run HostRuns finds with chunks of `chunk` positions, read back from its
    pieces (1-byte blocks at address = id, staged from offset 0)."""
    ids = np.asarray(ids, dtype=np.int64)
    starts = list(range(0, ids.size, chunk or ids.size))
    found = HostRuns(ids, starts, 0, 1, 1)
    out = []
    for c, start in enumerate(starts):
        hosts, stage, sizes, rows = found.chunk(c, 0)
        assert rows.tolist() == [1] * rows.size  # a dense host cache: every run one row
        out += [(start + st, h, z) for h, st, z in zip(hosts.tolist(), stage.tolist(), sizes.tolist())]
    return out


def test_runs_split_consecutive_ids():
    assert runs([4, 5, 6, 9, 2, 3]) == [(0, 4, 3), (3, 9, 1), (4, 2, 2)]
    assert runs([7]) == [(0, 7, 1)]
    assert runs([3, 2, 1]) == [(0, 3, 1), (1, 2, 1), (2, 1, 1)]


@pytest.mark.parametrize("n", [2, 7, 64, 65, 300])
def test_runs_agree_with_a_plain_scan(n):
    rng = np.random.default_rng(n)
    ids = np.cumsum(rng.choice([1, 1, 1, 2, -5], size=n)) + 100
    expected, pos = [], 0
    while pos < n:
        end = pos + 1
        while end < n and ids[end] == ids[end - 1] + 1:
            end += 1
        expected.append((pos, int(ids[pos]), end - pos))
        pos = end
    assert runs(ids) == expected


def scan_runs(ids, chunk=None) -> list[tuple[int, int, int]]:
    """Runs of consecutive ids found one id at a time, breaking at every multiple of `chunk` positions."""
    out, pos = [], 0
    while pos < len(ids):
        end = pos + 1
        while end < len(ids) and ids[end] == ids[end - 1] + 1 and (chunk is None or end % chunk):
            end += 1
        out.append((pos, int(ids[pos]), end - pos))
        pos = end
    return out


@pytest.mark.parametrize("n,chunk", [(1, 1), (5, 1), (64, 7), (200, 64), (300, 300)])
def test_runs_never_cross_a_chunk(n, chunk):
    rng = np.random.default_rng(n + chunk)
    ids = np.cumsum(rng.choice([1, 1, 1, 1, 2, -9], size=n)) + 500
    assert runs(ids, chunk) == scan_runs(ids.tolist(), chunk)


@pytest.mark.parametrize("stride_blocks", [1, 5 / 3])  # a block-major host cache, a layer view of one
@pytest.mark.parametrize("n,per_chunk,direction", [(1, 4, "d2h"), (9, 4, "h2d"), (64, 64, "d2h"), (130, 64, "d2h"),
                                                   (130, 64, "h2d"), (300, 16, "h2d"), (7, 1, "d2h")])
def test_host_runs_give_each_chunk_its_blocks_in_staging_order(n, per_chunk, direction, stride_blocks):
    """Every block of chunk c lands at staging offset (its position in the chunk) x block bytes, from or to its host
    block's address; the pieces of a chunk tile its staging bytes exactly; a run is one dense row in a block-major
    cache, one row per block (host pitch = the stride, staging pitch = the block) in a layer view."""
    rng = np.random.default_rng(n)
    ids = np.cumsum(rng.choice([1, 1, 1, 3, -7], size=n)) + 50
    base, bb, slot = 1 << 40, 4096 * 3, 1 << 32
    stride = int(bb * stride_blocks)
    starts = chunk_starts(n, per_chunk, direction)
    found = HostRuns(ids, starts, base, stride, bb)
    for c, (start, end) in enumerate(zip(starts, starts[1:] + [n])):
        hosts, stage, widths, rows = found.chunk(c, slot)
        assert hosts.dtype == stage.dtype == widths.dtype == rows.dtype == np.uint64
        blocks = []
        for h, st, w, r in zip(hosts.tolist(), stage.tolist(), widths.tolist(), rows.tolist()):
            assert (st - slot) % bb == 0 and (h - base) % stride == 0
            per_row = w // bb if stride == bb else 1
            assert (r == 1 and w % bb == 0) if stride == bb else (w == bb and r >= 1)
            blocks += [((st - slot) // bb + k, (h - base) // stride + k) for k in range(per_row * r)]
        assert blocks == [(i, int(ids[start + i])) for i in range(end - start)]
        assert len(hosts) == len(scan_runs(ids[start:end].tolist()))  # one piece per run: no run split


def test_layer_view_runs_are_cut_at_max_rows():
    """A run of a layer view longer than `MAX_ROWS` blocks is cut into pieces of at most that many rows."""
    from kvbm.kernels import host_runs

    n = host_runs.MAX_ROWS * 2 + 5
    found = HostRuns(np.arange(n, dtype=np.int64) + 3, [0], 0, 8, 4)
    hosts, stage, widths, rows = found.chunk(0, 0)
    assert rows.tolist() == [host_runs.MAX_ROWS, host_runs.MAX_ROWS, 5]
    assert hosts.tolist() == [24, 24 + 8 * host_runs.MAX_ROWS, 24 + 16 * host_runs.MAX_ROWS]
    assert stage.tolist() == [0, 4 * host_runs.MAX_ROWS, 8 * host_runs.MAX_ROWS] and set(widths.tolist()) == {4}


@pytest.mark.parametrize("bad", [[], [1], [0, 0], [0, 5, 3], [0, 9]])
def test_host_runs_refuse_bad_chunk_starts(bad):
    with pytest.raises(ValueError, match="chunk_starts must increase from 0"):
        HostRuns(np.arange(9, dtype=np.int64), bad, 0, 1, 1)


@pytest.mark.parametrize("n,per_chunk", [(1, 64), (64, 64), (65, 64), (256, 64), (1000, 29), (5, 1), (20, 3)])
def test_chunk_starts_fill_slots_with_short_chunks_at_the_exposed_ends(n, per_chunk):
    """Chunks cover [0, n) in order, none larger than a slot; a transfer of several chunks starts with a short one of
    per_chunk // 8 blocks (at least one), an onboard also ends with one (at most that long); the others but the
    remainder are whole slots."""
    short = max(1, per_chunk // 8)
    for direction in ("d2h", "h2d"):
        starts = chunk_starts(n, per_chunk, direction)
        sizes = np.diff(starts + [n])
        assert starts[0] == 0 and (sizes > 0).all() and (sizes <= per_chunk).all()
        if n <= per_chunk:
            assert starts == [0]
        elif direction == "d2h":
            assert sizes[0] == short and (sizes[1:-1] == per_chunk).all()
        else:
            assert sizes[0] == short and sizes[-1] <= short and (sizes[1:-2] == per_chunk).all()


@pytest.mark.parametrize("per_chunk,direction", [(0, "d2h"), (-3, "h2d"), (8, "up")])
def test_chunk_starts_refuse_bad_arguments(per_chunk, direction):
    with pytest.raises(ValueError, match="per_chunk >= 1 and direction"):
        chunk_starts(100, per_chunk, direction)


@pytest.mark.parametrize("order", [("layer", "kv", "token", "head", "channel"), ("head", "layer", "kv", "token", "channel"),
                                   ("layer", "kv", "head", "token", "channel")])
def test_inner_order_read_back_from_strides(order):
    sizes = {"layer": 2, "kv": 2, "token": 4, "head": 3, "channel": 8}
    cache = block_major(torch.empty(5, *[sizes[n] for n in order], dtype=torch.float16), order)
    assert _inner_order(cache) == order


def test_inner_order_refuses_engine_layouts():
    with pytest.raises(ValueError, match="must be block-major"):
        _inner_order(allocate("vllm_flash_attn_nhd", G, 2, dtype=torch.float16))


def test_inner_order_is_structural_not_by_name():
    """Caches whose whole blocks are dense runs are block-major whatever their layout is called, also with padding
    between blocks (a layer view keeps the full block stride: each block is then its own DMA piece); a layout named
    like block_major whose blocks have gaps inside or whose pieces are split over tensors is refused."""
    assert _inner_order(allocate("vllm_cross_layer", G, 3, dtype=torch.float16)) == (
        "layer", "kv", "token", "head", "channel")
    assert _inner_order(allocate("trtllm_pool", G, 3, dtype=torch.float16)) == (
        "layer", "kv", "head", "token", "channel")
    dims = "block layer kv token head channel"
    padded_channels = torch.empty(3, 2, 2, 4, 2, 9, dtype=torch.float16)[..., :8]  # a gap after every row
    padded_blocks = torch.empty(3, 2 * 2 * 4 * 2 * 8 + 16, dtype=torch.float16)[:, :-16].view(3, 2, 2, 4, 2, 8)
    assert _inner_order(describe([padded_blocks], dims, name="kvbm_staging")) == (
        "layer", "kv", "token", "head", "channel")
    for bad in (describe([padded_channels], dims, name="block_major_gaps"),
                describe([torch.empty(3, 2, 4, 2, 8, dtype=torch.float16) for _ in range(2)],
                         "block kv token head channel", tensor_dims="layer", name="block_major_split")):
        with pytest.raises(ValueError, match=f"must be block-major.*{bad.name}"):
            _inner_order(bad)


def run_pieces(srcs, dsts, sizes):
    for s, d, n in zip(srcs.tolist(), dsts.tolist(), sizes.tolist()):
        ctypes.memmove(d, s, n)


@pytest.mark.parametrize("preset", ["vllm_flash_attn_nhd", "vllm_flash_attn_hnd", "trtllm_pool", "vllm_lbnhc"])
def test_dense_pieces_move_exactly_the_blocks(preset):
    gen = torch.Generator().manual_seed(5)
    src = allocate(preset, G, 6, dtype=torch.bfloat16)
    dst = allocate("kvbm_staging", G, 4, dtype=torch.bfloat16)
    ref = allocate("kvbm_staging", G, 4, dtype=torch.bfloat16)
    fill_random(src, gen)
    fill_random(dst, gen)
    ref.tensors[0].copy_(dst.tensors[0])
    s, d = np.array([5, 0, 3]), np.array([2, 0, 1])
    srcs, dsts, sizes = dense_pieces(build_plan(src, dst), src, dst, s, d)
    run_pieces(srcs, dsts, sizes)
    copy_blocks(src, ref, s, d, backend="torch")
    assert torch.equal(to_logical("kvbm_staging", dst), to_logical("kvbm_staging", ref))


def test_auto_rule_picks_dma_only_for_whole_dense_blocks():
    big = KVGeometry(16, 2, 16, 8, 128, 2)  # 1 MiB blocks
    pool = allocate("trtllm_pool", big, 2, dtype=torch.bfloat16)
    order = ("layer", "kv", "head", "token", "channel")
    host_same = block_major(torch.empty(2, 16, 2, 8, 16, 128, dtype=torch.bfloat16), order)
    host_nhd = allocate("kvbm_staging", big, 2, dtype=torch.bfloat16)
    assert choose_path(pool, host_same) == "dma"
    assert choose_path(pool, host_nhd) == "staged"  # permuted: needs the kernel
    fa = allocate("vllm_flash_attn_nhd", big, 2, dtype=torch.bfloat16)
    assert choose_path(fa, host_nhd) == "staged"  # pieces scattered over per-layer tensors
    small = allocate("trtllm_pool", G, 2, dtype=torch.bfloat16)
    small_host = block_major(torch.empty(2, 2, 2, 2, 4, 8, dtype=torch.bfloat16), order)
    assert choose_path(small, small_host) == "staged"  # dense but under DMA_MIN_PIECE_BYTES


def test_engine_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU refusal does not apply")
    from kvbm.kernels.transfer import TransferEngine

    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        TransferEngine()


def test_plan_memo_computes_once_per_plan():
    src = allocate("vllm_flash_attn_nhd", G, 4, dtype=torch.float16)
    dst = allocate("kvbm_staging", G, 4, dtype=torch.float16)
    plan, calls = build_plan(src, dst), []
    assert plan.memo("probe", lambda p: calls.append(p) or len(calls)) == 1
    assert plan.memo("probe", lambda p: calls.append(p) or len(calls)) == 1
    assert calls == [plan] and build_plan(src, dst) is plan  # kept with the cached plan
    assert plan.memo("other", lambda p: p.num_pieces) == G.num_layers * G.num_kv
