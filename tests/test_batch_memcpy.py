"""DMA helpers (memcpy_batch_async, memcpy_loop_async) and the cuda_runtime helpers under them.

On CPU: validation, the no-GPU errors, and the exact arguments handed to the driver (a ctypes stand-in for
cuMemcpyBatchAsync reads back the arrays and the attribute struct, for both the CUDA 13 and 12.8 ABIs).
On a GPU: random pieces copied D2H, H2D and D2D into poisoned destinations, byte-exact against torch.
"""
import ctypes
import threading
import types

import numpy as np
import pytest
import torch

from kvbm.kernels import batch_memcpy, cuda_runtime
from kvbm.kernels.batch_memcpy import memcpy_batch_async, memcpy_loop_async, prepare_pieces
from kvbm.kernels.cuda_runtime import (
    CudaError, CudaUnavailableError, check, cuda_available, cuda_driver, cuda_rt, ensure_stream_context,
    require_cuda, stream_handle,
)
from kvbm.kernels.host_memory import PinnedHostBuffer

needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
cpu_only = pytest.mark.skipif(cuda_available(), reason="checks the no-GPU errors, which a GPU machine never raises")

BASE = 1 << 40  # fake but plausible UVA addresses for the CPU tests
SUCCESS = cuda_rt.cudaError_t.cudaSuccess


# ---------------------------------------------------------------- cuda_runtime helpers

def test_check_unpacks_values():
    assert check((SUCCESS,), "f()") is None
    assert check((SUCCESS, 7), "f()") == 7
    assert check((SUCCESS, 7, "x"), "f()") == (7, "x")
    assert check((cuda_driver.CUresult.CUDA_SUCCESS, 3), "cuF()") == 3


def test_check_raises_with_call_and_error_name():
    with pytest.raises(CudaError, match=r"cudaHostRegister\(0x1000\) failed: cudaErrorInvalidValue \(1\): .+") as info:
        check((cuda_rt.cudaError_t.cudaErrorInvalidValue, None), "cudaHostRegister(0x1000)")
    assert info.value.code == 1 and info.value.name == "cudaErrorInvalidValue" and info.value.detail
    with pytest.raises(CudaError, match=r"cuMemcpy failed: CUDA_ERROR_ILLEGAL_ADDRESS \(700\)"):
        check((cuda_driver.CUresult.CUDA_ERROR_ILLEGAL_ADDRESS,), "cuMemcpy")
    with pytest.raises(TypeError, match="tuple"):
        check(0, "f()")


def test_stream_handle():
    assert stream_handle(0) == 0
    assert stream_handle(0xABC0) == 0xABC0
    assert stream_handle(types.SimpleNamespace(cuda_stream=0x1230)) == 0x1230
    with pytest.raises(ValueError, match="non-negative"):
        stream_handle(-1)
    with pytest.raises(TypeError, match="torch.cuda.Stream"):
        stream_handle(True)
    with pytest.raises(TypeError, match="torch.cuda.Stream"):
        stream_handle("stream")


@cpu_only
def test_no_gpu_is_detected_and_reported():
    assert cuda_available() is False
    with pytest.raises(CudaUnavailableError, match="pinning needs a CUDA GPU"):
        require_cuda("pinning")
    with pytest.raises(CudaUnavailableError):
        ensure_stream_context(0x1230)


# ---------------------------------------------------------------- piece validation

def test_prepare_pieces_returns_contiguous_uint64():
    dsts, srcs, sizes = prepare_pieces([BASE, BASE + 100], np.array([BASE * 2, BASE * 3]), (100, 7),
                                       check_overlap=True)
    for array, expected in ((dsts, [BASE, BASE + 100]), (srcs, [BASE * 2, BASE * 3]), (sizes, [100, 7])):
        assert array.dtype == np.uint64 and array.flags.c_contiguous and array.tolist() == expected
    high = 2**63 + 8  # numpy would make float64 of this list: must stay exact
    assert prepare_pieces([high, 8], [16, 32], [8, 8], check_overlap=True)[0].tolist() == [high, 8]
    assert all(a.size == 0 for a in prepare_pieces([], [], [], check_overlap=True))


