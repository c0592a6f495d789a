"""Named layouts of the engines' paged KV caches, checked against the tensors they are given.

Each preset knows the logical dimension order an engine hands over and the physical order it allocates in; it
checks every tensor's shape, strides, dtype and device against that and raises `LayoutError` naming the expected
and the actual value. `allocate(preset, geometry, num_blocks, ...)` makes tensors exactly as the engine would, for
staging buffers, tests and benchmarks. Layouts without a preset are described with `describe` directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .geometry import KVGeometry
from .layout import LayoutError, PagedKVCache, describe

#: The standardized vLLM layouts: letters name the physical order of L(ayer), B(lock), H(ead), N (token) and
#: C (channel, with K and V fused per token per head as [2, head_dim]).
STANDARDIZED_ORDERS: tuple[str, ...] = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
_LETTER = {"L": "layer", "B": "block", "H": "head", "N": "token", "C": "channel"}

#: Inner order of KVBM's fully contiguous block-major staging layout.
STAGING_ORDER: tuple[str, ...] = ("layer", "kv", "token", "head", "channel")


def _contiguous_strides(sizes: Sequence[int]) -> list[int]:
    strides, acc = [], 1
    for n in reversed(sizes):
        strides.append(acc)
        acc *= n
    return strides[::-1]


def _expect_physical_order(tensors: Sequence[torch.Tensor], order: Sequence[int], preset: str) -> None:
    """Check every tensor is laid out densely in memory in the given order of its logical dimensions."""
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise LayoutError(f"{preset}: tensor {i} expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(order):
            raise LayoutError(f"{preset}: tensor {i} expected {len(order)} dimensions, got shape {tuple(t.shape)}")
        physical = _contiguous_strides([t.shape[d] for d in order])
        expected = [0] * len(order)
        for d, s in zip(order, physical):
            expected[d] = s
        if tuple(expected) != t.stride():
            raise LayoutError(
                f"{preset}: tensor {i} of shape {tuple(t.shape)} expected strides {tuple(expected)} "
                f"(physical dimension order {tuple(order)}), got {t.stride()}"
            )


def _as_list(tensors: Sequence[torch.Tensor] | dict | torch.Tensor, preset: str) -> list[torch.Tensor]:
    if isinstance(tensors, dict):
        return list(tensors.values())
    if isinstance(tensors, torch.Tensor):
        raise LayoutError(f"{preset}: expected a list of per-layer tensors, got one tensor of shape "
                          f"{tuple(tensors.shape)}")
    return list(tensors)


def _hnd_order(layout: str, nhd: tuple[int, ...], hnd: tuple[int, ...], preset: str) -> tuple[int, ...]:
    if layout not in ("NHD", "HND"):
        raise LayoutError(f"{preset}: layout expected 'NHD' or 'HND', got {layout!r}")
    return nhd if layout == "NHD" else hnd


def vllm_flash_attn(kv_caches: Sequence[torch.Tensor], layout: str = "NHD") -> PagedKVCache:
    """vLLM FlashAttention: per layer `[2, num_blocks, block_size, num_kv_heads, head_size]`, K blocks then V blocks.

    With `layout="HND"` the tensors are permuted views of memory ordered `[2, num_blocks, heads, block_size, head]`.
    """
    name = f"vllm_flash_attn_{layout.lower()}"
    tensors = _as_list(kv_caches, name)
    _expect_physical_order(tensors, _hnd_order(layout, (0, 1, 2, 3, 4), (0, 1, 3, 2, 4), name), name)
    return describe(tensors, "kv block token head channel", tensor_dims="layer", name=name)


def vllm_flashinfer(kv_caches: Sequence[torch.Tensor], layout: str = "NHD") -> PagedKVCache:
    """vLLM FlashInfer / Triton attention: per layer `[num_blocks, 2, block_size, num_kv_heads, head_size]`."""
    name = f"vllm_flashinfer_{layout.lower()}"
    tensors = _as_list(kv_caches, name)
    _expect_physical_order(tensors, _hnd_order(layout, (0, 1, 2, 3, 4), (0, 1, 3, 2, 4), name), name)
    return describe(tensors, "block kv token head channel", tensor_dims="layer", name=name)


def vllm_cross_layer(tensor: torch.Tensor) -> PagedKVCache:
    """vLLM cross-layer blocks: one tensor `[num_blocks, num_layers, 2, block_size, heads, head_size]`."""
    _expect_physical_order([tensor], range(6), "vllm_cross_layer")
    return describe([tensor], "block layer kv token head channel", name="vllm_cross_layer")


def vllm_standardized(kv_caches: Sequence[torch.Tensor], order: str = "LBNHC", *, latent: bool = False
                      ) -> PagedKVCache:
    """vLLM's standardized layouts, as per-layer views `[num_blocks, heads, block_size, 2 * head_dim]`.

    The views are strided into one shared buffer whose physical order is `order` (one of STANDARDIZED_ORDERS);
    K and V sit side by side in the last dimension. With ``latent`` the views are an MLA latent cache
    `[num_blocks, 1, block_size, width]` (one latent per token, no K/V split; also a page of recurrent state,
    `[num_blocks, 1, 1, bytes]`). The block stride may exceed the block's own extent (vLLM pads a page to a larger
    one, or strides a hybrid model's smaller group by the largest group's block); so may the layer stride where
    layers lie inside a block (block-outermost orders: vLLM pads each layer's page there); the dimensions outside
    follow from them. Checks each view's strides (those of dimensions of size 1 place nothing and are not
    compared) and its offset in the buffer.
    """
    name = f"vllm_{order.lower()}" if isinstance(order, str) else "vllm_standardized"
    if order not in STANDARDIZED_ORDERS:
        raise LayoutError(f"vllm_standardized: order expected one of {STANDARDIZED_ORDERS}, got {order!r}")
    views = _as_list(kv_caches, name)
    dims_text = "block head token channel" if latent else "block head token (kv channel)"
    cache = describe(views, dims_text, tensor_dims="layer", name=f"{name}_mla" if latent else name)
    g = cache.geometry
    sizes = {"layer": g.num_layers, "block": cache.num_blocks, "head": g.num_heads, "token": g.block_size,
             "channel": g.num_kv * g.head_dim}
    expected, extent = {}, 1
    layer_offset = (views[1].data_ptr() - views[0].data_ptr()) // views[0].element_size() if len(views) > 1 else 0
    for d in reversed([_LETTER[c] for c in order]):
        if d == "block":
            expected[d] = max(extent, views[0].stride(0))
        elif d == "layer" and order.index("L") > order.index("B"):  # (a layer's page, padded, inside the block)
            expected[d] = max(extent, layer_offset)
        else:
            expected[d] = extent
        extent = expected[d] * sizes[d]
    want = (expected["block"], expected["head"], expected["token"], 1)
    base = views[0].data_ptr()
    for layer, v in enumerate(views):
        if any(n > 1 and got != w for n, got, w in zip(v.shape, v.stride(), want)):
            raise LayoutError(f"{name}: layer {layer} view expected strides {want}, got {v.stride()}")
        offset = (v.data_ptr() - base) // v.element_size()
        if offset != layer * expected["layer"]:
            raise LayoutError(
                f"{name}: layer {layer} view expected at element offset {layer * expected['layer']} of the shared "
                f"buffer, got {offset}"
            )
    return cache


def vllm_mla(kv_caches: Sequence[torch.Tensor], width: int | None = 576, *, name: str = "vllm_mla") -> PagedKVCache:
    """vLLM MLA: per layer `[num_blocks, block_size, width]`, one latent per token (576 wide by default;
    `width=None` accepts any)."""
    tensors = _as_list(kv_caches, name)
    _expect_physical_order(tensors, (0, 1, 2), name)
    if width is not None and tensors[0].shape[2] != width:
        raise LayoutError(f"{name}: latent width expected {width}, got {tensors[0].shape[2]}")
    return describe(tensors, "block token channel", tensor_dims="layer", name=name)


def vllm_mla_fp8_ds(kv_caches: Sequence[torch.Tensor]) -> PagedKVCache:
    """vLLM fp8_ds_mla: per layer `[num_blocks, block_size, 656]` raw bytes (uint8) per token."""
    tensors = _as_list(kv_caches, "vllm_mla_fp8_ds")
    if tensors and isinstance(tensors[0], torch.Tensor) and tensors[0].dtype != torch.uint8:
        raise LayoutError(f"vllm_mla_fp8_ds: dtype expected torch.uint8 (raw bytes), got {tensors[0].dtype}")
    return vllm_mla(tensors, width=656, name="vllm_mla_fp8_ds")


def trtllm_pool(tensor: torch.Tensor) -> PagedKVCache:
    """TensorRT-LLM: one pool `[num_blocks, num_layers, 2, num_kv_heads, tokens_per_block, head_dim]`."""
    _expect_physical_order([tensor], range(6), "trtllm_pool")
    return describe([tensor], "block layer kv head token channel", name="trtllm_pool")


def sglang_mha(k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor], page_size: int) -> PagedKVCache:
    """SGLang MHA token pools: per layer a K and a V buffer `[num_pages * page_size, heads, head_dim]`."""
    tensors = _as_list(k_buffers, "sglang_mha") + _as_list(v_buffers, "sglang_mha")
    if len(k_buffers) != len(v_buffers):
        raise LayoutError(f"sglang_mha: expected as many V buffers as K buffers ({len(k_buffers)}), got "
                          f"{len(v_buffers)}")
    _expect_physical_order(tensors, (0, 1, 2), "sglang_mha")
    return describe(tensors, "(block token) head channel", tensor_dims="kv layer", block_size=page_size,
                    name="sglang_mha")


def block_major(tensor: torch.Tensor, inner_order: Sequence[str] = STAGING_ORDER) -> PagedKVCache:
    """Block-major staging: one dense tensor `[num_blocks, *inner_order]`; the default order is KVBM's fully
    contiguous `[block, layer, kv, token, head, channel]`. Another inner order lets a staging buffer match its
    destination's order so a copy between them needs no permutation."""
    if sorted(inner_order) != sorted(STAGING_ORDER):
        raise LayoutError(f"block_major: inner_order expected a permutation of {STAGING_ORDER}, got "
                          f"{tuple(inner_order)}")
    _expect_physical_order([tensor], range(6), "block_major")
    name = "kvbm_staging" if tuple(inner_order) == STAGING_ORDER else "block_major_" + "_".join(inner_order)
    return describe([tensor], "block " + " ".join(inner_order), name=name)


