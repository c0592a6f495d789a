"""Memory overlap: copy_blocks compares the bytes a copy reads with the bytes it writes (not ids), and describe
refuses layouts whose pieces alias each other."""
from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from kvbm.layouts import KVGeometry, LayoutError, allocate, copy_blocks, describe, presets
from kvbm.layouts.conversion import check_transfer
from kvbm.layouts.layout import ranges_overlap
from layout_oracle import fill_random, to_logical

G = KVGeometry(num_layers=2, num_kv=2, block_size=4, num_heads=2, head_dim=8, itemsize=2)


def flash_attn_and_flashinfer_over_one_buffer(n: int):
    """The same per-layer tensors read as vLLM FlashAttention [2, n, ...] and as FlashInfer [n, 2, ...]."""
    shape = (2, n, G.block_size, G.num_heads, G.head_dim)
    fa_tensors = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(G.num_layers)]
    fi_tensors = [t.view(n, 2, *shape[2:]) for t in fa_tensors]
    return presets.vllm_flash_attn(fa_tensors), presets.vllm_flashinfer(fi_tensors)


def test_two_layouts_over_one_buffer_with_different_ids_are_refused():
    fa, fi = flash_attn_and_flashinfer_over_one_buffer(4)
    # FlashAttention block 1 holds K at piece offset 1 and V at 4 + 1; FlashInfer block 0 is K 0 and V 1: offset 1
    with pytest.raises(ValueError, match=r"src block 1 .* dst block 0 .* same memory"):
        copy_blocks(fa, fi, [1], [0])
    with pytest.raises(ValueError, match=r"same memory"):
        check_transfer(fa, fi, np.array([1, 3]), np.array([0, 3]))


def test_disjoint_halves_of_one_buffer_with_equal_ids_are_accepted():
    buf = torch.empty(2, 3, G.num_layers, 2, G.block_size, G.num_heads, G.head_dim, dtype=torch.bfloat16)
    low, high = presets.block_major(buf[0]), presets.block_major(buf[1])
    fill_random(low, torch.Generator().manual_seed(1))
    fill_random(high, torch.Generator().manual_seed(2))
    before = to_logical("kvbm_staging", high)
    copy_blocks(low, high, [0, 2], [0, 2], backend="torch")
    after = to_logical("kvbm_staging", high)
    assert torch.equal(after[[0, 2]], to_logical("kvbm_staging", low)[[0, 2]])
    assert torch.equal(after[1], before[1])


def test_same_cache_overlapping_ids_still_refused_disjoint_ids_accepted():
    cache = allocate("vllm_lhbnc", G, 4, dtype=torch.bfloat16)  # blocks interleave inside each head
    with pytest.raises(ValueError, match=r"src block 1 .* dst block 1 .* same memory"):
        copy_blocks(cache, cache, [0, 1], [1, 2])
    fill_random(cache, torch.Generator().manual_seed(3))
    before = to_logical("vllm_lhbnc", cache)
    copy_blocks(cache, cache, [0], [3], backend="torch")  # blocks interleave but share no byte
    assert torch.equal(to_logical("vllm_lhbnc", cache)[3], before[0])


def element_addresses(cache, ids) -> set[int]:
    """Oracle: the byte addresses of every byte of blocks `ids`, element by element through the piece views."""
    out: set[int] = set()
    g = cache.geometry
    for layer in range(g.num_layers):
        for kv in range(g.num_kv):
            view = cache.piece_view(layer, kv)
            base = view.data_ptr()
            strides = np.array(view.stride()[1:]) * g.itemsize
            idx = np.stack(np.meshgrid(*[np.arange(n) for n in view.shape[1:]], indexing="ij"), -1).reshape(-1, 3)
            for b in ids:
                for a in base + b * view.stride()[0] * g.itemsize + idx @ strides:
                    out.update(range(int(a), int(a) + g.itemsize))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_overlap_verdict_matches_byte_oracle(seed):
    """Random layouts over one shared buffer: refused exactly when the read and written bytes intersect."""
    rng = random.Random(seed)
    g = KVGeometry(2, 2, 2, 2, 3, 2)
    elems = g.num_layers * 2 * g.piece_elems * 4
    buf = torch.zeros(elems * 2, dtype=torch.bfloat16)
    orders = ["block layer kv token head channel", "layer kv block token head channel",
              "layer head kv block token channel", "kv layer token block head channel"]
    sizes = {"block": 4, "layer": 2, "kv": 2, "token": 2, "head": 2, "channel": 3}
    verdicts = set()
    for _ in range(12):
        caches = []
        for _ in range(2):
            order = rng.choice(orders).split()
            start = rng.randrange(0, elems + 1, 3)
            t = buf[start:start + elems].view([sizes[n] for n in order])
            caches.append(describe([t], " ".join(order)))
        src, dst = caches
        s = rng.sample(range(4), 2)
        d = rng.sample(range(4), 2)
        shared = bool(element_addresses(src, s) & element_addresses(dst, d))
        try:
            check_transfer(src, dst, s, d)
            refused = False
        except ValueError as e:
            assert "same memory" in str(e)
            refused = True
        assert refused == shared, (src.name, s, d)
        verdicts.add(refused)
    assert verdicts == {True, False}