@pytest.mark.parametrize(
    "dsts, srcs, sizes, error, message",
    [
        ([BASE], [BASE * 2, BASE * 3], [8], ValueError, "same length"),
        ([BASE], [BASE * 2], [0], ValueError, r"sizes\[0\] is a size of 0"),
        ([BASE, 0], [BASE * 2, BASE * 3], [8, 8], ValueError, r"dsts\[1\] is a null pointer"),
        ([BASE], [-5], [8], ValueError, "non-negative"),
        ([BASE], [BASE * 2], [8.0], TypeError, "must hold ints"),
        ([BASE], [BASE * 2], [True], TypeError, "must hold ints"),
        ([BASE, None], [1, 2], [8, 8], TypeError, "NoneType at index 1"),
        ([2**64], [BASE], [8], ValueError, r"not in \[0, 2\*\*64\)"),
        ([[BASE]], [[BASE]], [[8]], ValueError, "one-dimensional"),
        ([2**64 - 4], [BASE], [8], ValueError, "past the end of the address space"),
        ([BASE, BASE + 4], [BASE * 2, BASE * 3], [8, 8], ValueError, "destinations of pieces 0 and 1 overlap"),
        ([BASE + 64, BASE], [BASE * 2, BASE + 60], [8, 8], ValueError,
         "source of piece 1 overlaps destination of piece 0"),
    ],
)
def test_prepare_pieces_rejects_bad_pieces(dsts, srcs, sizes, error, message):
    with pytest.raises(error, match=message):
        prepare_pieces(dsts, srcs, sizes, check_overlap=True)


def test_overlap_check_allows_touching_ranges_and_shared_sources():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 5000, size=300)
    dsts = BASE + np.concatenate([[0], np.cumsum(sizes)[:-1]])  # back to back, no gaps
    order = rng.permutation(300)
    srcs = np.full(300, 4 * BASE)  # every piece reads the same source: fine
    out = prepare_pieces(dsts[order], srcs, sizes[order], check_overlap=True)
    assert out[0].tolist() == dsts[order].tolist()
    # sources interleaved with destinations, filling exactly the gaps between them
    prepare_pieces([BASE + 32, BASE], [BASE + 16, BASE + 48], [16, 16], check_overlap=True)
    # the loop has ordered copies, so overlapping destinations are accepted without the check
    prepare_pieces([BASE, BASE + 4], [2 * BASE, 3 * BASE], [8, 8], check_overlap=False)


def test_batch_rejects_legacy_stream_and_bad_direction():
    with pytest.raises(ValueError, match="legacy default stream"):
        memcpy_batch_async([BASE], [2 * BASE], [8], 0)
    with pytest.raises(ValueError, match="direction must be one of"):
        memcpy_batch_async([BASE], [2 * BASE], [8], 0x1230, direction="up")
    with pytest.raises(TypeError, match="torch.cuda.Stream"):
        memcpy_batch_async([BASE], [2 * BASE], [8], 1.5)


@cpu_only
def test_copies_without_gpu_raise_cuda_unavailable():
    with pytest.raises(CudaUnavailableError, match="memcpy_batch_async"):
        memcpy_batch_async([BASE], [2 * BASE], [8], 0x1230)
    with pytest.raises(CudaUnavailableError, match="memcpy_loop_async"):
        memcpy_loop_async([BASE], [2 * BASE], [8], 0)


def test_empty_batch_is_a_no_op():
    memcpy_batch_async([], [], [], 0x1230)  # nothing to do: no GPU needed
    memcpy_loop_async([], [], [], 0)


# ---------------------------------------------------------------- exact driver arguments (ctypes stand-in)

class RecordingBatchCopy:
    """A C-callable stand-in for cuMemcpyBatchAsync that reads back everything it is handed."""

    def __init__(self, has_fail_index: bool, result: int = 0, fail_at: int = 0):
        self.calls = []
        self.result, self.fail_at = result, fail_at
        proto = batch_memcpy._PROTO_CUDA12 if has_fail_index else batch_memcpy._PROTO_CUDA13
        self.function = proto(self._record_12 if has_fail_index else self._record_13)
        self.entry = batch_memcpy._BatchEntry(self.function, has_fail_index)

    def _record_13(self, dsts, srcs, sizes, count, attrs, attrs_idxs, num_attrs, stream):
        def read(address):
            return np.ctypeslib.as_array((ctypes.c_uint64 * count).from_address(address)).tolist()

        self.calls.append({
            "dsts": read(dsts), "srcs": read(srcs), "sizes": read(sizes), "count": count,
            "attrs": np.frombuffer(ctypes.string_at(attrs, 24), dtype=np.uint32).tolist(),
            "attrs_idxs": ctypes.c_uint64.from_address(attrs_idxs).value, "num_attrs": num_attrs, "stream": stream,
        })
        return self.result

    def _record_12(self, dsts, srcs, sizes, count, attrs, attrs_idxs, num_attrs, fail_idx, stream):
        ctypes.c_size_t.from_address(fail_idx).value = self.fail_at
        return self._record_13(dsts, srcs, sizes, count, attrs, attrs_idxs, num_attrs, stream)


