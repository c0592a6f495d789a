"""Shared helpers of the block manager tests: a "G1" cache, per-block byte access, configs and fault seams.

G1 lives on the CPU (the CPU kernels move blocks) unless ``KVBM_TEST_G1_DEVICE=cuda`` is set on a GPU machine:
then the same suite runs through the GPU transfer engine (``KVBM_TEST_G1_DEVICE=cuda pytest tests/test_manager*.py``).
"""
from __future__ import annotations

import os

import numpy as np
import torch

import kvbm.kernels.paths as paths
from kvbm.kernels.block_transfer import BlockTransfer
from kvbm.config import KvbmConfig
from kvbm.layouts import KVGeometry, PagedKVCache, allocate

#: 2 layers x K/V x 4 tokens x 2 heads x 64 channels x bf16 = 4096 bytes: a multiple of 4 KiB (no slot padding).
GEOM = KVGeometry(num_layers=2, num_kv=2, block_size=4, num_heads=2, head_dim=64, itemsize=2)
#: 3072 bytes per block: disk slots are padded to 4096, so G3 I/O goes through the padded bounce buffer.
GEOM_PADDED = KVGeometry(num_layers=2, num_kv=2, block_size=4, num_heads=2, head_dim=48, itemsize=2)

POISON = 0xA5
#: Device of the G1 stand-in: "cpu" (CI) or "cuda".
G1_DEVICE = os.environ.get("KVBM_TEST_G1_DEVICE", "cpu")
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def make_gpu(num_blocks: int, rng: np.random.Generator, geometry: KVGeometry = GEOM,
             preset: str = "vllm_flash_attn_nhd") -> PagedKVCache:
    """A stand-in for the engine's G1 cache on ``G1_DEVICE``, every byte random."""
    cache = allocate(preset, geometry, num_blocks, dtype=torch.bfloat16, device=G1_DEVICE)
    for t in cache.tensors:
        b = t.view(torch.uint8)
        b.copy_(torch.from_numpy(rng.integers(0, 256, b.shape, dtype=np.uint8)))
    return cache


def read_block(cache: PagedKVCache, block: int) -> bytes:
    """All bytes of one block, piece by piece (layer-major, K before V)."""
    g = cache.geometry
    itype = _INT[g.itemsize]
    parts = [cache.piece_view(layer, kv, itype)[block].contiguous().cpu().view(torch.uint8).numpy().tobytes()
             for layer in range(g.num_layers) for kv in range(g.num_kv)]
    return b"".join(parts)


def write_block(cache: PagedKVCache, block: int, data: bytes) -> None:
    """Overwrite one block with ``data`` (as laid out by ``read_block``)."""
    g = cache.geometry
    itype = _INT[g.itemsize]
    piece = g.piece_elems * g.itemsize
    if len(data) != piece * g.num_pieces:
        raise ValueError(f"block data must be {piece * g.num_pieces} bytes, got {len(data)}")
    for p in range(g.num_pieces):
        layer, kv = divmod(p, g.num_kv)
        src = torch.frombuffer(bytearray(data[p * piece:(p + 1) * piece]), dtype=torch.uint8)
        view = cache.piece_view(layer, kv, itype)[block]
        view.copy_(src.view(itype).view(view.shape))


def poison_block(cache: PagedKVCache, block: int) -> bytes:
    """Fill one block with the poison byte; return its new content."""
    data = bytes([POISON]) * cache.geometry.block_bytes
    write_block(cache, block, data)
    return data


def config(tmp_path=None, *, host: int | None = None, disk: int | None = None, **kw) -> KvbmConfig:
    """A config with ``host`` G2 blocks and ``disk`` G3 blocks (in ``tmp_path``); ``kw`` sets other fields. The
    cost-aware hit rule is off unless asked for: these tests delay or fail transfers on purpose, which it would learn
    as slow tiers (its own tests are in test_cost_policy.py)."""
    kw.setdefault("disable_cost_aware_hits", True)
    if disk is not None:
        kw.setdefault("disk_cache_dir", tmp_path)
    return KvbmConfig(cpu_cache_override_num_blocks=host, disk_cache_override_num_blocks=disk, **kw)


def patch_copies(monkeypatch, mgr, make) -> None:
    """Route every layout copy the transfer paths make through ``make(real_copy)`` (same argument order: src, dst,
    ids, ids): ``copy_blocks`` in each path module (CPU G1, the GPU's disk bounce buffers), the copies of disk
    writes and reads on the I/O threads (``host_disk.block_copier``) and, on a GPU, the transfer engine's offload
    and onboard."""
    for module in (paths.host_host, paths.host_disk, paths.gpu_host, paths.gpu_disk):
        if hasattr(module, "copy_blocks"):
            monkeypatch.setattr(module, "copy_blocks", make(module.copy_blocks))
    real_copier = paths.host_disk.block_copier
    copy = make(lambda src, dst, src_ids, dst_ids: real_copier(src, dst)(src_ids, dst_ids))
    monkeypatch.setattr(paths.host_disk, "block_copier",
                        lambda src, dst: lambda src_ids, dst_ids: copy(src, dst, src_ids, dst_ids))
    if mgr.gpu.device.type == "cuda":
        from kvbm.kernels.transfer import TransferEngine

        for name in ("offload", "onboard"):
            real = getattr(TransferEngine, name)
            monkeypatch.setattr(TransferEngine, name,
                                lambda self, *a, _real=real, **k: make(lambda *b, **c: _real(self, *b, **c))(*a, **k))


def delay_completions(monkeypatch, mgr, gate) -> None:
    """Make every transfer the manager submits finish only once ``gate`` (an object with ``query()`` and
    ``synchronize()``, like a CUDA event) says so, and never before the real transfer."""
    transfers = mgr.store.transfers
    real_submit = transfers.submit

    def gated_submit(*args, **kwargs):
        transfer = real_submit(*args, **kwargs)
        waitable = gate()

        def steps():
            yield waitable
            transfer.wait()
            return transfer.reasons

        return BlockTransfer(transfer.num_blocks, transfer.path, steps())

    monkeypatch.setattr(transfers, "submit", gated_submit)
