"""The stand-in for vLLM's compiled ``swap_blocks_batch`` (bench/vllm_stand_in.py), on the CPU.

Registration (schema, twice, refused over vLLM's own), the mode choice of ``use_vllm_ops``, the errors without CUDA,
and, through a ctypes stand-in for ``cuMemcpyBatchAsync``, the exact pieces and source access order one call of the
op hands the driver, called positionally as vLLM's ``_custom_ops.swap_blocks_batch`` calls it.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from kvbm.kernels import batch_memcpy
from kvbm.kernels.cuda_runtime import CudaUnavailableError, cuda_available
from bench_module import load_bench_module
from test_batch_memcpy import RecordingBatchCopy

cpu_only = pytest.mark.skipif(cuda_available(), reason="checks the no-GPU error, which a GPU machine never raises")


@pytest.fixture
def stand_in():
    """The module, loaded from its file (the repo root is not on the test path); whatever it registered in this
    process is removed afterwards."""
    module = load_bench_module("vllm_stand_in.py", "vllm_stand_in_under_test")
    if module.EXTENSION in sys.modules or hasattr(torch.ops._C_cache_ops, "swap_blocks_batch"):
        pytest.skip("vLLM's compiled ops (or a stand-in) are already loaded in this process")
    yield module
    registered = sys.modules.pop(module.EXTENSION, None)
    library = getattr(registered, "kvbm_stand_in", None)
    if library is not None:
        library._destroy()  # torch.library has no public way to drop a registration


def test_registers_the_op_with_vllms_schema_once(stand_in):
    assert stand_in.register_stand_in() is True
    schema = torch.ops._C_cache_ops.swap_blocks_batch.default._schema
    assert str(schema) == ("_C_cache_ops::swap_blocks_batch(Tensor src_ptrs, Tensor dst_ptrs, Tensor sizes, "
                           "bool is_src_access_order_any=False) -> ()")
    assert stand_in.stand_in_registered()
    assert isinstance(sys.modules[stand_in.EXTENSION], types.ModuleType)
    assert stand_in.register_stand_in() is False  # twice: nothing more happens
    assert stand_in.use_vllm_ops("stand-in") == "stand-in" and stand_in.use_vllm_ops("auto") == "stand-in"
    with pytest.raises(ImportError, match="stand-in in this process"):
        stand_in.use_vllm_ops("compiled")


def test_refuses_to_shadow_vllms_compiled_extension(stand_in, monkeypatch):
    monkeypatch.setitem(sys.modules, stand_in.EXTENSION, types.ModuleType(stand_in.EXTENSION))
    with pytest.raises(RuntimeError, match="already loaded"):
        stand_in.register_stand_in()
    assert not hasattr(torch.ops._C_cache_ops, "swap_blocks_batch")


def test_modes(stand_in, monkeypatch, capsys):
    with pytest.raises(ValueError, match="auto, compiled, stand-in"):
        stand_in.use_vllm_ops("stub")
    monkeypatch.setattr(stand_in.importlib, "import_module", lambda name: types.ModuleType(name))
    assert stand_in.use_vllm_ops("auto") == "compiled" and stand_in.use_vllm_ops("compiled") == "compiled"
    assert capsys.readouterr().out == "" and not stand_in.stand_in_registered()

    def cannot_load(name):
        raise ImportError("undefined symbol: aoti_torch_abi_version")

    monkeypatch.setattr(stand_in.importlib, "import_module", cannot_load)
    with pytest.raises(ImportError, match="does not import: undefined symbol"):
        stand_in.use_vllm_ops("compiled")
    assert stand_in.use_vllm_ops("auto") == "stand-in"
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "STAND-IN in use" in out[0] and "undefined symbol" in out[0]
    assert stand_in.stand_in_registered()


@cpu_only
def test_without_cuda_the_op_names_cuda(stand_in):
    stand_in.register_stand_in()
    ptrs = torch.tensor([1 << 40, (1 << 40) + 4096], dtype=torch.int64)
    with pytest.raises(CudaUnavailableError, match="needs CUDA"):
        torch.ops._C_cache_ops.swap_blocks_batch(ptrs, ptrs + (1 << 41), torch.tensor([64, 64]), True)
    empty = torch.empty(0, dtype=torch.int64)
    torch.ops._C_cache_ops.swap_blocks_batch(empty, empty, empty)  # nothing to copy: no CUDA needed


@pytest.mark.parametrize("bad, message", [
    ((torch.tensor([1 << 20], dtype=torch.int32), None, None), "src_ptrs must be a 1-D int64 CPU tensor"),
    ((None, torch.tensor([[1 << 40]]), None), "dst_ptrs must be a 1-D int64 CPU tensor"),
    ((None, None, torch.tensor([64.0])), "sizes must be a 1-D int64 CPU tensor"),
    ((None, None, torch.tensor([64, 64])), "differ in length"),
])
def test_bad_arguments_are_refused(stand_in, bad, message):
    stand_in.register_stand_in()
    args = [torch.tensor([1 << 40]), torch.tensor([1 << 41]), torch.tensor([64])]
    args = [b if b is not None else a for a, b in zip(args, bad)]
    with pytest.raises(ValueError, match=message):
        torch.ops._C_cache_ops.swap_blocks_batch(*args)


def test_one_driver_call_with_exact_pieces_and_order(stand_in, monkeypatch):
    """src/dst as vLLM passes them (source first) reach cuMemcpyBatchAsync as (dsts, srcs) in one call on torch's
    current stream; ANY only when asked for."""
    recorder = RecordingBatchCopy(has_fail_index=False)
    monkeypatch.setattr(batch_memcpy, "batch_entry", lambda: recorder.entry)
    contexts = []
    monkeypatch.setattr(stand_in, "ensure_stream_context", contexts.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    stream = types.SimpleNamespace(cuda_stream=0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    stand_in.register_stand_in()
    one = torch.tensor([1 << 40])
    with pytest.raises(ValueError, match="legacy default stream"):
        torch.ops._C_cache_ops.swap_blocks_batch(one, one + (1 << 41), torch.tensor([64]))
    stream.cuda_stream = 0xBEEF0
    rng = np.random.default_rng(7)
    n = 300
    src = torch.from_numpy((1 << 40) + rng.permutation(n).astype(np.int64) * 65536)
    dst = torch.from_numpy((1 << 42) + rng.permutation(n).astype(np.int64) * 65536)
    sizes = torch.from_numpy(rng.integers(1, 65536, size=n))
    torch.ops._C_cache_ops.swap_blocks_batch(src, dst, sizes, True)
    torch.ops._C_cache_ops.swap_blocks_batch(src, dst, sizes)
    assert len(recorder.calls) == 2 and contexts == [0xBEEF0, 0xBEEF0]
    for call, order in zip(recorder.calls, (3, 1)):  # CU_MEMCPY_SRC_ACCESS_ORDER_ANY = 3, STREAM = 1
        assert call["count"] == n and call["stream"] == 0xBEEF0
        assert call["srcs"] == src.tolist() and call["dsts"] == dst.tolist() and call["sizes"] == sizes.tolist()
        assert call["attrs"] == [order, 0, 0, 0, 0, 0]