@pytest.fixture
def fake_driver(monkeypatch):
    """Route memcpy_batch_async to a RecordingBatchCopy; the stream's device is reported as 3."""
    def install(**kwargs):
        recorder = RecordingBatchCopy(**kwargs)
        monkeypatch.setattr(batch_memcpy, "batch_entry", lambda: recorder.entry)
        monkeypatch.setattr(batch_memcpy, "ensure_stream_context", lambda handle: None)
        monkeypatch.setattr(batch_memcpy, "cuda_rt", types.SimpleNamespace(
            cudaStreamGetDevice=lambda handle: (SUCCESS, 3)))
        return recorder
    return install


@pytest.mark.parametrize("has_fail_index", [False, True], ids=["cuda13-abi", "cuda12.8-abi"])
def test_batch_passes_exact_arrays_and_attributes(fake_driver, monkeypatch, has_fail_index):
    recorder = fake_driver(has_fail_index=has_fail_index)
    monkeypatch.setattr(batch_memcpy, "MAX_PIECES_PER_CALL", 3)
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 1 << 16, size=7)
    dsts = (BASE + np.arange(7) * (1 << 16)).tolist()
    srcs = (4 * BASE + rng.permutation(7) * (1 << 16)).tolist()
    memcpy_batch_async(dsts, srcs, sizes, types.SimpleNamespace(cuda_stream=0xBEEF0))
    assert [c["count"] for c in recorder.calls] == [3, 3, 1]  # chunked, in order
    assert sum((c["dsts"] for c in recorder.calls), []) == dsts
    assert sum((c["srcs"] for c in recorder.calls), []) == srcs
    assert sum((c["sizes"] for c in recorder.calls), []) == sizes.tolist()
    for call in recorder.calls:
        assert call["stream"] == 0xBEEF0 and call["num_attrs"] == 1 and call["attrs_idxs"] == 0
        # srcAccessOrder=STREAM, no location hints, no flags
        assert call["attrs"] == [1, 0, 0, 0, 0, 0]


def test_batch_sets_location_hints_and_overlap_flag(fake_driver):
    recorder = fake_driver(has_fail_index=False)
    memcpy_batch_async([BASE], [2 * BASE], [64], 0x1230, direction="d2h", prefer_overlap_with_compute=True)
    memcpy_batch_async([BASE], [2 * BASE], [64], 0x1230, direction="h2d")
    # [srcAccessOrder, srcLoc.type, srcLoc.id, dstLoc.type, dstLoc.id, flags]; DEVICE=1, HOST=2
    assert recorder.calls[0]["attrs"] == [1, 1, 3, 2, 0, 1]
    assert recorder.calls[1]["attrs"] == [1, 2, 0, 1, 3, 0]


def test_batch_source_access_order_any(fake_driver):
    recorder = fake_driver(has_fail_index=False)
    memcpy_batch_async([BASE], [2 * BASE], [64], 0x1230, src_access_order="any")
    memcpy_batch_async([BASE], [2 * BASE], [64], 0x1230, direction="h2d", src_access_order="any")
    memcpy_batch_async([BASE], [2 * BASE], [64], 0x1230, src_access_order="stream")
    # [srcAccessOrder, srcLoc.type, srcLoc.id, dstLoc.type, dstLoc.id, flags]; STREAM=1, ANY=3
    assert recorder.calls[0]["attrs"] == [3, 0, 0, 0, 0, 0]
    assert recorder.calls[1]["attrs"] == [3, 2, 0, 1, 3, 0]
    assert recorder.calls[2]["attrs"] == [1, 0, 0, 0, 0, 0]  # the default order is unchanged by an earlier ANY


def test_unchecked_batch_takes_the_source_access_order(fake_driver):
    recorder = fake_driver(has_fail_index=False)
    pieces = [np.array([v], dtype=np.uint64) for v in (BASE, 2 * BASE, 64)]
    batch_memcpy.memcpy_batch_unchecked(*pieces, 0x1230, direction=None, device=0, src_access_order="any")
    batch_memcpy.memcpy_batch_unchecked(*pieces, 0x1230, direction="d2h", device=3)
    assert [c["attrs"] for c in recorder.calls] == [[3, 0, 0, 0, 0, 0], [1, 1, 3, 2, 0, 0]]
    assert all(c["dsts"] == [BASE] and c["srcs"] == [2 * BASE] and c["sizes"] == [64] for c in recorder.calls)


