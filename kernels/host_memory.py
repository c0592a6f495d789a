"""Pinned host memory without waste: anonymous mmap + ``cudaHostRegister``, with a clean fallback without a GPU.

Why not ``torch.empty(..., pin_memory=True)``: torch's pinned (caching host) allocator rounds every allocation up
to a power of two; measured on the H200 test machine it used 1.78-1.92x the RAM asked for. A KV offload pool of
tens of GiB cannot afford that. Here the memory is an anonymous private mapping (page aligned, exactly the pages
asked for), placed on a NUMA node if asked, touched in parallel by a few threads (so that pinning does not fault
in gigabytes page by page in one thread), then registered with CUDA as portable (usable from every context) and
mapped (the GPU can read and write it directly over UVA, for zero-copy kernels).

Without a GPU (or without cuda-python) the same object is built and simply not pinned: ``pinned`` is False, the
memory is still mmap'd, and the fallback is logged once at debug level.

Lifetime: :meth:`PinnedHostBuffer.close` (also on context exit and from a finalizer) unregisters and unmaps; it is
idempotent. CPU tensor views from :meth:`PinnedHostBuffer.tensor` keep the *mapping* alive (never a dangling
pointer), but after ``close`` the memory is no longer pinned, and a device pointer taken earlier is invalid.
The caller must make sure no copy or kernel still uses the buffer when closing it.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import platform
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .cuda_runtime import CudaError, check, cuda_available, cuda_rt

if TYPE_CHECKING:
    from kvbm.layouts import PagedKVCache

__all__ = ["MappedPointer", "PinnedHostBuffer", "DEFAULT_CHUNK_BYTES"]

logger = logging.getLogger(__name__)

PAGE_BYTES = mmap.PAGESIZE
# One cudaHostRegister call per 256 GiB at most: NVIDIA r580+ drivers fail a single registration of 512 GiB or
# more (a per-call bookkeeping table hits the kernel's kvzalloc limit). Below that, one call is best, because a
# DMA must not span two registrations (the driver answers cudaErrorInvalidValue).
DEFAULT_CHUNK_BYTES = 256 << 30
# Below this size one thread touches the pages; above it, up to _MAX_TOUCH_THREADS threads share the work.
_PARALLEL_TOUCH_MIN_BYTES = 64 << 20
_MAX_TOUCH_THREADS = 8
# mbind(2) syscall numbers and MPOL_BIND, for placing the pages on one NUMA node.
_SYS_MBIND = {"x86_64": 237, "aarch64": 235}
_MPOL_BIND = 2

_fallback_logged = False
_fallback_lock = threading.Lock()


def _log_fallback_once() -> None:
    """Log once per process that host buffers are not pinned because CUDA is unavailable."""
    global _fallback_logged
    with _fallback_lock:
        if not _fallback_logged:
            _fallback_logged = True
            logger.debug("no usable CUDA GPU: PinnedHostBuffer allocates plain (unpinned) mmap'd host memory")


def _format_bytes(n: int) -> str:
    """Human-readable byte count, e.g. '8.00 GiB (8589934592 bytes)'."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit} ({n} bytes)"
    return f"{n} bytes"


