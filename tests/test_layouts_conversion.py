"""Property tests of the layout model and the reference conversion: every pair of presets, random geometry,
dtypes and block ids, byte-exact against an independent oracle, with poisoned destinations."""
from __future__ import annotations

import random

import pytest
import torch

from kvbm.layouts import KVGeometry, allocate, copy_blocks, presets_for
from layout_oracle import fill_random, to_logical

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.uint8, torch.float64]


def random_geometry(rng: random.Random, mla: bool) -> tuple[KVGeometry, torch.dtype]:
    dtype = rng.choice(DTYPES)
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_size = rng.choice([1, 2, 3, 16])
    if mla:
        width = rng.choice([576, 7, 64]) if dtype != torch.uint8 else rng.choice([656, 13])
        return KVGeometry(rng.randint(1, 3), 1, block_size, 1, width, itemsize), dtype
    head_dim = rng.choice([1, 5, 8, 64, 576])
    return KVGeometry(rng.randint(1, 3), 2, block_size, rng.randint(1, 3), head_dim, itemsize), dtype


def check_copy(src_name, dst_name, g, dtype, rng, gen):
    n_src, n_dst = rng.randint(1, 6), rng.randint(1, 6)
    src = allocate(src_name, g, n_src, dtype=dtype)
    dst = allocate(dst_name, g, n_dst, dtype=dtype)
    fill_random(src, gen)
    fill_random(dst, gen)  # poison: whatever was not copied must keep these bytes
    k = rng.randint(0, min(n_src, n_dst))
    src_ids = [rng.randrange(n_src) for _ in range(k)]  # repeats in the source are allowed
    dst_ids = rng.sample(range(n_dst), k)
    before = to_logical(dst_name, dst)
    copy_blocks(src, dst, src_ids, dst_ids, backend="torch")
    expected = before.clone()
    expected[dst_ids] = to_logical(src_name, src)[src_ids]
    after = to_logical(dst_name, dst)
    assert torch.equal(after, expected), f"{src_name} -> {dst_name} {g} {dtype} {src_ids}->{dst_ids}"
    return src, dst, src_ids, dst_ids


@pytest.mark.parametrize("mla", [False, True], ids=["kv", "mla"])
def test_every_preset_pair_round_trips_byte_exact(mla):
    rng = random.Random(1234 + mla)
    gen = torch.Generator().manual_seed(99 + mla)
    for _ in range(3):
        g, dtype = random_geometry(rng, mla)
        names = presets_for(g)
        for a in names:
            for b in names:
                src, dst, src_ids, dst_ids = check_copy(a, b, g, dtype, rng, gen)
                back = allocate(a, g, src.num_blocks, dtype=dtype)
                fill_random(back, gen)
                before = to_logical(a, back)
                copy_blocks(dst, back, dst_ids, list(range(len(dst_ids))), backend="torch")
                expected = before.clone()
                expected[: len(dst_ids)] = to_logical(a, src)[src_ids]
                assert torch.equal(to_logical(a, back), expected), f"round trip {a} -> {b} -> {a}"


def test_block_size_one_and_576_head_dim():
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    g = KVGeometry(2, 2, 1, 1, 576, 2)
    for a in presets_for(g):
        check_copy(a, "kvbm_staging", g, torch.bfloat16, rng, gen)
        check_copy("kvbm_staging", a, g, torch.bfloat16, rng, gen)


def test_fp8_ds_mla_raw_bytes():
    from kvbm.layouts.presets import vllm_mla_fp8_ds

    gen = torch.Generator().manual_seed(7)
    tensors = [torch.randint(0, 256, (4, 64, 656), dtype=torch.uint8, generator=gen) for _ in range(3)]
    cache = vllm_mla_fp8_ds(tensors)
    assert cache.geometry == KVGeometry(3, 1, 64, 1, 656, 1)
    staging = allocate("kvbm_staging", cache.geometry, 2, dtype=torch.uint8)
    fill_random(staging, gen)
    copy_blocks(cache, staging, [3, 1], [0, 1], backend="torch")
    assert torch.equal(to_logical("kvbm_staging", staging), to_logical("vllm_mla_fp8_ds", cache)[[3, 1]])


def test_nan_payloads_and_negative_zero_survive():
    g = KVGeometry(1, 2, 2, 1, 4, 4)
    src = allocate("vllm_flash_attn_nhd", g, 2, dtype=torch.float32)
    bits = torch.tensor([0x7FC00001, 0xFFC12345, 0x80000000, 0x7F800000], dtype=torch.int64).to(torch.int32)
    for t in src.tensors:
        t.view(torch.int32).copy_(bits.repeat(t.numel() // 4).view(t.shape))
    dst = allocate("trtllm_pool", g, 2, dtype=torch.float32)
    copy_blocks(src, dst, [0, 1], [1, 0], backend="torch")
    assert torch.equal(to_logical("trtllm_pool", dst)[[1, 0]], to_logical("vllm_flash_attn_nhd", src))