def test_source_access_order_attributes_and_validation():
    orders = cuda_driver.CUmemcpySrcAccessOrder
    assert batch_memcpy._attributes(None, 0, False, "any").srcAccessOrder == orders.CU_MEMCPY_SRC_ACCESS_ORDER_ANY
    assert batch_memcpy._attributes(None, 0, False).srcAccessOrder == orders.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
    assert batch_memcpy.attributes_address(None, 0, False, "any") != batch_memcpy.attributes_address(None, 0, False)
    for bad in ("ANY", "during_api_call", None, 3):
        with pytest.raises(ValueError, match="src_access_order must be 'stream' or 'any'"):
            memcpy_batch_async([BASE], [2 * BASE], [8], 0x1230, src_access_order=bad)


@pytest.mark.parametrize("has_fail_index", [False, True], ids=["cuda13-abi", "cuda12.8-abi"])
def test_batch_driver_error_is_raised_with_name(fake_driver, has_fail_index):
    fake_driver(has_fail_index=has_fail_index, result=1, fail_at=2)
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_VALUE") as info:
        memcpy_batch_async([BASE, BASE + 64, BASE + 128], [2 * BASE] * 3, [64] * 3, 0x1230)
    assert info.value.code == 1
    assert ("failing piece 2" in str(info.value)) == has_fail_index


@pytest.mark.parametrize("driver_version", [13000, 12080, 12060])
def test_entry_point_abi_follows_the_driver_version(monkeypatch, driver_version):
    recorder = RecordingBatchCopy(has_fail_index=driver_version < 13000)
    address = ctypes.cast(recorder.function, ctypes.c_void_p).value
    found = cuda_rt.cudaDriverEntryPointQueryResult.cudaDriverEntryPointSuccess

    def entry_point(symbol, version, flags):
        assert symbol == b"cuMemcpyBatchAsync"
        if version > driver_version or driver_version < 12080:  # as CUDA answers a version it does not know
            return (cuda_rt.cudaError_t.cudaErrorInvalidValue, None, None)
        return (SUCCESS, address, found)

    fake_rt = types.SimpleNamespace(
        cudaGetDriverEntryPointFlags=cuda_rt.cudaGetDriverEntryPointFlags,
        cudaDriverEntryPointQueryResult=cuda_rt.cudaDriverEntryPointQueryResult,
        cudaGetDriverEntryPointByVersion=entry_point, cudaDriverGetVersion=lambda: (SUCCESS, driver_version))
    for module in (batch_memcpy, cuda_runtime):  # the entry point is resolved by cuda_runtime.driver_function
        monkeypatch.setattr(module, "require_cuda", lambda what: None)
        monkeypatch.setattr(module, "cuda_rt", fake_rt)
    batch_memcpy.batch_entry.cache_clear()
    try:
        if driver_version < 12080:
            with pytest.raises(CudaUnavailableError, match="needs a CUDA 12.8 or newer driver.*CUDA 12.6"):
                batch_memcpy.batch_entry()
            return
        entry = batch_memcpy.batch_entry()
        assert entry.has_fail_index == (driver_version < 13000)
        assert ctypes.cast(entry.function, ctypes.c_void_p).value == address
    finally:
        batch_memcpy.batch_entry.cache_clear()


def test_loop_issues_one_ordered_copy_per_piece(monkeypatch):
    calls = []

    def fake_copy(dst, src, size, kind, stream):
        calls.append((dst, src, size, kind, stream))
        return (cuda_rt.cudaError_t.cudaErrorInvalidValue if size == 13 else SUCCESS,)

    monkeypatch.setattr(batch_memcpy, "require_cuda", lambda what: None)
    monkeypatch.setattr(batch_memcpy, "cuda_rt", types.SimpleNamespace(
        cudaMemcpyKind=cuda_rt.cudaMemcpyKind, cudaMemcpyAsync=fake_copy))
    dsts, srcs, sizes = [BASE + 64, BASE, BASE + 8], [2 * BASE, 3 * BASE, 4 * BASE], [64, 8, 16]
    memcpy_loop_async(dsts, srcs, sizes, 0)
    default = cuda_rt.cudaMemcpyKind.cudaMemcpyDefault
    assert calls == [(d, s, n, default, 0) for d, s, n in zip(dsts, srcs, sizes)]
    with pytest.raises(CudaError, match=r"piece 1 of 2: 13 bytes"):
        memcpy_loop_async([BASE, 2 * BASE], [3 * BASE, 4 * BASE], [8, 13], 0x1230)


# ---------------------------------------------------------------- real copies on a GPU