@dataclass(frozen=True)
class Preset:
    """How to allocate tensors the way an engine does for a geometry, and describe them with the preset."""

    name: str
    mla: bool
    make: Callable[[KVGeometry, int, torch.dtype, torch.device], PagedKVCache]


def _empty(shape: Sequence[int], order: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a tensor of logical `shape` whose memory is dense in the given physical order."""
    physical = torch.empty([shape[d] for d in order], dtype=dtype, device=device)
    inverse = [list(order).index(d) for d in range(len(order))]
    return physical.permute(inverse)


def _standardized_views(g: KVGeometry, n: int, dtype: torch.dtype, dev: torch.device, order: str) -> list[torch.Tensor]:
    sizes = {"L": g.num_layers, "B": n, "H": g.num_heads, "N": g.block_size, "C": 2 * g.head_dim}
    buf = torch.empty(math.prod(sizes.values()) * torch.empty((), dtype=dtype).element_size(), dtype=torch.int8,
                      device=dev).view(dtype).view([sizes[c] for c in order])
    logical = buf.permute([order.index(c) for c in "LBHNC"])
    return [logical[layer] for layer in range(g.num_layers)]


def _presets() -> dict[str, Preset]:
    def per_layer(shape_of, order, describe_fn):
        return lambda g, n, dt, dev: describe_fn([_empty(shape_of(g, n), order, dt, dev) for _ in range(g.num_layers)])

    fa = lambda g, n: (2, n, g.block_size, g.num_heads, g.head_dim)  # noqa: E731
    fi = lambda g, n: (n, 2, g.block_size, g.num_heads, g.head_dim)  # noqa: E731
    mla = lambda g, n: (n, g.block_size, g.head_dim)  # noqa: E731
    nhd, hnd = (0, 1, 2, 3, 4), (0, 1, 3, 2, 4)
    table = [
        Preset("vllm_flash_attn_nhd", False, per_layer(fa, nhd, lambda t: vllm_flash_attn(t, "NHD"))),
        Preset("vllm_flash_attn_hnd", False, per_layer(fa, hnd, lambda t: vllm_flash_attn(t, "HND"))),
        Preset("vllm_flashinfer_nhd", False, per_layer(fi, nhd, lambda t: vllm_flashinfer(t, "NHD"))),
        Preset("vllm_flashinfer_hnd", False, per_layer(fi, hnd, lambda t: vllm_flashinfer(t, "HND"))),
        Preset("vllm_cross_layer", False, lambda g, n, dt, dev: vllm_cross_layer(
            torch.empty(n, g.num_layers, 2, g.block_size, g.num_heads, g.head_dim, dtype=dt, device=dev))),
        Preset("vllm_mla", True, per_layer(mla, (0, 1, 2), lambda t: vllm_mla(t, width=None))),
        Preset("trtllm_pool", False, lambda g, n, dt, dev: trtllm_pool(
            torch.empty(n, g.num_layers, 2, g.num_heads, g.block_size, g.head_dim, dtype=dt, device=dev))),
        Preset("sglang_mha", False, lambda g, n, dt, dev: sglang_mha(
            *[[torch.empty(n * g.block_size, g.num_heads, g.head_dim, dtype=dt, device=dev)
               for _ in range(g.num_layers)] for _ in range(2)], page_size=g.block_size)),
        Preset("kvbm_staging", None, lambda g, n, dt, dev: block_major(
            torch.empty(n, g.num_layers, g.num_kv, g.block_size, g.num_heads, g.head_dim, dtype=dt, device=dev))),
        Preset("block_major_head_first", None, lambda g, n, dt, dev: block_major(
            torch.empty(n, g.num_heads, g.num_layers, g.num_kv, g.block_size, g.head_dim, dtype=dt, device=dev),
            ("head", "layer", "kv", "token", "channel"))),
    ]
    for order in STANDARDIZED_ORDERS:
        table.append(Preset(f"vllm_{order.lower()}", False,
                            lambda g, n, dt, dev, o=order: vllm_standardized(_standardized_views(g, n, dt, dev, o), o)))
    return {p.name: p for p in table}


#: Every named preset. `mla` is True for latent-only presets, False for K/V presets, None for both.
PRESETS: dict[str, Preset] = _presets()


def presets_for(geometry: KVGeometry) -> list[str]:
    """Names of the presets that can hold a cache of this geometry."""
    mla = geometry.num_kv == 1
    return [
        p.name for p in PRESETS.values()
        if p.mla is None or (p.mla == mla and (not mla or geometry.num_heads == 1))
    ]


def allocate(
    preset: str,
    geometry: KVGeometry,
    num_blocks: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> PagedKVCache:
    """Allocate an uninitialised cache of `num_blocks` blocks in the named preset's layout (as the engine would)."""
    if preset not in PRESETS:
        raise LayoutError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if preset not in presets_for(geometry):
        raise LayoutError(f"preset {preset!r} cannot hold geometry {geometry} (MLA presets need num_kv=1, num_heads=1)")
    if not isinstance(num_blocks, int) or num_blocks <= 0:
        raise LayoutError(f"num_blocks must be a positive int, got {num_blocks!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if itemsize != geometry.itemsize:
        raise LayoutError(f"dtype {dtype} has itemsize {itemsize}, geometry expects {geometry.itemsize}")
    return PRESETS[preset].make(geometry, num_blocks, dtype, torch.device(device))
