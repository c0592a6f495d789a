"""vLLM's compiled block-copy op, stood in by kvbm's own driver call where vLLM's compiled extension cannot load.

vLLM 0.33's ``CPUOffloadingWorker`` moves blocks with ``vllm._custom_ops.swap_blocks_batch``, which calls
``torch.ops._C_cache_ops.swap_blocks_batch`` from vLLM's compiled extension ``vllm._C_stable_libtorch`` (which vLLM's
CUDA platform module also imports when it loads). Its docstring says that on CUDA 12.8+ it submits all copies with
one ``cuMemcpyBatchAsync`` call, the source read in stream order, or in any order when ``is_src_access_order_any``
(the worker asks for that on CPU -> GPU loads). That is the only compiled code the worker's init, transfer and wait
path reaches on CUDA: its streams and events are torch's, its Triton kernel for small pinned CPU -> GPU pages is
Python, and the platform's other extensions (``_moe_C_stable_libtorch``, ``_qutlass_C``) are optional imports.

Where the extension cannot be imported (absent, or built for another torch), :func:`use_vllm_ops` puts an empty
module under its name in ``sys.modules`` and registers :func:`swap_blocks_batch` as that op, same schema: one
``cuMemcpyBatchAsync`` per call on torch's current CUDA stream through kvbm's
:func:`kvbm.kernels.batch_memcpy.memcpy_batch_unchecked` (no per-piece checks, to keep host time low). It
prints one line saying so; callers record the mode they got. Not stood in: the compiled op's loop of
``cudaMemcpyAsync`` for drivers older than CUDA 12.8 (this one raises there), and its C++ call path: this one is a
Python call through torch's dispatcher, which costs more host time per call (measured on a 2-core CPU, a no-op
ctypes callback standing in for the driver: ~35 us a call of 512 pieces, ~60 us of 8192).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Literal

import numpy as np
import torch

from kvbm.kernels.batch_memcpy import memcpy_batch_unchecked
from kvbm.kernels.cuda_runtime import CudaUnavailableError, ensure_stream_context, stream_handle

__all__ = ["EXTENSION", "OPS_MODES", "SCHEMA", "register_stand_in", "stand_in_registered", "swap_blocks_batch",
           "use_vllm_ops"]

OpsMode = Literal["auto", "compiled", "stand-in"]
OPS_MODES: tuple[str, ...] = ("auto", "compiled", "stand-in")
EXTENSION = "vllm._C_stable_libtorch"
NAMESPACE = "_C_cache_ops"
OP_NAME = "swap_blocks_batch"
# the schema vLLM 0.33's extension defines, which vllm._custom_ops.swap_blocks_batch calls positionally
SCHEMA = f"{OP_NAME}(Tensor src_ptrs, Tensor dst_ptrs, Tensor sizes, bool is_src_access_order_any=False) -> ()"
_MARK = "kvbm_stand_in"  # set on the stand-in module, which also holds the op's registration alive


def swap_blocks_batch(src_ptrs: torch.Tensor, dst_ptrs: torch.Tensor, sizes: torch.Tensor,
                      is_src_access_order_any: bool = False) -> None:
    """Copy ``sizes[i]`` bytes from ``src_ptrs[i]`` to ``dst_ptrs[i]`` for every i with one ``cuMemcpyBatchAsync`` on
    torch's current CUDA stream; the source is read in any order if ``is_src_access_order_any``, else in stream order.

    The arguments are 1-D int64 CPU tensors of one length (pointers as int64, as vLLM's worker fills them). It does not
    check the pieces themselves. Raises :class:`CudaUnavailableError` without CUDA, and
    :class:`kvbm.kernels.cuda_runtime.CudaError` if the driver refuses the batch.
    """
    for name, tensor in (("src_ptrs", src_ptrs), ("dst_ptrs", dst_ptrs), ("sizes", sizes)):
        if tensor.device.type != "cpu" or tensor.dtype != torch.int64 or tensor.dim() != 1:
            raise ValueError(f"swap_blocks_batch: {name} must be a 1-D int64 CPU tensor, got {tensor.dtype} "
                             f"{tuple(tensor.shape)} on {tensor.device}")
    if not src_ptrs.numel() == dst_ptrs.numel() == sizes.numel():
        raise ValueError(f"swap_blocks_batch: src_ptrs, dst_ptrs and sizes differ in length ({src_ptrs.numel()}, "
                         f"{dst_ptrs.numel()}, {sizes.numel()})")
    if src_ptrs.numel() == 0:
        return
    if not torch.cuda.is_available():
        raise CudaUnavailableError("swap_blocks_batch (kvbm's stand-in for vLLM's compiled op) needs CUDA: torch sees "
                                   "no CUDA GPU in this process")
    handle = stream_handle(torch.cuda.current_stream())
    if handle in (0, 1):  # NULL and cudaStreamLegacy, which cuMemcpyBatchAsync refuses
        raise ValueError("swap_blocks_batch: torch's current CUDA stream is the legacy default stream; call it inside "
                         "torch.cuda.stream(...) of a created stream, as vLLM's worker does")
    ensure_stream_context(handle)
    dsts, srcs, lengths = (np.ascontiguousarray(t.numpy().view(np.uint64)) for t in (dst_ptrs, src_ptrs, sizes))
    memcpy_batch_unchecked(dsts, srcs, lengths, handle, direction=None, device=0,
                           src_access_order="any" if is_src_access_order_any else "stream")


def _op_registered() -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), OP_NAME)


def stand_in_registered() -> bool:
    """True when this process's ``torch.ops._C_cache_ops.swap_blocks_batch`` is kvbm's stand-in."""
    return getattr(sys.modules.get(EXTENSION), _MARK, None) is not None


def register_stand_in() -> bool:
    """Install the stand-in: an empty module for vLLM's extension in ``sys.modules`` and :func:`swap_blocks_batch`
    registered as ``torch.ops._C_cache_ops.swap_blocks_batch`` (CPU dispatch key: its arguments are CPU tensors).

    Returns True if it registered now, False if the stand-in was already in place. Raises RuntimeError if vLLM's
    compiled extension or its op is already loaded in this process.
    """
    module = sys.modules.get(EXTENSION)
    if module is not None and getattr(module, _MARK, None) is not None:
        return False
    if module is not None or _op_registered():
        raise RuntimeError(f"vLLM's compiled ops ({EXTENSION}, torch.ops.{NAMESPACE}.{OP_NAME}) are already loaded "
                           f"in this process; the stand-in replaces them only where they cannot load")
    library = torch.library.Library(NAMESPACE, "FRAGMENT")
    library.define(SCHEMA)
    library.impl(OP_NAME, swap_blocks_batch, "CPU")
    module = types.ModuleType(EXTENSION, f"kvbm's stand-in for vLLM's compiled extension: only "
                                         f"torch.ops.{NAMESPACE}.{OP_NAME}, see bench/vllm_stand_in.py")
    setattr(module, _MARK, library)  # the registration lives as long as the module stays in sys.modules
    sys.modules[EXTENSION] = module
    return True


def use_vllm_ops(mode: OpsMode = "auto") -> str:
    """Make vLLM's copy op available before vLLM's platform is resolved; returns ``"compiled"`` or ``"stand-in"``.

    ``auto``: vLLM's compiled extension if it imports, else the stand-in; ``compiled``: the extension or an
    ImportError; ``stand-in``: the stand-in (refused if the extension is already loaded). Call it before anything
    imports vLLM's platform (``vllm.platforms.current_platform``), as vLLM's CUDA platform imports the extension.
    """
    if mode not in OPS_MODES:
        raise ValueError(f"mode must be one of {', '.join(OPS_MODES)}, got {mode!r}")
    if stand_in_registered():
        if mode == "compiled":
            raise ImportError(f"{EXTENSION} is kvbm's stand-in in this process, not vLLM's compiled extension")
        return "stand-in"
    reason = "asked for with --vllm-ops stand-in"
    if mode != "stand-in":
        try:
            importlib.import_module(EXTENSION)
            return "compiled"
        except (ImportError, OSError) as exc:
            if mode == "compiled":
                raise ImportError(f"vLLM's compiled extension {EXTENSION} does not import: {exc}") from exc
            reason = f"{EXTENSION} does not import: {type(exc).__name__}: {exc}"
    register_stand_in()
    print(f"[vllm-ops] STAND-IN in use ({reason}): torch.ops.{NAMESPACE}.{OP_NAME} is kvbm's one cuMemcpyBatchAsync "
          f"per call, not vLLM's compiled op; all other vLLM code is vLLM's own", flush=True)
    return "stand-in"
