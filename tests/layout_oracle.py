"""Independent oracle for the tests: each preset's tensors read back as logical [block, layer, kv, token, head,
channel], written with plain indexing of the engine's own tensor shapes (not through kvbm's layout mapping)."""
from __future__ import annotations

import torch

from kvbm.layouts import KVGeometry, PagedKVCache
from kvbm.layouts.conversion import INT_VIEW


def raw(cache: PagedKVCache) -> list[torch.Tensor]:
    """The cache's tensors as integer views of the same bytes."""
    return [t.view(INT_VIEW[t.element_size()]) for t in cache.tensors]


def to_logical(preset: str, cache: PagedKVCache) -> torch.Tensor:
    """Copy of the cache as [block, layer, kv, token, head, channel] (integer view)."""
    t = raw(cache)
    g: KVGeometry = cache.geometry
    if preset.startswith("vllm_flash_attn"):
        return torch.stack(t).permute(2, 0, 1, 3, 4, 5).contiguous()  # [L,2,B,N,H,D]
    if preset.startswith("vllm_flashinfer"):
        return torch.stack(t).permute(1, 0, 2, 3, 4, 5).contiguous()  # [L,B,2,N,H,D]
    if preset in ("vllm_cross_layer", "kvbm_staging"):
        return t[0].contiguous()
    if preset == "trtllm_pool":
        return t[0].permute(0, 1, 2, 4, 3, 5).contiguous()  # [B,L,2,H,N,D]
    if preset == "block_major_head_first":
        return t[0].permute(0, 2, 3, 4, 1, 5).contiguous()  # [B,H,L,KV,N,D]
    if preset == "sglang_mha":
        L = g.num_layers
        x = torch.stack([torch.stack(t[:L]), torch.stack(t[L:])])  # [2, L, B*N, H, D]
        x = x.reshape(2, L, -1, g.block_size, g.num_heads, g.head_dim)
        return x.permute(2, 1, 0, 3, 4, 5).contiguous()
    if preset in ("vllm_mla", "vllm_mla_fp8_ds"):
        return torch.stack(t).permute(1, 0, 2, 3)[:, :, None, :, None, :].contiguous()  # [L,B,N,C]
    if preset.startswith("vllm_") and len(preset) == 10:  # standardized per-layer views [B,H,N,2D]
        x = torch.stack(t).reshape(g.num_layers, -1, g.num_heads, g.block_size, 2, g.head_dim)
        return x.permute(1, 0, 4, 3, 2, 5).contiguous()
    raise KeyError(preset)


def fill_random(cache: PagedKVCache, gen: torch.Generator) -> None:
    """Fill every byte of the cache's tensors with random values (never zeros as test data)."""
    for t in cache.tensors:
        b = t.view(torch.uint8) if t.dim() else t
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen).to(b.device))
