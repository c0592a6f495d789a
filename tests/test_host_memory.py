"""PinnedHostBuffer and MappedPointer: the mmap path everywhere, the cudaHostRegister path with a fake runtime on
CPU (bookkeeping: chunks, rollback, unregister), and for real on a GPU (pinning, device pointer, D2H/H2D, zero-copy).
"""
import ctypes
import gc
import logging
import os
import types

import numpy as np
import pytest
import torch

from kvbm.kernels import host_memory
from kvbm.kernels.cuda_runtime import CudaError, cuda_available, cuda_rt
from kvbm.kernels.host_memory import PAGE_BYTES, MappedPointer, PinnedHostBuffer

needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
cpu_only = pytest.mark.skipif(cuda_available(), reason="checks the unpinned fallback, which a GPU machine never takes")
needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")


def random_bytes(n: int, seed: int) -> torch.Tensor:
    """n random bytes (never all zero) as a CPU uint8 tensor."""
    return torch.from_numpy(np.random.default_rng(seed).integers(1, 256, size=n, dtype=np.uint8))


def is_mapped(address: int) -> bool:
    """True if ``address`` lies in a mapping of this process (per /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


# ---------------------------------------------------------------- mmap path (every machine)

def test_allocation_and_round_trip_of_random_bytes():
    nbytes = 3 * PAGE_BYTES + 123
    data = random_bytes(nbytes, seed=1)
    with PinnedHostBuffer(nbytes) as buf:
        assert buf.nbytes == nbytes
        assert buf.host_ptr % PAGE_BYTES == 0
        view = buf.tensor()
        assert view.dtype == torch.uint8 and view.shape == (nbytes,) and view.device.type == "cpu"
        assert view.data_ptr() == buf.host_ptr
        assert torch.count_nonzero(view) == 0  # fresh anonymous memory, first touch wrote zeros
        view.copy_(data)
        # a second view and the raw address both see the same bytes
        assert torch.equal(buf.tensor(), data)
        assert ctypes.string_at(buf.host_ptr, nbytes) == data.numpy().tobytes()


def test_typed_views_share_bytes():
    with PinnedHostBuffer(4096) as buf:
        words = buf.tensor(torch.bfloat16)
        assert words.shape == (2048,)
        bits = random_bytes(4096, seed=2).view(torch.int16)
        words.view(torch.int16).copy_(bits)
        assert torch.equal(buf.tensor(torch.int16), bits)
        assert torch.equal(buf.tensor(), bits.view(torch.uint8))


def test_view_of_odd_size_in_wider_dtype_is_refused():
    with PinnedHostBuffer(4097) as buf:
        with pytest.raises(ValueError, match="not a whole number of torch.float32"):
            buf.tensor(torch.float32)
        with pytest.raises(TypeError, match="torch.dtype"):
            buf.tensor(np.float32)


def test_parallel_first_touch_and_chunk_option_keep_memory_zeroed():
    nbytes = 8 << 20
    with PinnedHostBuffer(nbytes, touch_threads=3, chunk_bytes=1 << 20) as buf:
        view = buf.tensor()
        assert torch.count_nonzero(view) == 0
        data = random_bytes(nbytes, seed=3)
        view.copy_(data)
        assert torch.equal(buf.tensor(), data)


@pytest.mark.skipif(not os.path.exists("/proc/self/numa_maps"), reason="needs Linux NUMA support (numa_maps)")
def test_numa_node_binding():
    try:
        buf = PinnedHostBuffer(1 << 20, numa_node=0)
    except PermissionError:
        pytest.skip("mbind is not permitted here (containers without CAP_SYS_NICE)")
    with buf:
        with open("/proc/self/numa_maps") as maps:
            policy = [line.split()[1] for line in maps if int(line.split()[0], 16) == buf.host_ptr]
        assert policy == ["bind:0"]
        data = random_bytes(1 << 20, seed=4)
        buf.tensor().copy_(data)
        assert torch.equal(buf.tensor(), data)


@needs_proc_maps
def test_close_is_idempotent_and_unmaps():
    buf = PinnedHostBuffer(1 << 20)
    address = buf.host_ptr
    assert is_mapped(address) and not buf.closed
    buf.close()
    assert buf.closed and not is_mapped(address)
    buf.close()  # second close: nothing to do, no error
    with pytest.raises(ValueError, match="closed"):
        buf.tensor()
    with pytest.raises(ValueError, match="closed"):
        buf.device_ptr


@needs_proc_maps
def test_views_keep_the_mapping_alive_after_close():
    data = random_bytes(PAGE_BYTES, seed=5)
    buf = PinnedHostBuffer(PAGE_BYTES)
    view = buf.tensor()
    view.copy_(data)
    address = buf.host_ptr
    buf.close()
    assert is_mapped(address)  # never a dangling tensor
    assert torch.equal(view, data)
    del view
    gc.collect()
    assert not is_mapped(address)


@needs_proc_maps
def test_finalizer_releases_a_dropped_buffer():
    buf = PinnedHostBuffer(1 << 20)
    address = buf.host_ptr
    del buf
    gc.collect()
    assert not is_mapped(address)


@needs_proc_maps
def test_context_exit_closes():
    with PinnedHostBuffer(PAGE_BYTES) as buf:
        address = buf.host_ptr
    assert buf.closed and not is_mapped(address)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"nbytes": 0}, ValueError, "nbytes must be positive"),
        ({"nbytes": -4096}, ValueError, "nbytes must be positive"),
        ({"nbytes": 4096.0}, TypeError, "nbytes must be an int"),
        ({"nbytes": True}, TypeError, "nbytes must be an int"),
        ({"nbytes": 4096, "chunk_bytes": 1000}, ValueError, "multiple of the page size"),
        ({"nbytes": 4096, "chunk_bytes": 0}, ValueError, "chunk_bytes must be positive"),
        ({"nbytes": 4096, "numa_node": -1}, ValueError, "numa_node must be non-negative"),
        ({"nbytes": 4096, "numa_node": "0"}, TypeError, "numa_node must be an int"),
        ({"nbytes": 4096, "numa_node": 4095}, ValueError, "numa_node"),
        ({"nbytes": 4096, "touch_threads": 0}, ValueError, "touch_threads must be positive"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    nbytes = kwargs.pop("nbytes")
    with pytest.raises(error, match=message):
        PinnedHostBuffer(nbytes, **kwargs)


@cpu_only
def test_fallback_is_unpinned_and_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(host_memory, "_fallback_logged", False)
    with caplog.at_level(logging.DEBUG, logger="kvbm.kernels.host_memory"):
        with PinnedHostBuffer(PAGE_BYTES) as first, PinnedHostBuffer(PAGE_BYTES) as second:
            assert not first.pinned and not second.pinned
            assert not first.tensor().is_pinned()
            with pytest.raises(RuntimeError, match="not pinned"):
                first.device_ptr
            with pytest.raises(RuntimeError, match="not pinned"):
                first.mapped_pointer()
    fallback = [r for r in caplog.records if "unpinned" in r.getMessage()]
    assert len(fallback) == 1 and fallback[0].levelno == logging.DEBUG


# ---------------------------------------------------------------- registration bookkeeping with a fake runtime

class FakeRuntime(types.SimpleNamespace):
    """Stands in for cuda.bindings.runtime: records register/unregister calls; may fail one register call."""

    def __init__(self, fail_on_call: int | None = None):
        super().__init__(
            cudaHostRegisterPortable=cuda_rt.cudaHostRegisterPortable,
            cudaHostRegisterMapped=cuda_rt.cudaHostRegisterMapped,
            registered=[], unregistered=[], fail_on_call=fail_on_call,
        )

    def cudaHostRegister(self, ptr, size, flags):
        assert flags == cuda_rt.cudaHostRegisterPortable | cuda_rt.cudaHostRegisterMapped
        if len(self.registered) == self.fail_on_call:
            return (cuda_rt.cudaError_t.cudaErrorMemoryAllocation,)
        self.registered.append((ptr, size))
        return (cuda_rt.cudaError_t.cudaSuccess,)

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return (cuda_rt.cudaError_t.cudaSuccess,)

    def cudaHostGetDevicePointer(self, ptr, flags):
        return (cuda_rt.cudaError_t.cudaSuccess, ptr)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend CUDA is available and route the runtime calls of host_memory to a FakeRuntime."""
    def install(**kwargs):
        fake = FakeRuntime(**kwargs)
        monkeypatch.setattr(host_memory, "cuda_available", lambda: True)
        monkeypatch.setattr(host_memory, "cuda_rt", fake)
        return fake
    return install


