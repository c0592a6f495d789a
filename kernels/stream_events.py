"""Event records and stream waits on raw CUDA handles, through the driver (ctypes), for the transfer hot path.

The engine orders its streams with a dozen records and waits per transfer, most of them before its first DMA.
Measured on the H200 machine (hot caches): torch's ``Event.record`` / ``Stream.wait_event`` 1.4 us a call and
``torch.cuda.current_stream(device)`` 4.7 us; ``cuEventRecord`` / ``cuStreamWaitEvent`` through ctypes 0.7-0.9 us
(the current stream's raw handle is one call into torch, without a Stream object). Events stay
``torch.cuda.Event`` objects (owned, created and freed by torch, and usable with torch's own calls); `handle` gives
the raw handle these functions take.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from .cuda_runtime import CudaError, CudaUnavailableError, driver_error_name, driver_function

#: Prototypes of the two entry points, handles as 64-bit integers (callable from Python and from numba, see
#: `staged_enqueue`).
RECORD = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64)  # cuEventRecord(event, stream)
WAIT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint)  # cuStreamWaitEvent(s, e, 0)


@functools.lru_cache(maxsize=None)
def entry_points() -> tuple:
    """The driver's ``cuEventRecord`` and ``cuStreamWaitEvent`` as ctypes functions of `RECORD` / `WAIT` (resolved
    once)."""
    functions = driver_function("cuEventRecord", 12000, RECORD), driver_function("cuStreamWaitEvent", 12000, WAIT)
    if None in functions:
        raise CudaUnavailableError("this CUDA driver has no cuEventRecord / cuStreamWaitEvent entry point")
    return functions


def handle(event: torch.cuda.Event, stream: torch.cuda.Stream) -> int:
    """The raw handle of `event`, which is created (torch creates events lazily) by recording it once on `stream`."""
    event.record(stream)
    return int(event.cuda_event)


def record(event: int, stream: int) -> None:
    """Record raw event `event` on raw stream `stream` (``cuEventRecord``)."""
    code = entry_points()[0](event, stream)
    if code:
        raise CudaError(f"cuEventRecord(event {event:#x}, stream {stream:#x})", code, driver_error_name(code))


def wait(stream: int, event: int) -> None:
    """Make raw stream `stream` wait for the last record of raw event `event` (``cuStreamWaitEvent``)."""
    code = entry_points()[1](stream, event, 0)
    if code:
        raise CudaError(f"cuStreamWaitEvent(stream {stream:#x}, event {event:#x})", code, driver_error_name(code))


def current_stream(device_index: int) -> int:
    """The raw handle of the calling thread's current stream on device `device_index` (0: the default stream)."""
    return torch._C._cuda_getCurrentRawStream(device_index)  # what Triton's launcher asks torch for, too
