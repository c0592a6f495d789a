"""GPU <-> host and GPU -> GPU.

A pinned host cache whose blocks are whole contiguous runs (G2, dense bounce buffers) goes through the
`TransferEngine`: staged gather/scatter plus DMA, or whole-block DMA where both sides allow it, on the engine's own
streams. Any other pinned host cache (a bounce buffer whose slots carry padding) is read or written by the copy
kernel over UVA on a side stream. GPU -> GPU copies run the kernel on the side stream too. Every transfer is
ordered after the work queued so far on the caller's current stream and completes through a CUDA event.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvbm.layouts import copy_blocks

from ..block_transfer import BlockTransfer, Steps
from ..copy_plan import IdentityMemo, IdentitySequenceMemo
from ..host_memory import cache_is_pinned, unregistrations
from ..medium import Medium, medium_of
from ..transfer import TransferEngine, TransferSpec
from ..transfers import Transfers, register_path

__all__ = ["GpuHostPath", "blocks_dense", "whole_blocks_contiguous"]


def whole_blocks_contiguous(cache: Any) -> bool:
    """Whether each block of ``cache`` is one dense run of ``block_bytes`` at a stride of ``block_bytes`` (a
    block-major cache: a run of consecutive blocks is one dense run too)."""
    g = cache.geometry
    return blocks_dense(cache) and cache.layout.stride["block"] * g.itemsize == g.block_bytes


def blocks_dense(cache: Any) -> bool:
    """Whether each block of ``cache`` is one dense run of ``block_bytes`` at a block stride of at least that (what
    the transfer engine's staging and DMAs need of a host cache: a block-major cache, or a layer view of one)."""
    lay, g = cache.layout, cache.geometry
    if len(set(lay.piece_tensor)) != 1 or lay.stride["block"] * g.itemsize < g.block_bytes:
        return False
    sizes = (g.block_size, g.num_heads, g.head_dim)
    extent = sum((n - 1) * abs(s) for n, s in zip(sizes, lay.strides[1:])) + 1
    lo, hi = min(lay.piece_offset), max(lay.piece_offset) + extent
    # describe() refuses aliasing pieces, so a footprint of exactly one block's elements is dense
    return (hi - lo) * g.itemsize == g.block_bytes and extent * g.num_pieces * g.itemsize == g.block_bytes


def _await_handle(handle: Any) -> Steps:
    """Steps of a `TransferHandle`: wait for its event, then every block OK, or every block failed."""
    yield handle
    if handle.error is not None:
        return {i: f"{handle.path} transfer failed: {handle.error!r}" for i in range(handle.num_blocks)}
    return {}


def _block_transfer(handle: Any) -> BlockTransfer:
    """The `BlockTransfer` of an engine's `TransferHandle`."""
    device_done = handle.event if handle.error is None else None
    return BlockTransfer(handle.num_blocks, handle.path, _await_handle(handle), device_done=device_done)


def _await_event(event: Any) -> Steps:
    yield event
    return {}


class GpuHostPath:
    """Moves blocks between a GPU cache and a pinned host cache, or between two GPU caches."""

    name = "gpu-host"

    def __init__(self, transfers: Transfers) -> None:
        self._transfers = transfers
        # (src, dst) -> (by the engine?, host unregistrations when checked): one entry per live cache pair
        self._pairs = IdentityMemo(limit=None)
        # caches of a sequence of pairs -> (all onboards the engine moves into one GPU?, unregistrations when checked)
        self._group_onboards = IdentitySequenceMemo()
        self._engines: dict[Any, TransferEngine] = {}  # (each submit takes its device's engine from here)

    def _engine(self, device: Any) -> TransferEngine:
        engine = self._engines.get(device)
        if engine is None:
            engine = self._engines[device] = self._transfers.shared(f"transfer_engine:{device}",
                                                                    lambda: TransferEngine(device))
        return engine

    def _side_stream(self, device: Any) -> Any:
        return self._transfers.shared(f"side_stream:{device}", lambda: torch.cuda.Stream(device, priority=-1))

    def submit(self, src: Any, dst: Any, src_ids: np.ndarray, dst_ids: np.ndarray) -> BlockTransfer:
        """Enqueue the copy; raises ValueError for an unpinned host cache or a GPU other than ``src``'s."""
        gpu = src if medium_of(src) is Medium.GPU else dst
        if self._by_engine(src, dst):
            spec = TransferSpec("d2h" if gpu is src else "h2d", src, dst, src_ids, dst_ids)
            handle = self._engine(gpu.device).submit([spec], ids_checked=True)[0]  # (ids checked by the face)
            return _block_transfer(handle)
        return self._by_kernel(gpu.device, src, dst, src_ids, dst_ids)

    def submit_groups(self, pairs: Sequence[tuple[Any, Any]], src_ids: np.ndarray, dst_ids: np.ndarray
                      ) -> list[BlockTransfer]:
        """``submit`` of the same ids for each (src, dst) pair, in order: onboards of engine-moved host caches into
        one GPU's caches (a layer-wise load's layer groups) in one call (`TransferEngine.onboard_groups`), any other
        pairs one by one."""
        if self._onboards_by_engine(pairs):
            handles = self._engine(pairs[0][1].device).onboard_groups(pairs, src_ids, dst_ids, ids_checked=True)
            return [_block_transfer(handle) for handle in handles]
        return [self.submit(src, dst, src_ids, dst_ids) for src, dst in pairs]

    def _onboards_by_engine(self, pairs: Sequence[tuple[Any, Any]]) -> bool:
        """Whether every pair is a host cache the engine moves into a cache of the first pair's GPU (raises as
        `_by_engine` for a host side not in pinned memory); kept per sequence of pairs until a host buffer is
        closed."""
        caches = [cache for pair in pairs for cache in pair]
        kept = self._group_onboards.find(caches)
        if kept is None or kept[1] != unregistrations():
            device = pairs[0][1].device
            onboards = medium_of(pairs[0][0]) is Medium.HOST and all(
                medium_of(g) is Medium.GPU and g.device == device and self._by_engine(h, g) for h, g in pairs)
            kept = self._group_onboards.keep(caches, (onboards, unregistrations()))
        return kept[0]

    def prepare(self, src: Any, dst: Any) -> None:
        """Build the transfer engine's plans and kernels for ``src`` -> ``dst`` now where the engine moves them
        (`TransferEngine.prepare`); the copy kernel's other pairs compile on first use."""
        if self._by_engine(src, dst):  # (never GPU -> GPU: the kernel's pairs)
            gpu = src if medium_of(src) is Medium.GPU else dst
            self._engine(gpu.device).prepare("d2h" if gpu is src else "h2d", src, dst)

    def _by_engine(self, src: Any, dst: Any) -> bool:
        """Whether the transfer engine moves ``src`` -> ``dst`` (a host side whose blocks are dense runs); raises
        ValueError for a host side not in pinned memory. Kept per cache pair until a host buffer is closed."""
        key = (id(src), id(dst))
        kept = self._pairs.find(key, src, dst)
        if kept is None or kept[1] != unregistrations():  # (a host buffer closed since: check pinning again)
            kinds = medium_of(src), medium_of(dst)
            host = None if kinds == (Medium.GPU, Medium.GPU) else (src if kinds[0] is Medium.HOST else dst)
            if host is not None and not cache_is_pinned(host):
                raise ValueError(f"host cache {host.name} must be in pinned memory to be moved to or from the GPU "
                                 f"(see kvbm.kernels.host_memory.PinnedHostBuffer)")
            kept = self._pairs.keep(key, (host is not None and blocks_dense(host), unregistrations()), src, dst)
        return kept[0]

    def _by_kernel(self, device: Any, src: Any, dst: Any, src_ids: np.ndarray, dst_ids: np.ndarray) -> BlockTransfer:
        """The copy kernel on the side stream (over UVA for a host side), after the caller's queued work."""
        stream = self._side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            copy_blocks(src, dst, src_ids, dst_ids, backend="triton")
            event = torch.cuda.Event()
            event.record(stream)
        return BlockTransfer(src_ids.size, "zero_copy", _await_event(event), device_done=event)

    def close(self) -> None:
        """The engine and side streams are shared resources of the `Transfers` object."""


register_path(Medium.GPU, Medium.HOST, GpuHostPath)
register_path(Medium.HOST, Medium.GPU, GpuHostPath)
register_path(Medium.GPU, Medium.GPU, GpuHostPath)