def test_registration_in_chunks_and_unregistration_in_reverse(fake_cuda):
    fake = fake_cuda()
    buf = PinnedHostBuffer(5 * PAGE_BYTES + 1, chunk_bytes=2 * PAGE_BYTES)
    base = buf.host_ptr
    assert buf.pinned and buf.device_ptr == base
    assert fake.registered == [(base, 2 * PAGE_BYTES), (base + 2 * PAGE_BYTES, 2 * PAGE_BYTES),
                               (base + 4 * PAGE_BYTES, 2 * PAGE_BYTES)]
    buf.close()
    buf.close()
    assert fake.unregistered == [base + 4 * PAGE_BYTES, base + 2 * PAGE_BYTES, base]
    assert not buf.pinned


@needs_proc_maps
def test_register_failure_names_size_and_rolls_back(fake_cuda):
    fake = fake_cuda(fail_on_call=1)
    chunk, total = host_memory._format_bytes(4 * PAGE_BYTES), host_memory._format_bytes(8 * PAGE_BYTES)
    with pytest.raises(CudaError) as info:
        PinnedHostBuffer(8 * PAGE_BYTES, chunk_bytes=4 * PAGE_BYTES)
    message = str(info.value)
    assert f"of {chunk} (chunk 2 of 2, {total} in all)" in message and "cudaErrorMemoryAllocation" in message
    assert info.value.name == "cudaErrorMemoryAllocation"
    (first_ptr, _), = fake.registered
    assert fake.unregistered == [first_ptr]  # the chunk that did register is undone
    gc.collect()
    assert not is_mapped(first_ptr)