def test_ranges_overlap():
    a = np.array([0, 10, 20]), np.array([5, 15, 25])
    assert ranges_overlap(*a, np.array([5, 15]), np.array([10, 20])) is None  # touching is not overlapping
    assert ranges_overlap(*a, np.array([30, 14]), np.array([40, 16])) == (1, 1)
    assert ranges_overlap(np.array([0]), np.array([100]), np.array([50]), np.array([51])) == (0, 0)
    assert ranges_overlap(np.zeros(0, np.int64), np.zeros(0, np.int64), *a) is None


def test_disjoint_storages_skip_the_range_check():
    src = allocate("vllm_flash_attn_nhd", G, 2048, dtype=torch.bfloat16)
    dst = allocate("kvbm_staging", G, 2048, dtype=torch.bfloat16)
    ids = np.arange(2048)
    check_transfer(src, dst, ids, ids)
    start = time.perf_counter()
    for _ in range(20):
        check_transfer(src, dst, ids, ids)
    assert (time.perf_counter() - start) / 20 < 0.005


# -- describe refuses aliasing pieces ---------------------------------------------------------------------------------

def test_describe_refuses_one_tensor_for_two_layers():
    t = torch.empty(2, 4, G.block_size, G.num_heads, G.head_dim)
    with pytest.raises(LayoutError, match=r"tensors 0 \(layer 0\) and 1 \(layer 1\) share memory"):
        describe([t, t], "kv block token head channel", tensor_dims="layer")


def test_describe_refuses_overlapping_views_of_one_buffer():
    buf = torch.empty(3, 4, 2, 8)
    with pytest.raises(LayoutError, match=r"share memory"):
        describe([buf[0:2], buf[1:3]], "kv block token channel", tensor_dims="layer")
    pools = torch.empty(3, 8, 8)
    with pytest.raises(LayoutError, match=r"tensors 0 \(kv 0, layer 0\) and 2 \(kv 1, layer 0\) share memory"):
        describe([pools[0], pools[1], pools[0], pools[2]], "(block token) channel", tensor_dims="kv layer",
                 block_size=2)


def test_describe_accepts_interleaved_views_that_do_not_alias():
    # BLHNC: every layer's view spans the buffer, the layers' elements interleave without sharing one
    assert allocate("vllm_blhnc", G, 5, dtype=torch.bfloat16).num_blocks == 5
    buf = torch.empty(4, 2, 2, 8)  # [block, layer, token, channel]
    describe([buf[:, 0], buf[:, 1]], "block token channel", tensor_dims="layer")
    rows = torch.empty(9, 8)  # layer 1 is layer 0 shifted by one token row: they share rows 1..7
    with pytest.raises(LayoutError, match=r"share memory \(32 bytes apart\)"):
        describe([rows[0:8].view(4, 2, 8), rows[1:9].view(4, 2, 8)], "block token channel", tensor_dims="layer")


def test_describe_of_many_layers_stays_fast():
    g = KVGeometry(64, 2, 16, 8, 128, 2)
    views = presets._standardized_views(g, 64, torch.bfloat16, torch.device("cpu"), "BLHNC")
    start = time.perf_counter()
    cache = presets.vllm_standardized(views, "BLHNC")
    assert time.perf_counter() - start < 0.5
    assert cache.num_blocks == 64
