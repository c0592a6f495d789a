"""Small helpers over cuda-python (``cuda.bindings``): availability, error checking, stream handles, contexts.

cuda-python returns ``(err, *values)`` tuples instead of raising; :func:`check` turns such a tuple into its values
or a :class:`CudaError` naming the error and the call. The module imports without cuda-python and without a driver:
:func:`cuda_available` is then False and every other helper that needs CUDA raises :class:`CudaUnavailableError`.

Without a driver, cuda-python behaves like this (what the fallback is built on): the runtime's
``cudaGetDeviceCount`` returns ``cudaErrorInsufficientDriver`` (35), and any driver call (``cuInit``...) raises
because ``libcuda.so`` cannot be loaded.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch

try:  # cuda-python is an optional ("gpu") dependency
    from cuda.bindings import driver as cuda_driver
    from cuda.bindings import runtime as cuda_rt
except ImportError:  # pragma: no cover - exercised only where cuda-python is not installed
    cuda_driver = None
    cuda_rt = None

__all__ = [
    "CudaError", "CudaUnavailableError", "check", "cuda_available", "cuda_driver", "cuda_rt", "driver_error_name",
    "driver_function",
    "ensure_stream_context", "require_cuda", "stream_handle",
]

logger = logging.getLogger(__name__)


class CudaError(RuntimeError):
    """A CUDA call failed: carries the call, the numeric code and the error's name (e.g. ``cudaErrorInvalidValue``)."""

    def __init__(self, call: str, code: int, name: str, detail: str = "") -> None:
        self.call = call
        self.code = code
        self.name = name
        self.detail = detail
        message = f"{call} failed: {name} ({code})"
        super().__init__(f"{message}: {detail}" if detail else message)


class CudaUnavailableError(RuntimeError):
    """An operation that needs a CUDA GPU and cuda-python was called where either is missing."""


def _error_name_and_text(err: Any) -> tuple[str, str]:
    """Name and description of a runtime (``cudaError_t``) or driver (``CUresult``) error code."""
    name = getattr(err, "name", None) or f"error {int(err)}"
    text = ""
    if cuda_rt is not None and isinstance(err, cuda_rt.cudaError_t):
        status, raw = cuda_rt.cudaGetErrorString(err)  # works without a driver
        if status == cuda_rt.cudaError_t.cudaSuccess and raw:
            text = raw.decode(errors="replace")
    return name, text


def check(result: tuple, call: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result: return ``None``, the single value, or the tuple of values.

    Raises :class:`CudaError` naming ``call`` (a short description of the call, e.g.
    ``"cudaHostRegister(0x7f.., 4096 bytes)"``) and the error when ``err`` is not success. Works for runtime
    (``cudaError_t``) and driver (``CUresult``) results alike: both use 0 for success.
    """
    if not isinstance(result, tuple) or not result:
        raise TypeError(f"check() expects a cuda-python (err, *values) tuple for {call}, got {result!r}")
    err, *values = result
    if int(err) != 0:
        name, text = _error_name_and_text(err)
        raise CudaError(call, int(err), name, text)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """True when torch sees a CUDA GPU *and* cuda-python's runtime and driver bindings work (cached).

    False on CPU-only torch builds, without a driver (``cudaGetDeviceCount`` -> error 35; ``cuInit`` raises), or
    without cuda-python installed. The reason is logged once at debug level.
    """
    if cuda_rt is None or cuda_driver is None:
        logger.debug("CUDA unavailable: cuda-python (cuda.bindings) is not installed")
        return False
    if not torch.cuda.is_available():
        logger.debug("CUDA unavailable: torch.cuda.is_available() is False")
        return False
    try:
        count = check(cuda_rt.cudaGetDeviceCount(), "cudaGetDeviceCount()")
        check(cuda_driver.cuInit(0), "cuInit(0)")
    except Exception as exc:  # a missing libcuda raises a loader error, a bad driver a CudaError
        logger.debug("CUDA unavailable: cuda-python cannot reach the driver: %s", exc)
        return False
    if count < 1:
        logger.debug("CUDA unavailable: cudaGetDeviceCount() reports no device")
        return False
    return True


def require_cuda(what: str) -> None:
    """Raise :class:`CudaUnavailableError` saying that ``what`` needs a CUDA GPU, unless :func:`cuda_available`."""
    if not cuda_available():
        raise CudaUnavailableError(
            f"{what} needs a CUDA GPU with a working driver, torch built with CUDA and cuda-python "
            f"(cuda.bindings); none is available in this process"
        )


def stream_handle(stream: Any) -> int:
    """The raw ``cudaStream_t`` handle (an int) of a ``torch.cuda.Stream``/``ExternalStream`` or of a plain int.

    torch exposes the handle as ``stream.cuda_stream``; 0 is the legacy default stream.
    """
    if isinstance(stream, bool):
        raise TypeError(f"stream must be a torch.cuda.Stream or an int handle, got {stream!r}")
    if isinstance(stream, int):
        handle = stream
    elif hasattr(stream, "cuda_stream"):
        handle = int(stream.cuda_stream)
    else:
        raise TypeError(
            f"stream must be a torch.cuda.Stream (or anything with .cuda_stream) or an int handle, "
            f"got {type(stream).__name__}"
        )
    if handle < 0:
        raise ValueError(f"a stream handle is a non-negative address, got {handle}")
    return handle


def ensure_stream_context(handle: int) -> None:
    """Make the CUDA context of stream ``handle`` current on this thread if no context is current.

    Driver-API entry points (used for batched copies) need a current context; a thread that has not made any
    runtime call yet has none. When a context is already current it is left alone, so this never changes the
    device a caller has selected.
    """
    require_cuda("ensure_stream_context")
    current = check(cuda_driver.cuCtxGetCurrent(), "cuCtxGetCurrent()")
    if int(current) != 0:
        return
    if handle == 0:
        raise ValueError("no CUDA context is current on this thread and stream 0 names none; pass a real stream")
    ctx = check(cuda_driver.cuStreamGetCtx(cuda_driver.CUstream(handle)), f"cuStreamGetCtx({handle:#x})")
    check(cuda_driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent(stream's context)")


def driver_function(name: str, version: int, prototype: type) -> Any:
    """The driver entry point `name` of ABI `version` (e.g. 12000 for CUDA 12.0) as a ctypes function of
    `prototype` (a ``ctypes.CFUNCTYPE``), or None when this driver does not have it at that version.

    Resolved through the runtime (``cudaGetDriverEntryPointByVersion``), so it is the driver torch and cuda-python
    use. A ctypes call costs well under a microsecond, a fraction of a call through the cuda-python bindings.
    """
    require_cuda(name)
    flags = cuda_rt.cudaGetDriverEntryPointFlags.cudaEnableDefault
    found = cuda_rt.cudaDriverEntryPointQueryResult.cudaDriverEntryPointSuccess
    err, address, status = cuda_rt.cudaGetDriverEntryPointByVersion(name.encode(), version, flags)
    # A version newer than the driver answers cudaErrorInvalidValue.
    if int(err) != 0 or status != found or address is None or int(address) == 0:
        return None
    return prototype(int(address))


def driver_error_name(code: int) -> str:
    """The CUresult name of a raw driver return code (e.g. 'CUDA_ERROR_INVALID_VALUE')."""
    try:
        return cuda_driver.CUresult(code).name
    except ValueError:
        return f"CUresult {code}"