def _check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive int (not a bool), else raise TypeError/ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def _bind_to_numa_node(address: int, length: int, node: int) -> None:
    """Bind the pages of [address, address+length) to NUMA node ``node`` with mbind(2) (before they are touched)."""
    machine = platform.machine()
    if machine not in _SYS_MBIND or not os.path.isdir("/sys/devices/system/node"):
        raise ValueError(f"numa_node needs Linux on x86_64 or aarch64, this is {platform.system()} {machine}")
    if not os.path.isdir(f"/sys/devices/system/node/node{node}"):
        nodes = sorted(e for e in os.listdir("/sys/devices/system/node") if e.startswith("node"))
        raise ValueError(f"numa_node={node} does not exist on this machine (nodes: {', '.join(nodes)})")
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    mask = (ctypes.c_ulong * (node // bits + 1))()
    mask[node // bits] = 1 << (node % bits)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(
        ctypes.c_long(_SYS_MBIND[machine]), ctypes.c_void_p(address), ctypes.c_ulong(length),
        ctypes.c_int(_MPOL_BIND), mask, ctypes.c_ulong(len(mask) * bits + 1), ctypes.c_uint(0),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mbind of {_format_bytes(length)} to NUMA node {node} failed: {os.strerror(err)}")


def _first_touch(mapping: mmap.mmap, length: int, threads: int) -> None:
    """Write one zero byte per page of ``mapping`` (keeping it all-zero), split over ``threads`` threads.

    numpy releases the GIL for the strided fill, so the page faults (and the kernel zeroing pages) run in
    parallel; afterwards ``cudaHostRegister`` only has to pin resident pages.
    """
    pages = np.frombuffer(mapping, dtype=np.uint8, count=length)[::PAGE_BYTES]
    if threads <= 1:
        pages.fill(0)
        return
    bounds = np.linspace(0, pages.size, threads + 1).astype(np.int64)
    workers = [
        threading.Thread(target=pages[lo:hi].fill, args=(0,), name=f"kvbm-first-touch-{i}")
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def cache_is_pinned(cache: PagedKVCache) -> bool:
    """Whether every tensor of a CPU cache is in pinned (page-locked, CUDA-registered) memory."""
    return all(t.is_pinned() for t in cache.tensors)


_unregistrations = [0]  # buffers unregistered in this process so far (see `unregistrations`)


def unregistrations() -> int:
    """How many buffers have been unregistered (closed) in this process: while it does not change, memory found
    pinned is still pinned (the transfer engine checks a host cache's pinning again only when it changes)."""
    return _unregistrations[0]


def _release(mapping: mmap.mmap, host_ptr: int, chunks: Sequence[tuple[int, int]], state: dict) -> None:
    """Unregister every registered chunk, then unmap; shared by close() and the finalizer (runs at most once).

    If CPU tensor views are still alive the mapping cannot be unmapped yet: it is then freed when the last view
    goes away. A failed unregister is raised (after the unmap) so it is never silent.
    """
    _unregistrations[0] += 1  # first: a transfer checking pinning meanwhile must not trust an older answer
    failure: Exception | None = None
    for offset, length in reversed(chunks):
        try:
            check(cuda_rt.cudaHostUnregister(host_ptr + offset), f"cudaHostUnregister(chunk at +{offset})")
        except Exception as exc:  # keep going: the other chunks and the mapping must still be released
            failure = failure or exc
    state["closed"] = True
    try:
        mapping.close()
    except BufferError:
        logger.debug("PinnedHostBuffer closed while CPU tensor views exist; memory is unmapped when they go")
    if failure is not None:
        raise failure


class PinnedHostBuffer:
    """``nbytes`` of page-aligned host memory, mmap'd and (with a GPU) pinned + mapped with ``cudaHostRegister``.

    Args:
        nbytes: bytes to provide (> 0); the mapping is rounded up to whole pages.
        numa_node: place the pages on this NUMA node (mbind, before first touch); ``None`` leaves placement to the
            process's memory policy. Pass the GPU's node for the best PCIe bandwidth.
        chunk_bytes: register in chunks of this many bytes (a multiple of the page size). A single DMA must not
            cross a chunk boundary, so choose a multiple of the unit your copies use; the default registers
            everything up to 256 GiB in one call.
        touch_threads: threads for the parallel first touch; default up to 8 for buffers of 64 MiB or more.
        shared_fd: map this file (a memfd other processes map too) shared instead of anonymous private memory; the
            file must hold at least the mapped pages. Each process registers its own mapping with CUDA.
        first_touch: zero the pages first (the default); a process attaching to memory another one already
            filled passes False, so that it does not overwrite what is there.

    Attributes: ``nbytes``, ``host_ptr``, ``device_ptr`` (pinned only), ``pinned``, ``chunk_bytes``, ``closed``.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        nbytes: int,
        *,
        numa_node: int | None = None,
        chunk_bytes: int | None = None,
        touch_threads: int | None = None,
        shared_fd: int | None = None,
        first_touch: bool = True,
    ) -> None:
        self.nbytes = _check_positive_int("nbytes", nbytes)
        mapped = -(-self.nbytes // PAGE_BYTES) * PAGE_BYTES
        chunk = DEFAULT_CHUNK_BYTES if chunk_bytes is None else _check_positive_int("chunk_bytes", chunk_bytes)
        if chunk % PAGE_BYTES:
            raise ValueError(f"chunk_bytes must be a multiple of the page size {PAGE_BYTES}, got {chunk}")
        if numa_node is not None:
            if isinstance(numa_node, bool) or not isinstance(numa_node, int):
                raise TypeError(f"numa_node must be an int or None, got {type(numa_node).__name__}")
            if numa_node < 0:
                raise ValueError(f"numa_node must be non-negative, got {numa_node}")
        if touch_threads is None:
            touch_threads = 1 if mapped < _PARALLEL_TOUCH_MIN_BYTES else min(_MAX_TOUCH_THREADS, os.cpu_count() or 1)
        else:
            touch_threads = _check_positive_int("touch_threads", touch_threads)
        self.chunk_bytes = chunk
        self.numa_node = numa_node

        started = time.perf_counter()
        if shared_fd is None:
            self._mmap = mmap.mmap(
                -1, mapped, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        else:
            if (size := os.fstat(shared_fd).st_size) < mapped:
                raise ValueError(f"shared_fd holds {size} bytes; the buffer maps {mapped}")
            self._mmap = mmap.mmap(shared_fd, mapped, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        address_view = np.frombuffer(self._mmap, dtype=np.uint8)
        self.host_ptr: int = int(address_view.ctypes.data)
        del address_view  # release the buffer export so that close() can unmap
        self._state = {"closed": False}
        self._chunks: list[tuple[int, int]] = []
        self._device_ptr: int | None = None
        self._registered = False
        # From here on the mapping is released by the finalizer whatever happens.
        self._finalizer = weakref.finalize(self, _release, self._mmap, self.host_ptr, self._chunks, self._state)
        try:
            self._advise(mapped)
            if numa_node is not None:
                _bind_to_numa_node(self.host_ptr, mapped, numa_node)
            if first_touch:
                _first_touch(self._mmap, mapped, touch_threads)
            touched = time.perf_counter()
            if cuda_available():
                self._register(mapped)
                self._registered = True
            else:
                _log_fallback_once()
        except BaseException:
            self._finalizer()
            raise
        logger.debug(
            "PinnedHostBuffer %s: first touch (%d threads) %.3f s, %s %.3f s",
            _format_bytes(mapped), touch_threads, touched - started,
            "cudaHostRegister" if self._registered else "no pinning", time.perf_counter() - touched,
        )

    def _advise(self, mapped: int) -> None:
        """Ask for transparent huge pages (fewer pages to fault and pin) and keep the mapping out of fork()ed children.

        Pinned pages shared copy-on-write with a child would otherwise be copied at fork time, gigabytes at once.
        Both are hints: kernels without THP answer EINVAL, which is ignored.
        """
        for advice in (getattr(mmap, "MADV_HUGEPAGE", None), getattr(mmap, "MADV_DONTFORK", None)):
            if advice is not None:
                try:
                    self._mmap.madvise(advice, 0, mapped)
                except OSError as exc:
                    logger.debug("madvise(%d) on a %s host buffer ignored: %s", advice, _format_bytes(mapped), exc)

    def _register(self, mapped: int) -> None:
        """cudaHostRegister the mapping chunk by chunk (portable + mapped); raise CudaError on failure (the caller's
        cleanup unregisters the chunks already registered)."""
        flags = cuda_rt.cudaHostRegisterPortable | cuda_rt.cudaHostRegisterMapped
        n_chunks = -(-mapped // self.chunk_bytes)
        for index, offset in enumerate(range(0, mapped, self.chunk_bytes)):
            length = min(self.chunk_bytes, mapped - offset)
            try:
                check(cuda_rt.cudaHostRegister(self.host_ptr + offset, length, flags), "cudaHostRegister")
            except CudaError as exc:
                raise CudaError(
                    f"cudaHostRegister(portable|mapped) of {_format_bytes(length)} (chunk {index + 1} of "
                    f"{n_chunks}, {_format_bytes(mapped)} in all)", exc.code, exc.name,
                    f"{exc.detail or 'no description'}; is there enough free RAM to lock this much (and no "
                    f"container memory limit)?",
                ) from None
            self._chunks.append((offset, length))
        self._device_ptr = int(check(cuda_rt.cudaHostGetDevicePointer(self.host_ptr, 0), "cudaHostGetDevicePointer"))

    @property
    def pinned(self) -> bool:
        """True while the memory is registered with CUDA (False without a GPU, and after :meth:`close`)."""
        return self._registered and not self.closed

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (or the finalizer did)."""
        return self._state["closed"]

    @property
    def device_ptr(self) -> int:
        """Device address of the buffer for kernels (zero-copy over PCIe); equals ``host_ptr`` under UVA.

        Raises RuntimeError when the buffer is not pinned (no GPU) or is closed.
        """
        self._check_open()
        if self._device_ptr is None:
            raise RuntimeError("this PinnedHostBuffer is not pinned (no CUDA GPU), so it has no device address")
        return self._device_ptr

    def tensor(self, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """A 1-D CPU tensor of ``dtype`` over the whole buffer (same memory, no copy; pinned if the buffer is).

        The view keeps the mapping alive even after :meth:`close`. ``nbytes`` must be a multiple of the dtype's size.
        """
        self._check_open()
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if self.nbytes % itemsize:
            raise ValueError(f"{self.nbytes} bytes are not a whole number of {dtype} elements ({itemsize} bytes each)")
        # numpy holds the mmap's buffer export for as long as the tensor lives (torch.frombuffer would not).
        raw = torch.from_numpy(np.frombuffer(self._mmap, dtype=np.uint8, count=self.nbytes))
        return raw if dtype == torch.uint8 else raw.view(dtype)

    def mapped_pointer(self, dtype: torch.dtype = torch.uint8, offset: int = 0) -> MappedPointer:
        """A Triton-compatible pointer argument for the device address ``device_ptr + offset`` (pinned only)."""
        return MappedPointer(self, dtype, offset)

    def close(self) -> None:
        """Unregister from CUDA and unmap (idempotent). No copy or kernel may still be using the buffer."""
        self._finalizer()
        self._mmap = None  # with CPU views still alive, the mapping now goes away with the last of them

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("this PinnedHostBuffer is closed")

    def __enter__(self) -> PinnedHostBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("pinned" if self.pinned else "unpinned")
        return f"PinnedHostBuffer({_format_bytes(self.nbytes)}, {state}, host_ptr={self.host_ptr:#x})"


class MappedPointer:
    """The device address of (part of) a pinned :class:`PinnedHostBuffer`, as a Triton kernel pointer argument.

    Triton launches accept any object with ``data_ptr()`` and ``dtype`` as a pointer ``*dtype``; this one lets a
    kernel read or write pinned host memory directly over UVA (zero-copy). It holds the buffer, and
    ``data_ptr()`` raises once the buffer is closed instead of handing out a dangling address.
    """

    __slots__ = ("buffer", "dtype", "offset")

    def __init__(self, buffer: PinnedHostBuffer, dtype: torch.dtype, offset: int = 0) -> None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < buffer.nbytes:
            raise ValueError(f"offset must be an int in [0, {buffer.nbytes}), got {offset!r}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offset % itemsize:
            raise ValueError(f"offset {offset} is not aligned to {dtype} ({itemsize} bytes)")
        _ = buffer.device_ptr  # raises now (not at launch) if the buffer is unpinned or closed
        self.buffer = buffer
        self.dtype = dtype
        self.offset = offset

    def data_ptr(self) -> int:
        """Device address of the first element (what Triton passes to the kernel)."""
        return self.buffer.device_ptr + self.offset

    def __repr__(self) -> str:
        return f"MappedPointer({self.dtype}, offset={self.offset}, of {self.buffer!r})"
