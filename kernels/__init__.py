"""kvbm.kernels: the transfer library. Gather/scatter kernels (Triton on GPU, numba on CPU) behind the conversion
API of `kvbm.layouts`, pinned host memory, and the device<->host transfer paths built on them.

Importing this package registers its backends with `kvbm.layouts.copy_blocks`; the kernel modules themselves
(Triton, numba) load on first use, so `import kvbm` stays light.
"""
from __future__ import annotations

import importlib.util
import os

from kvbm.layouts import Backend, PagedKVCache, register_backend


def triton_interpreting() -> bool:
    """Whether Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1, set before first use)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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

__all__ = ["triton_interpreting"]