def random_pieces(rng: np.random.Generator, n: int, region: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n pieces (offsets into a destination and a source region of ``region`` bytes), disjoint on both sides,
    in shuffled order, with sizes from 1 byte to 40 KiB including odd ones."""
    sizes = rng.choice([1, 3, 64, 4095, 4096, 4097, 32768, 40961], size=n)
    assert sizes.sum() * 2 <= region

    def place(order):
        gaps = rng.integers(0, (region - sizes.sum()) // n + 1, size=n)
        starts = np.cumsum(gaps + sizes[order]) - sizes[order]
        offsets = np.empty(n, dtype=np.int64)
        offsets[order] = starts
        return offsets

    return place(rng.permutation(n)), place(rng.permutation(n)), sizes


class Region:
    """A device tensor or pinned host buffer of random bytes, with its base address and a CPU copy of its bytes."""

    def __init__(self, where: str, nbytes: int, seed: int):
        data = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8))
        self.host = None
        if where == "device":
            self.tensor = data.cuda()
        else:
            self.host = PinnedHostBuffer(nbytes)
            self.tensor = self.host.tensor()
            self.tensor.copy_(data)
        self.ptr = self.tensor.data_ptr()

    def bytes(self) -> torch.Tensor:
        return self.tensor.cpu().clone()

    def close(self) -> None:
        if self.host is not None:
            self.tensor = None
            self.host.close()


ENDS = {"d2h": ("device", "host"), "h2d": ("host", "device"), "d2d": ("device", "device")}


def run_copy(copy, ends: str, n: int, seed: int, stream=None, **kwargs) -> None:
    """Copy n random pieces between the ``ends`` ('d2h', ...) and compare the whole destination with the expected
    bytes; ``kwargs`` go to the copy call (its own ``direction`` hint among them)."""
    region = 8 << 20
    rng = np.random.default_rng(seed)
    src_where, dst_where = ENDS[ends]
    src, dst = Region(src_where, region, seed + 1), Region(dst_where, region, seed + 2)  # dst: poisoned
    try:
        dst_off, src_off, sizes = random_pieces(rng, n, region)
        expected, source = dst.bytes(), src.bytes()
        for d, s, size in zip(dst_off, src_off, sizes):
            expected[d:d + size] = source[s:s + size]
        stream = stream or torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())  # the random device bytes were written there
        copy((dst.ptr + dst_off).tolist(), src.ptr + src_off, sizes, stream, **kwargs)
        stream.synchronize()
        assert torch.equal(dst.bytes(), expected)
    finally:
        src.close()
        dst.close()


@needs_gpu
@pytest.mark.parametrize("direction", ["d2h", "h2d", "d2d"])
@pytest.mark.parametrize("copy", [memcpy_batch_async, memcpy_loop_async], ids=["batch", "loop"])
def test_gpu_copies_are_byte_exact(copy, direction):
    run_copy(copy, direction, n=150, seed=100)


@needs_gpu
def test_gpu_batch_in_chunks_with_hints_and_any_order(monkeypatch):
    monkeypatch.setattr(batch_memcpy, "MAX_PIECES_PER_CALL", 7)
    run_copy(memcpy_batch_async, "d2h", n=50, seed=200, direction="d2h", prefer_overlap_with_compute=True)
    run_copy(memcpy_batch_async, "h2d", n=50, seed=300, direction="h2d")
    run_copy(memcpy_batch_async, "h2d", n=50, seed=310, src_access_order="any")


@needs_gpu
def test_gpu_loop_on_the_legacy_default_stream():
    default = torch.cuda.default_stream()
    assert stream_handle(default) == 0
    run_copy(memcpy_loop_async, "d2h", n=20, seed=400, stream=default)


@needs_gpu
def test_gpu_batch_from_a_fresh_thread():
    failures = []

    def work():
        try:
            run_copy(memcpy_batch_async, "d2d", n=30, seed=500)
        except BaseException as exc:  # reported to the main thread below
            failures.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert not failures, failures


@needs_gpu
def test_gpu_ensure_stream_context_on_a_thread_without_one():
    stream = torch.cuda.Stream()
    seen = []

    def work():  # a new thread has no current context until something makes one current
        seen.append(int(check(cuda_driver.cuCtxGetCurrent(), "cuCtxGetCurrent()")))
        ensure_stream_context(stream_handle(stream))
        seen.append(int(check(cuda_driver.cuCtxGetCurrent(), "cuCtxGetCurrent()")))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    expected = int(check(cuda_driver.cuStreamGetCtx(cuda_driver.CUstream(stream_handle(stream))), "cuStreamGetCtx"))
    assert seen == [0, expected] and expected != 0
