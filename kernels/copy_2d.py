"""2-D copies (``cuMemcpy2DAsync``): `rows` rows of `width` bytes between two pitched regions, one driver call.

The staged engine moves a run of consecutive blocks of a layer view of a host cache this way (see `host_runs`): each
block's layer group is one row, the host pitch the full block stride, the staging pitch the group's bytes. The
descriptor is a ``CUDA_MEMCPY2D`` laid out in a uint64 array (16 eight-byte fields; the two memory-type enums in the
low half of theirs), filled by `describe`, which the compiled enqueue calls too; `memcpy_2d_async` is the Python
call over the same entry point.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any

import numba
import numpy as np

from .cuda_runtime import CudaError, CudaUnavailableError, driver_error_name, driver_function

__all__ = ["COPY_2D", "DESCRIPTOR_FIELDS", "HOST", "DEVICE", "copy_2d_entry", "describe", "memcpy_2d_async"]

#: cuMemcpy2DAsync(const CUDA_MEMCPY2D *copy, CUstream stream)
COPY_2D = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64)
DESCRIPTOR_FIELDS = 16
HOST, DEVICE = 1, 2  # CU_MEMORYTYPE_HOST, CU_MEMORYTYPE_DEVICE
# field indices of CUDA_MEMCPY2D (every field 8 bytes apart)
_SRC_TYPE, _SRC_HOST, _SRC_DEVICE, _SRC_PITCH = 2, 3, 4, 6
_DST_TYPE, _DST_HOST, _DST_DEVICE, _DST_PITCH = 9, 10, 11, 13
_WIDTH, _HEIGHT = 14, 15


@numba.njit(cache=True, nogil=True)
def describe(desc, dst, dst_pitch, dst_type, src, src_pitch, src_type, width, rows):  # pragma: no cover (compiled)
    """Fill `desc` (uint64[16]) for a copy of `rows` rows of `width` bytes: row k from ``src + k * src_pitch`` to
    ``dst + k * dst_pitch``; each side `HOST` (pinned) or `DEVICE` memory."""
    desc[:] = 0
    desc[_SRC_TYPE] = src_type
    desc[_SRC_HOST if src_type == HOST else _SRC_DEVICE] = src
    desc[_SRC_PITCH] = src_pitch
    desc[_DST_TYPE] = dst_type
    desc[_DST_HOST if dst_type == HOST else _DST_DEVICE] = dst
    desc[_DST_PITCH] = dst_pitch
    desc[_WIDTH] = width
    desc[_HEIGHT] = rows


@functools.lru_cache(maxsize=None)
def copy_2d_entry() -> Any:
    """The driver's cuMemcpy2DAsync (the v2 ABI of CUDA 12.0 on) as a ctypes function of `COPY_2D`."""
    entry = driver_function("cuMemcpy2DAsync", 12000, COPY_2D)
    if entry is None:
        raise CudaUnavailableError("this CUDA driver has no cuMemcpy2DAsync entry point")
    return entry


def memcpy_2d_async(dst: int, dst_pitch: int, dst_type: int, src: int, src_pitch: int, src_type: int, width: int,
                    rows: int, stream: int, desc: np.ndarray | None = None) -> None:
    """Enqueue a 2-D copy (see `describe`) on raw stream handle `stream`; raises `CudaError` if the driver refuses
    it. For pieces the caller built from validated caches: only the pitches are checked here."""
    if not (0 < width <= min(dst_pitch, src_pitch)) or rows < 1:
        raise ValueError(f"a 2-D copy needs 0 < width <= both pitches and rows >= 1, got width {width}, pitches "
                         f"{dst_pitch} / {src_pitch}, rows {rows}")
    desc = np.empty(DESCRIPTOR_FIELDS, np.uint64) if desc is None else desc
    describe(desc, dst, dst_pitch, dst_type, src, src_pitch, src_type, width, rows)
    code = copy_2d_entry()(desc.ctypes.data, stream)
    if code:
        raise CudaError(f"cuMemcpy2DAsync({rows} rows of {width} bytes)", code, driver_error_name(code))
