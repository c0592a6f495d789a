"""The KV tensors vLLM hands a connector's ``register_kv_caches``, described as a `PagedKVCache`.

vLLM 0.33's per-layer 4-D views ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` strided into one buffer, in
any standardized order (found from the strides and layer offsets), MLA's latent views
``[num_blocks, 1, block_size, width]`` and Mamba's state pages ``[num_blocks, 1, 1, state bytes]`` in the same
orders, or the classic 5-D per-layer tensors of FlashAttention ``[2, B, N, H, D]`` and FlashInfer
``[B, 2, N, H, D]``, NHD or HND.
"""
from __future__ import annotations

import torch

from . import presets
from .layout import PagedKVCache

__all__ = ["describe_vllm_kv_caches"]


def _standardized_order(views: list[torch.Tensor]) -> str:
    """The physical order (e.g. "LBNHC") of per-layer ``[B, H, N, C]`` views strided into one buffer."""
    first = views[0]
    strides = {"B": first.stride(0), "H": first.stride(1), "N": first.stride(2), "C": first.stride(3)}
    if len(views) > 1:
        strides["L"] = (views[1].data_ptr() - first.data_ptr()) // first.element_size()
    else:  # a single layer: its place in the order does not change any address
        strides["L"] = first.untyped_storage().nbytes() // first.element_size()
    return "".join(sorted(strides, key=lambda d: -strides[d]))


def describe_vllm_kv_caches(kv_caches: dict[str, torch.Tensor], *, latent: bool = False) -> PagedKVCache:
    """Describe the tensors vLLM hands ``register_kv_caches`` (layer order as given) as a ``PagedKVCache``;
    ``latent``: 4-D views of one vector per position without a K/V split, an MLA cache (``MLAAttentionSpec``,
    ``[num_blocks, 1, block_size, latent width]``) or a page of recurrent state (``MambaSpec``,
    ``[num_blocks, 1, 1, state bytes]`` in int8: one "position" per block)."""
    if not isinstance(kv_caches, dict) or not kv_caches:
        raise TypeError(f"kv_caches must be a non-empty dict of layer name -> tensor, got {kv_caches!r:.80}")
    tensors = list(kv_caches.values())
    dims = {t.dim() for t in tensors}
    if dims == {4}:
        order = _standardized_order(tensors)
        if order not in presets.STANDARDIZED_ORDERS:
            raise ValueError(f"4-D KV views with physical order {order} are not one of vLLM's standardized "
                             f"layouts {presets.STANDARDIZED_ORDERS}")
        if latent and tensors[0].shape[1] != 1:
            raise ValueError(f"MLA KV views must have one head slot, got shape {tuple(tensors[0].shape)}")
        return presets.vllm_standardized(tensors, order, latent=latent)
    if latent:
        raise ValueError(f"MLA KV caches must be vLLM 0.33's 4-D views [B, 1, N, width], got dimensions "
                         f"{sorted(dims)}")
    if dims == {5}:
        t = tensors[0]
        token_dim, head_dim = 2, 3
        hnd = "HND" if t.stride(head_dim) > t.stride(token_dim) else "NHD"
        if t.shape[0] == 2:
            return presets.vllm_flash_attn(tensors, hnd)
        if t.shape[1] == 2:
            return presets.vllm_flashinfer(tensors, hnd)
        raise ValueError(f"5-D KV tensors must be [2, B, N, H, D] (FlashAttention) or [B, 2, N, H, D] (FlashInfer), "
                         f"got shape {tuple(t.shape)}")
    raise ValueError(f"unsupported KV cache tensors: dimensions {sorted(dims)} (expected vLLM 0.33's 4-D views or "
                     f"the classic 5-D per-layer tensors)")
