"""A view of some consecutive layers of a paged KV cache: the same tensors and strides, a subset of its pieces.

Layer-wise transfers move one group of layers at a time (`select_layers(g1, 4, 8)` -> `select_layers(g2, 4, 8)`),
so attention of the first layers can run while later layers are still being loaded. In a block-major cache a group
of consecutive layers of one block is one dense run, at the cache's full block stride.
"""
from __future__ import annotations

import dataclasses

from .layout import PagedKVCache

__all__ = ["select_layers"]


def select_layers(cache: PagedKVCache, start: int, stop: int) -> PagedKVCache:
    """Layers ``[start, stop)`` of ``cache`` as a cache of ``stop - start`` layers over the same memory."""
    g = cache.geometry
    if isinstance(start, bool) or isinstance(stop, bool) or not isinstance(start, int) or not isinstance(stop, int):
        raise TypeError(f"layer bounds must be ints, got {start!r}, {stop!r}")
    if not 0 <= start < stop <= g.num_layers:
        raise ValueError(f"layers [{start}, {stop}) are not a non-empty range of the cache's {g.num_layers} layers")
    if (start, stop) == (0, g.num_layers):
        return cache
    first, last = start * g.num_kv, stop * g.num_kv
    lay = cache.layout
    layout = dataclasses.replace(
        lay, name=f"{lay.name}[layers {start}:{stop}]",
        geometry=dataclasses.replace(g, num_layers=stop - start),
        piece_tensor=lay.piece_tensor[first:last], piece_offset=lay.piece_offset[first:last])
    return PagedKVCache(cache.tensors, layout)
