"""Bad input gets a clear error and writes nothing; presets reject tensors that do not match them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvbm.layouts import KVGeometry, LayoutError, allocate, copy_blocks, describe, presets
from layout_oracle import fill_random, to_logical

G = KVGeometry(num_layers=2, num_kv=2, block_size=4, num_heads=2, head_dim=8, itemsize=2)


@pytest.fixture
def pair():
    gen = torch.Generator().manual_seed(3)
    src = allocate("vllm_flash_attn_nhd", G, 4, dtype=torch.bfloat16)
    dst = allocate("kvbm_staging", G, 3, dtype=torch.bfloat16)
    fill_random(src, gen)
    fill_random(dst, gen)
    return src, dst, to_logical("kvbm_staging", dst)


def assert_untouched(dst, before):
    assert torch.equal(to_logical("kvbm_staging", dst), before)


@pytest.mark.parametrize(
    "src_ids, dst_ids, exc, match",
    [
        ([0, 4], [0, 1], IndexError, r"src_ids holds 4, out of range for a cache of 4 blocks"),
        ([0, -1], [0, 1], IndexError, r"src_ids holds -1"),
        ([0, 1], [0, 3], IndexError, r"dst_ids holds 3, out of range for a cache of 3 blocks"),
        ([0, 1], [2, 2], ValueError, r"dst_ids holds duplicates"),
        ([0, 1, 2], [0, 1], ValueError, r"same length, got 3 and 2"),
        ([0.0, 1.0], [0, 1], TypeError, r"src_ids must be integers"),
        (torch.tensor([0.0, 1.0]), [0, 1], TypeError, r"src_ids must be integers, got a tensor of dtype torch.float32"),
        ([0, 1], [True, False], TypeError, r"dst_ids must be integers"),
        ([0, 1], ["0", "1"], TypeError, r"dst_ids must be integers"),
        ([[0], [1]], [0, 1], ValueError, r"one-dimensional"),
    ],
)
def test_bad_ids_raise_and_write_nothing(pair, src_ids, dst_ids, exc, match):
    src, dst, before = pair
    with pytest.raises(exc, match=match):
        copy_blocks(src, dst, src_ids, dst_ids)
    assert_untouched(dst, before)


def test_ids_accept_numpy_and_tensors(pair):
    src, dst, _ = pair
    copy_blocks(src, dst, np.array([3, 0], dtype=np.int32), torch.tensor([1, 2], dtype=torch.int16))
    assert torch.equal(to_logical("kvbm_staging", dst)[[1, 2]], to_logical("vllm_flash_attn_nhd", src)[[3, 0]])


def test_geometry_mismatch(pair):
    src, _, _ = pair
    other = allocate("kvbm_staging", KVGeometry(2, 2, 4, 2, 16, 2), 3, dtype=torch.bfloat16)
    fill_random(other, torch.Generator().manual_seed(1))
    before = to_logical("kvbm_staging", other)
    with pytest.raises(LayoutError, match=r"geometry mismatch .*head_dim: 8 vs 16"):
        copy_blocks(src, other, [0], [0])
    assert torch.equal(to_logical("kvbm_staging", other), before)


def test_dtype_mismatch(pair):
    src, _, _ = pair
    other = allocate("kvbm_staging", G, 3, dtype=torch.float16)
    fill_random(other, torch.Generator().manual_seed(1))
    before = to_logical("kvbm_staging", other)
    with pytest.raises(LayoutError, match=r"dtype mismatch: src vllm_flash_attn_nhd is torch.bfloat16, dst kvbm_staging is torch.float16"):
        copy_blocks(src, other, [0], [0])
    assert torch.equal(to_logical("kvbm_staging", other), before)


def test_tensors_on_different_devices_rejected():
    a = torch.empty(2, 3, 4, 2, 8, dtype=torch.bfloat16)
    b = torch.empty(2, 3, 4, 2, 8, dtype=torch.bfloat16, device="meta")
    with pytest.raises(LayoutError, match=r"tensor 1: device expected cpu .*got meta"):
        presets.vllm_flash_attn([a, b])


def test_caches_on_unsupported_device_pair(pair):
    src, dst, before = pair
    meta = allocate("kvbm_staging", G, 3, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match=r"cannot copy from device cpu to device meta"):
        copy_blocks(src, meta, [0], [0])
    assert_untouched(dst, before)


def test_self_copy_with_overlapping_ids(pair):
    src, _, _ = pair
    before = to_logical("vllm_flash_attn_nhd", src)
    with pytest.raises(ValueError, match=r"same memory"):
        copy_blocks(src, src, [0, 1], [1, 2])
    assert torch.equal(to_logical("vllm_flash_attn_nhd", src), before)
    copy_blocks(src, src, [0], [3])  # disjoint ids within one cache are fine
    assert torch.equal(to_logical("vllm_flash_attn_nhd", src)[3], before[0])


def test_unknown_backend(pair):
    src, dst, before = pair
    with pytest.raises(ValueError, match=r"unknown backend 'nope'"):
        copy_blocks(src, dst, [0], [0], backend="nope")
    assert_untouched(dst, before)


def test_preset_rejects_wrong_strides():
    nhd = [torch.empty(2, 3, 4, 2, 8) for _ in range(2)]
    with pytest.raises(LayoutError, match=r"expected strides \(192, 64, 8, 32, 1\) .*got \(192, 64, 16, 8, 1\)"):
        presets.vllm_flash_attn(nhd, "HND")


def test_preset_rejects_wrong_rank_and_width_and_dtype():
    with pytest.raises(LayoutError, match=r"expected 5 dimensions, got shape \(3, 4, 8\)"):
        presets.vllm_flash_attn([torch.empty(3, 4, 8)])
    with pytest.raises(LayoutError, match=r"latent width expected 576, got 512"):
        presets.vllm_mla([torch.empty(3, 4, 512)])
    with pytest.raises(LayoutError, match=r"dtype expected torch.uint8"):
        presets.vllm_mla_fp8_ds([torch.empty(3, 4, 656)])
    with pytest.raises(LayoutError, match=r"tensor 1: shape expected \(2, 3, 4, 2, 8\) .*got \(2, 5, 4, 2, 8\)"):
        presets.vllm_flash_attn([torch.empty(2, 3, 4, 2, 8), torch.empty(2, 5, 4, 2, 8)])


@pytest.mark.parametrize("order", ["LBNHC", "BLNHC"])
def test_standardized_preset_takes_padded_blocks(order):
    """vLLM strides a block past its own extent (a page padded to a larger one; a hybrid model's smaller group
    packed in the largest group's block): the views are described with that block stride, every element where the
    views hold it; a stride below the extent is refused."""
    layers, blocks, heads, tokens, width = 2, 3, 2, 4, 16
    page = heads * tokens * width
    stride = page + 24 if order == "LBNHC" else layers * page + 40
    buf = torch.randn(layers * blocks * stride).to(torch.bfloat16)
    offset = (lambda layer: layer * blocks * stride) if order == "LBNHC" else (lambda layer: layer * page)

    def views(block_stride):
        return [torch.as_strided(buf, (blocks, heads, tokens, width), (block_stride, width, heads * width, 1),
                                 offset(layer)) for layer in range(layers)]

    cache = presets.vllm_standardized(views(stride), order)
    assert cache.geometry == G and cache.layout.stride["block"] == stride
    for layer, view in enumerate(views(stride)):
        for kv in range(2):
            expected = view[..., kv * 8:(kv + 1) * 8].permute(0, 2, 1, 3)  # [block, token, head, channel]
            assert torch.equal(cache.piece_view(layer, kv), expected)
    with pytest.raises(LayoutError, match=r"overlap|view expected strides"):
        presets.vllm_standardized(views(page - width), order)


def test_standardized_preset_takes_padded_layer_pages():
    """In a block-outermost order vLLM pads each layer's page inside the block (a Mamba state page padded to the
    attention page): the views are described with that layer stride, every element where the views hold it; a
    layer stride below the page is refused."""
    layers, blocks, heads, tokens, width = 2, 3, 2, 4, 16
    page = heads * tokens * width
    padded = page + 40
    buf = torch.randn(blocks * layers * padded).to(torch.bfloat16)

    def views(layer_stride):
        return [torch.as_strided(buf, (blocks, heads, tokens, width), (layers * padded, width, heads * width, 1),
                                 layer * layer_stride) for layer in range(layers)]

    cache = presets.vllm_standardized(views(padded), "BLNHC")
    assert cache.geometry == G and cache.layout.stride["block"] == layers * padded
    for layer, view in enumerate(views(padded)):
        for kv in range(2):
            assert torch.equal(cache.piece_view(layer, kv), view[..., kv * 8:(kv + 1) * 8].permute(0, 2, 1, 3))
    with pytest.raises(LayoutError, match=r"share memory"):
        presets.vllm_standardized(views(page - width), "BLNHC")


def test_standardized_preset_checks_view_offsets():
    cache = allocate("vllm_lbnhc", G, 3, dtype=torch.bfloat16)
    views = list(cache.tensors)
    with pytest.raises(LayoutError, match=r"layer 1 view expected at element offset"):
        presets.vllm_standardized([views[1], views[0]], "LBNHC")
    with pytest.raises(LayoutError, match=r"layer 0 view expected strides"):
        presets.vllm_standardized(views, "BLNHC")
    with pytest.raises(LayoutError, match=r"order expected one of"):
        presets.vllm_standardized(views, "XYZ")


def test_describe_without_preset_matches_preset():
    """A layout described from shape and strides alone behaves exactly like the preset."""
    gen = torch.Generator().manual_seed(11)
    pool = torch.empty(5, 2, 2, 2, 4, 8, dtype=torch.float16)  # TensorRT-LLM pool order
    generic = describe([pool], "block layer kv head token channel")
    fill_random(generic, gen)
    staging = allocate("kvbm_staging", generic.geometry, 5, dtype=torch.float16)
    copy_blocks(generic, staging, range(5), range(5))
    assert torch.equal(to_logical("kvbm_staging", staging), to_logical("trtllm_pool", presets.trtllm_pool(pool)))


@pytest.mark.parametrize(
    "shape, dims, kwargs, match",
    [
        ((2, 3, 4), "block token", {}, r"name 2 dimensions, but the tensors have 3"),
        ((2, 3, 4), "block token chanel", {}, r"unknown dimension 'chanel'"),
        ((2, 3, 4), "block token token", {}, r"named twice"),
        ((2, 3, 4), "block head channel", {}, r"must name block, token and channel"),
        ((2, 12, 4), "block (token head) channel", {}, r"sizes of \['token', 'head'\] are unknown"),
        ((2, 10, 4), "block (token head) channel", {"block_size": 3}, r"not divisible"),
        ((2, 3, 4), "block (token channel", {}, r"unbalanced"),
    ],
)
def test_describe_rejects_malformed(shape, dims, kwargs, match):
    with pytest.raises(LayoutError, match=match):
        describe([torch.empty(shape)], dims, **kwargs)


def test_describe_rejects_aliasing_strides():
    t = torch.empty(4, 8).as_strided((4, 3, 8), (8, 0, 1))
    with pytest.raises(LayoutError, match=r"overlap in memory"):
        describe([t], "block token channel")


def test_describe_needs_tensor_dims_for_lists():
    with pytest.raises(LayoutError, match=r"2 tensors given but tensor_dims is empty"):
        describe([torch.empty(2, 3, 4), torch.empty(2, 3, 4)], "block token channel")