def test_mapped_pointer_carries_device_address_and_dtype(fake_cuda):
    fake_cuda()
    buf = PinnedHostBuffer(2 * PAGE_BYTES)
    arg = buf.mapped_pointer(torch.bfloat16, offset=PAGE_BYTES)
    assert isinstance(arg, MappedPointer)
    assert arg.dtype == torch.bfloat16 and arg.data_ptr() == buf.device_ptr + PAGE_BYTES
    with pytest.raises(ValueError, match="not aligned"):
        buf.mapped_pointer(torch.float32, offset=2)
    with pytest.raises(ValueError, match="offset must be"):
        buf.mapped_pointer(torch.uint8, offset=2 * PAGE_BYTES)
    buf.close()
    with pytest.raises(ValueError, match="closed"):
        arg.data_ptr()  # no dangling address after close


# ---------------------------------------------------------------- real CUDA

@needs_gpu
def test_gpu_buffer_is_pinned_and_mapped():
    with PinnedHostBuffer(4 << 20) as buf:
        assert buf.pinned and buf.tensor().is_pinned()
        device = torch.cuda.current_device()
        attr = cuda_rt.cudaDeviceAttr.cudaDevAttrCanUseHostPointerForRegisteredMem
        err, same_address = cuda_rt.cudaDeviceGetAttribute(attr, device)
        assert int(err) == 0
        if same_address:
            assert buf.device_ptr == buf.host_ptr


@needs_gpu
@pytest.mark.parametrize("chunk_bytes", [None, 1 << 20])
def test_gpu_d2h_and_h2d_through_torch_are_byte_exact(chunk_bytes):
    nbytes = 4 << 20
    stream = torch.cuda.Stream()
    source = random_bytes(nbytes, seed=10).cuda()
    with PinnedHostBuffer(nbytes, chunk_bytes=chunk_bytes) as buf:
        host = buf.tensor()
        host.copy_(random_bytes(nbytes, seed=11))  # poison
        back = random_bytes(nbytes, seed=12).cuda()  # poison
        stream.wait_stream(torch.cuda.current_stream())
        step = chunk_bytes or nbytes  # a DMA must stay inside one registration
        with torch.cuda.stream(stream):
            for lo in range(0, nbytes, step):
                host[lo:lo + step].copy_(source[lo:lo + step], non_blocking=True)
            for lo in range(0, nbytes, step):
                back[lo:lo + step].copy_(host[lo:lo + step], non_blocking=True)
        stream.synchronize()
        assert torch.equal(host, source.cpu())
        assert torch.equal(back.cpu(), source.cpu())


@needs_gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="zero-copy needs compiled Triton kernels")
def test_gpu_triton_kernel_writes_pinned_memory_through_mapped_pointer():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def copy_kernel(dst, src, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(dst + offsets, tl.load(src + offsets, mask=mask), mask=mask)

    nbytes = (1 << 20) + 77
    source = random_bytes(nbytes, seed=20).cuda()
    with PinnedHostBuffer(nbytes + 4096) as buf:
        poison = random_bytes(nbytes + 4096, seed=21)
        buf.tensor().copy_(poison)
        copy_kernel[(triton.cdiv(nbytes, 1024),)](buf.mapped_pointer(torch.uint8, offset=4096), source, nbytes,
                                                 BLOCK=1024)
        torch.cuda.synchronize()
        result = buf.tensor()
        assert torch.equal(result[4096:], source.cpu())
        assert torch.equal(result[:4096], poison[:4096])  # nothing written before the offset


def test_cache_pinning_and_the_unregistration_count_follow_the_buffer():
    """A cache over a buffer is pinned exactly when the buffer is (with a GPU), one over plain memory never, and
    closing a buffer bumps the unregistration count after which the engine checks pinning again."""
    from kvbm.layouts import block_major

    def cache(t):
        return block_major(t.view(2, 1, 1, 4, 1, 8), ("layer", "kv", "token", "head", "channel"))

    assert not host_memory.cache_is_pinned(cache(torch.zeros(64, dtype=torch.bfloat16)))
    buf = PinnedHostBuffer(4096)
    pinned_cache = cache(buf.tensor(torch.bfloat16)[:64])
    assert host_memory.cache_is_pinned(pinned_cache) == (buf.pinned and cuda_available())
    before = host_memory.unregistrations()
    buf.close()
    assert host_memory.unregistrations() == before + 1
    assert not host_memory.cache_is_pinned(pinned_cache)
    buf.close()  # idempotent: released once, counted once
    assert host_memory.unregistrations() == before + 1
