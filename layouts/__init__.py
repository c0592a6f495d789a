"""kvbm.layouts: pure description of engines' paged KV caches, and the block conversion (= transfer) API.

    from kvbm.layouts import KVGeometry, allocate, copy_blocks, describe, presets
"""
from . import presets
from .conversion import Backend, available_backends, copy_blocks, register_backend, validate_transfer
from .geometry import LOGICAL_DIMS, KVGeometry
from .layer_view import select_layers
from .layout import KVLayout, LayoutError, PagedKVCache, describe
from .presets import PRESETS, allocate, block_major, presets_for

__all__ = [
    "LOGICAL_DIMS", "PRESETS", "Backend", "KVGeometry", "KVLayout", "LayoutError", "PagedKVCache", "allocate",
    "available_backends", "block_major", "copy_blocks", "describe", "presets", "presets_for", "register_backend",
    "select_layers", "validate_transfer",
]

# The transfer library's kernel backends (Triton, numba), registered with `copy_blocks` for every user of this API.
from kvbm.kernels import backends as _backends  # noqa: E402,F401
