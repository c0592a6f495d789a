"""The kernel backends of `kvbm.layouts.copy_blocks`: Triton (GPU; the interpreter on CPU) and numba (CPU).

Registered when `kvbm.layouts` is imported; the kernel modules themselves (Triton, numba) load on first use.
"""
from __future__ import annotations

import importlib.util

from kvbm.layouts.conversion import Backend, register_backend
from kvbm.layouts.layout import PagedKVCache

from . import triton_interpreting


def _triton_supports(src: PagedKVCache, dst: PagedKVCache, n: int) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    kinds = (src.device.type, dst.device.type)
    if kinds == ("cuda", "cuda"):
        return True
    if "cuda" in kinds:  # zero-copy: the kernel reads or writes pinned host memory over UVA
        from .host_memory import cache_is_pinned

        return cache_is_pinned(src if kinds[0] == "cpu" else dst)
    return kinds == ("cpu", "cpu") and triton_interpreting()


def _triton_copy(src, dst, src_ids, dst_ids) -> None:
    from .triton_copy import triton_copy

    triton_copy(src, dst, src_ids, dst_ids)


def _numba_copy(src, dst, src_ids, dst_ids) -> None:
    from .numba_copy import numba_copy

    numba_copy(src, dst, src_ids, dst_ids)


register_backend(Backend(
    "triton", _triton_copy, _triton_supports, priority=20,
    prefer=lambda src, dst, n: src.device.type == dst.device.type == "cuda" and _triton_supports(src, dst, n),
))
register_backend(Backend(
    "numba", _numba_copy, lambda src, dst, n: src.device.type == dst.device.type == "cpu", priority=10,
))

