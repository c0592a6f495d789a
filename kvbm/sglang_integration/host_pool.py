"""SGLang's HiCache host pools as kvbm paged caches, and the page order of SGLang's flat data pages.

SGLang's host pool (L2) plays the engine cache's role (tier "G1") for the storage backend: one kvbm block is one
SGLang page (``page_size`` tokens, every layer, K and V). The host pool classes allocate one ``kv_buffer`` whose
shape depends on ``--hicache-mem-layout``:

=====================  =====================================  ========================================
layout                 MHA ``kv_buffer``                      MLA ``kv_buffer``
=====================  =====================================  ========================================
``layer_first``        ``[2, layers, tokens, heads, dim]``    ``[layers, tokens, 1, kv_cache_dim]``
``page_first``         ``[2, tokens, layers, heads, dim]``    ``[tokens, layers, 1, kv_cache_dim]``
``page_first_direct``  ``[2, pages, layers, page, heads, dim]``  ``[pages, layers, page, 1, kv_cache_dim]``
``page_head``          ``[2, pages, heads, page, layers, dim]``  (not offered)
=====================  =====================================  ========================================

(``tokens = pages * page_size``). SGLang's older storage calls pass pages as flat tensors instead of host indices:
one page of the pool in the pool's own order with the page axis dropped, e.g. ``[2, layers, page, heads, dim]``
for ``layer_first`` and ``[2, page, layers, heads, dim]`` for ``page_first``. `flat_pages_cache` describes a
stack of such pages as a cache, so both calls go through the same transfer paths. Other layouts
(``page_unified``, ``page_first_kv_split``) are refused with a message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvbm.layouts import PagedKVCache, describe

__all__ = ["HostPoolLayout", "UnsupportedHostPool", "describe_host_pool", "flat_pages_cache", "host_pool_layout"]


class UnsupportedHostPool(ValueError):
    """The host pool's kind or layout has no kvbm description."""


@dataclass(frozen=True)
class HostPoolLayout:
    """How one host pool kind and layout maps onto kvbm's dimension names."""

    layout: str
    mla: bool
    pool_dims: str  #: the whole ``kv_buffer``
    page_dims: str  #: one flat data page, after a leading "block" axis


_LAYOUTS = {
    (False, "layer_first"): HostPoolLayout("layer_first", False, "kv layer (block token) head channel",
                                           "kv layer token head channel"),
    (False, "page_first"): HostPoolLayout("page_first", False, "kv (block token) layer head channel",
                                          "kv token layer head channel"),
    (False, "page_first_direct"): HostPoolLayout("page_first_direct", False, "kv block layer token head channel",
                                                 "kv layer token head channel"),
    (False, "page_head"): HostPoolLayout("page_head", False, "kv block head token layer channel",
                                         "kv head token layer channel"),
    (True, "layer_first"): HostPoolLayout("layer_first", True, "layer (block token) head channel",
                                          "layer token head channel"),
    (True, "page_first"): HostPoolLayout("page_first", True, "(block token) layer head channel",
                                         "token layer head channel"),
    (True, "page_first_direct"): HostPoolLayout("page_first_direct", True, "block layer token head channel",
                                                "layer token head channel"),
}

#: Layouts a storage backend can serve, per kind.
SUPPORTED_LAYOUTS = {"mha": sorted(k[1] for k in _LAYOUTS if not k[0]), "mla": sorted(k[1] for k in _LAYOUTS if k[0])}


def _is_mla(pool: Any) -> bool:
    return hasattr(pool, "kv_cache_dim") and not hasattr(pool, "head_num")


def host_pool_layout(pool: Any) -> HostPoolLayout:
    """The layout entry of an SGLang host pool (MHA or MLA); UnsupportedHostPool for any other."""
    if not hasattr(pool, "kv_buffer") or not hasattr(pool, "page_size"):
        raise UnsupportedHostPool(f"the kvbm storage backend serves MHA and MLA host pools; {type(pool).__name__} "
                                  f"has no single kv_buffer (hybrid models' pool groups are not served)")
    mla = _is_mla(pool)
    layout = getattr(pool, "layout", None)
    entry = _LAYOUTS.get((mla, layout))
    if entry is None:
        kind = "mla" if mla else "mha"
        raise UnsupportedHostPool(f"the kvbm storage backend does not support the {kind.upper()} host pool layout "
                                  f"{layout!r} (--hicache-mem-layout); supported: {SUPPORTED_LAYOUTS[kind]}")
    if not mla:
        v_dim = getattr(pool, "v_head_dim", pool.head_dim)
        if v_dim != pool.head_dim:
            raise UnsupportedHostPool(f"K and V head dims differ ({pool.head_dim} vs {v_dim}); kvbm blocks hold "
                                      f"K and V of one width")
    return entry


def describe_host_pool(pool: Any) -> PagedKVCache:
    """The host pool's ``kv_buffer`` as a paged cache of ``pool.size // pool.page_size`` blocks (one per page)."""
    entry = host_pool_layout(pool)
    buffer = pool.kv_buffer
    if not isinstance(buffer, torch.Tensor):
        raise UnsupportedHostPool(f"the host pool's kv_buffer must be one tensor, got {type(buffer).__name__}")
    if buffer.device.type != "cpu":
        raise UnsupportedHostPool(f"the host pool must live in host memory, got {buffer.device}")
    return describe([buffer], entry.pool_dims, block_size=pool.page_size, name=f"sglang_host_{entry.layout}")


def flat_pages_cache(entry: HostPoolLayout, pool_cache: PagedKVCache, pages: torch.Tensor) -> PagedKVCache:
    """``pages`` (``[n, page_numel]``, contiguous, the pool's dtype) as a cache of n blocks in the flat page order
    of the pool ``pool_cache`` describes (layout ``entry``)."""
    g = pool_cache.geometry
    sizes = {"kv": g.num_kv, "layer": g.num_layers, "token": g.block_size, "head": g.num_heads, "channel": g.head_dim}
    shape = [pages.shape[0]] + [sizes[d] for d in entry.page_dims.split()]
    return describe([pages.view(shape)], "block " + entry.page_dims, name=f"sglang_flat_{entry.layout}")
