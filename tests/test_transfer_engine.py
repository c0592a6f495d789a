"""TransferEngine on a GPU: every path, both directions, several layouts and host orders, byte-exact against the
torch reference, with poisoned destinations (blocks not named must stay poisoned). Small staging slots force
transfers of several chunks and slot reuse across back-to-back transfers.

Skipped without a GPU: the engine is CUDA streams, events, pinned memory and compiled kernels. The same kernels run
in CI through Triton's interpreter and the numba backend (test_kernels.py), and the host-side planning on CPU
(test_transfer_plan.py).
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

from kvbm.kernels.cuda_runtime import cuda_available
from kvbm.layouts import KVGeometry, allocate, block_major, copy_blocks
from kvbm.layouts.presets import STAGING_ORDER

pytestmark = [
    pytest.mark.skipif(not cuda_available(), reason="the transfer engine needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the engine launches compiled kernels"),
]

GEOM = KVGeometry(num_layers=3, num_kv=2, block_size=4, num_heads=2, head_dim=64, itemsize=2)
MLA = KVGeometry(num_layers=3, num_kv=1, block_size=4, num_heads=1, head_dim=576, itemsize=2)
HEAD_FIRST = ("layer", "kv", "head", "token", "channel")
CASES = [  # (preset, geometry, host inner order)
    ("vllm_flash_attn_nhd", GEOM, STAGING_ORDER),
    ("vllm_flash_attn_hnd", GEOM, HEAD_FIRST),
    ("vllm_flash_attn_hnd", GEOM, STAGING_ORDER),  # HND -> NHD permuted on the way
    ("vllm_flashinfer_nhd", GEOM, STAGING_ORDER),
    ("trtllm_pool", GEOM, HEAD_FIRST),
    ("vllm_mla", MLA, STAGING_ORDER),
]
GPU_BLOCKS, HOST_BLOCKS, N = 40, 24, 10
POISON = 0xA5


def random_fill(tensors, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for t in tensors:
        b = t.view(torch.uint8)
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen).to(b.device))


def host_cache(buffer, g: KVGeometry, order, blocks: int = HOST_BLOCKS):
    sizes = {"layer": g.num_layers, "kv": g.num_kv, "token": g.block_size, "head": g.num_heads, "channel": g.head_dim}
    return block_major(buffer.tensor(torch.bfloat16)[: blocks * g.block_bytes // 2].view(
        blocks, *[sizes[n] for n in order]), order)


def bytes_of(cache) -> list[torch.Tensor]:
    return [t.view(torch.uint8).cpu().clone() for t in cache.tensors]


def reference_copy(src, dst, src_ids, dst_ids):
    """What dst must hold after the copy: a clone of dst, copied into by the torch reference."""
    clones = [t.clone() for t in dst.tensors]
    ref = type(dst)(clones, dst.layout)
    copy_blocks(src, ref, src_ids, dst_ids, backend="torch")
    return bytes_of(ref)


def dense_rows(gpu, host) -> bool:
    from kvbm.kernels.copy_plan import build_plan

    dims = build_plan(gpu, host).dims
    return dims[2][1] == dims[2][2] == 1


def poison_gpu_blocks(gpu, ids) -> None:
    """Fill blocks `ids` of a bf16 GPU cache with the poison byte in every (layer, kv) piece."""
    for layer in range(gpu.geometry.num_layers):
        for kv in range(gpu.geometry.num_kv):
            gpu.piece_view(layer, kv, torch.int16)[torch.as_tensor(ids, device="cuda")] = -23131  # 0xA5A5


def small_engine_and_gpu(engine_factory, seed: int):
    """An engine of two slots and an 8-block FA NHD GPU cache of random bytes (GEOM), for the checks' tests."""
    gpu = allocate("vllm_flash_attn_nhd", GEOM, 8, dtype=torch.bfloat16, device="cuda")
    random_fill(gpu.tensors, seed)
    return engine_factory(GEOM, 2), gpu


@pytest.fixture
def engine_factory():
    from kvbm.kernels.transfer import TransferEngine

    def make(g: KVGeometry, slots: int, blocks_per_slot: int = 3):
        return TransferEngine("cuda", staging_bytes=slots * blocks_per_slot * g.block_bytes, staging_slots=slots)
    return make


@pytest.mark.parametrize("preset,g,order", CASES, ids=[f"{c[0]}-{'hnd' if c[2] == HEAD_FIRST else 'nhd'}" for c in CASES])
@pytest.mark.parametrize("path", ["staged", "zero_copy", "dma", "auto"])
@pytest.mark.parametrize("slots", [2, 4])
def test_offload_then_onboard_byte_exact(preset, g, order, path, slots, engine_factory):
    seed = zlib.crc32(f"{preset}/{order}/{path}/{slots}".encode())
    round_trip(engine_factory(g, slots), preset, g, order, path, seed)


@pytest.mark.parametrize("preset,g,order", CASES, ids=[f"{c[0]}-{'hnd' if c[2] == HEAD_FIRST else 'nhd'}" for c in CASES])
@pytest.mark.parametrize("enqueue", ["compiled", "python"])
def test_staged_transfers_through_either_enqueue_byte_exact(preset, g, order, enqueue, engine_factory, monkeypatch):
    """Staged transfers take the compiled enqueue by default; with it unavailable, the Python path copies the same
    bytes (several chunks each way, both staging slots in use)."""
    from kvbm.kernels.transfer import TransferEngine

    engine = engine_factory(g, 2)
    if enqueue == "python":
        engine._enqueue = None
    taken = []
    compiled = TransferEngine._staged_compiled

    def spy(self, *args, **kwargs):
        taken.append(1)
        return compiled(self, *args, **kwargs)

    monkeypatch.setattr(TransferEngine, "_staged_compiled", spy)
    round_trip(engine, preset, g, order, "staged", zlib.crc32(f"{preset}/{order}/{enqueue}".encode()))
    assert len(taken) == (2 if enqueue == "compiled" else 0)


def round_trip(engine, preset: str, g: KVGeometry, order, path: str, seed: int) -> None:
    """Offload N random GPU blocks into a poisoned host cache (a run of consecutive host blocks and scattered ones),
    then onboard them into other, poisoned GPU blocks; both byte-exact against the torch reference."""
    from kvbm.kernels.host_memory import PinnedHostBuffer

    rng = np.random.default_rng(seed)
    gpu = allocate(preset, g, GPU_BLOCKS, dtype=torch.bfloat16, device="cuda")
    random_fill(gpu.tensors, seed)
    with PinnedHostBuffer(HOST_BLOCKS * g.block_bytes) as buf:
        host = host_cache(buf, g, order)
        host.tensors[0].view(torch.uint8).fill_(POISON)
        gpu_ids = rng.choice(GPU_BLOCKS // 2, N, replace=False)
        host_ids = np.concatenate([np.arange(5, 9), rng.choice(np.r_[0:5, 9:HOST_BLOCKS], N - 4, replace=False)])
        want_host = reference_copy(gpu, host, gpu_ids, host_ids)
        handle = engine.offload(gpu, host, gpu_ids, host_ids, path=path)
        if path == "dma" and not dense_rows(gpu, host):
            with pytest.raises(ValueError, match="not dense"):
                handle.wait()
            return
        handle.wait()
        assert handle.ok and handle.done() and handle.num_blocks == N
        assert all(torch.equal(a, b) for a, b in zip(bytes_of(host), want_host))
        dst_ids = GPU_BLOCKS // 2 + rng.choice(GPU_BLOCKS // 2, N, replace=False)
        poison_gpu_blocks(gpu, dst_ids)
        want_gpu = reference_copy(host, gpu, host_ids, dst_ids)
        handle = engine.onboard(host, gpu, host_ids, dst_ids, path=path)
        handle.wait()
        assert handle.ok
        assert all(torch.equal(a, b) for a, b in zip(bytes_of(gpu), want_gpu))


@pytest.mark.parametrize("slots", [2, 3])
def test_back_to_back_transfers_reuse_slots_without_waiting(slots, engine_factory):
    """Many transfers queued at once (slots reused across transfers and directions), waited for at the end."""
    from kvbm.kernels.host_memory import PinnedHostBuffer

    g = GEOM
    gpu = allocate("vllm_flash_attn_nhd", g, GPU_BLOCKS, dtype=torch.bfloat16, device="cuda")
    random_fill(gpu.tensors, 7)
    engine = engine_factory(g, slots, blocks_per_slot=2)
    with PinnedHostBuffer(HOST_BLOCKS * g.block_bytes) as buf:
        host = host_cache(buf, g, STAGING_ORDER)
        host.tensors[0].view(torch.uint8).fill_(POISON)
        rng = np.random.default_rng(8)
        order = rng.permutation(HOST_BLOCKS)
        groups = [order[i:i + 5] for i in range(0, 20, 5)]  # four offloads of 5 blocks: 3 chunks each
        sources = [rng.choice(GPU_BLOCKS // 2, 5, replace=False) for _ in groups]
        expected = block_major(host.tensors[0].clone(), STAGING_ORDER)  # pageable copy, same poison
        for src_ids, host_ids in zip(sources, groups):
            copy_blocks(gpu, expected, src_ids, host_ids, backend="torch")
        handles = [engine.offload(gpu, host, s, h, path="staged") for s, h in zip(sources, groups)]
        # onboards of the first group's blocks, queued behind the offloads on the other lane
        dst_ids = GPU_BLOCKS // 2 + np.arange(5)
        handles[0].wait()
        onboard = engine.onboard(host, gpu, groups[0], dst_ids, path="staged")
        for h in handles[1:] + [onboard]:
            h.wait()
            assert h.ok
        assert torch.equal(bytes_of(host)[0], bytes_of(expected)[0])
        for k in range(5):
            for layer in range(g.num_layers):
                for kv in range(g.num_kv):
                    view = gpu.piece_view(layer, kv, torch.int16)
                    assert torch.equal(view[int(dst_ids[k])], view[int(sources[0][k])])


def test_bad_input_is_refused_before_anything_is_enqueued(engine_factory):
    from kvbm.kernels.host_memory import PinnedHostBuffer

    g = GEOM
    engine = engine_factory(g, 2)
    gpu = allocate("vllm_flash_attn_nhd", g, 8, dtype=torch.bfloat16, device="cuda")
    pageable = block_major(torch.zeros(4, 3, 2, 4, 2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="pinned CPU memory"):
        engine.offload(gpu, pageable, [0], [0])
    with PinnedHostBuffer(4 * g.block_bytes) as buf:
        host = host_cache(buf, g, STAGING_ORDER, blocks=4)
        with pytest.raises(ValueError, match="path must be one of"):
            engine.offload(gpu, host, [0], [0], path="fast")
        with pytest.raises(IndexError, match="out of range"):
            engine.offload(gpu, host, [0], [4])
        with pytest.raises(ValueError, match="duplicates"):
            engine.onboard(host, gpu, [0, 1], [3, 3])
        with pytest.raises(ValueError, match="gather must be"):
            engine.offload(gpu, host, [0], [0], path="staged", gather="magic").wait()
    with pytest.raises(ValueError, match="staging_slots"):
        type(engine)("cuda", staging_slots=1)


@pytest.mark.parametrize("preset,g,order", CASES[:2] + CASES[-2:], ids=["fa-nhd", "fa-hnd", "trtllm", "mla"])
def test_submit_interleaves_transfers_byte_exact(preset, g, order, engine_factory):
    """Two offloads and an onboard of several chunks each, submitted together: their chunks are enqueued in turn
    (slots shared across them), and every destination holds the reference bytes; blocks not named stay poisoned."""
    from kvbm.kernels.host_memory import PinnedHostBuffer
    from kvbm.kernels.transfer import TransferSpec

    seed = zlib.crc32(f"submit/{preset}/{order}".encode())
    rng = np.random.default_rng(seed)
    gpu = allocate(preset, g, GPU_BLOCKS, dtype=torch.bfloat16, device="cuda")
    random_fill(gpu.tensors, seed)
    engine = engine_factory(g, 2, blocks_per_slot=2)
    with PinnedHostBuffer(HOST_BLOCKS * g.block_bytes) as buf:
        host = host_cache(buf, g, order)
        random_fill(host.tensors, seed + 1)
        order_ids = rng.permutation(HOST_BLOCKS)
        out_a, out_b, source = order_ids[:7], order_ids[7:12], order_ids[12:18]
        host.tensors[0].view(torch.uint8)[torch.as_tensor(np.r_[out_a, out_b])] = POISON
        gpu_a = rng.choice(GPU_BLOCKS // 2, 7, replace=False)
        gpu_b = rng.choice(GPU_BLOCKS // 2, 5, replace=False)
        into = GPU_BLOCKS // 2 + rng.choice(GPU_BLOCKS // 2, 6, replace=False)
        poison_gpu_blocks(gpu, into)
        want_host = reference_copy(gpu, host, np.r_[gpu_a, gpu_b], np.r_[out_a, out_b])
        want_gpu = reference_copy(host, gpu, source, into)
        handles = engine.submit([TransferSpec("d2h", gpu, host, gpu_a, out_a, "staged"),
                                 TransferSpec("h2d", host, gpu, source, into, "staged"),
                                 TransferSpec("d2h", gpu, host, gpu_b, out_b, "auto")])
        for h in handles:
            h.wait()
            assert h.ok and h.done()
        assert [h.num_blocks for h in handles] == [7, 6, 5]
        assert all(torch.equal(a, b) for a, b in zip(bytes_of(host), want_host))
        assert all(torch.equal(a, b) for a, b in zip(bytes_of(gpu), want_gpu))


def test_submit_checks_every_transfer_before_enqueueing_any(engine_factory):
    """A bad transfer in a submission raises and the good ones before it are not enqueued; a failure while
    enqueueing (an unknown gather option) fails that transfer's handle only."""
    from kvbm.kernels.host_memory import PinnedHostBuffer
    from kvbm.kernels.transfer import TransferSpec

    g = GEOM
    engine, gpu = small_engine_and_gpu(engine_factory, 11)
    with PinnedHostBuffer(4 * g.block_bytes) as buf:
        host = host_cache(buf, g, STAGING_ORDER, blocks=4)
        host.tensors[0].view(torch.uint8).fill_(POISON)
        good = TransferSpec("d2h", gpu, host, [1, 2], [0, 1], "staged")
        with pytest.raises(IndexError, match="out of range"):
            engine.submit([good, TransferSpec("d2h", gpu, host, [3], [4])])
        with pytest.raises(ValueError, match="direction must be"):
            engine.submit([good, TransferSpec("up", gpu, host, [3], [2])])
        torch.cuda.synchronize()
        assert bool((host.tensors[0].view(torch.uint8) == POISON).all())  # nothing was enqueued
        want = reference_copy(gpu, host, [1, 2], [0, 1])
        bad = TransferSpec("d2h", gpu, host, [3], [2], "staged", {"gather": "magic"})
        done, failed = engine.submit([good, bad])
        done.wait()
        with pytest.raises(ValueError, match="gather must be"):
            failed.wait()
        assert done.ok and not failed.ok
        assert all(torch.equal(a, b) for a, b in zip(bytes_of(host), want))


@pytest.mark.parametrize("direction", ["d2h", "h2d"])
def test_chunks_of_many_pieces_split_over_both_dma_streams_byte_exact(direction, engine_factory):
    """A chunk of MIN_PIECES_TO_SPLIT or more DMA pieces (scattered host blocks) is split over the lane's two DMA
    streams, a shorter one (the short first chunk of an offload, the short last one of an onboard) goes on one:
    both kinds of chunk in one transfer, byte-exact, the blocks not named still poisoned."""
    from kvbm.kernels.host_memory import PinnedHostBuffer
    from kvbm.kernels.transfer import MIN_PIECES_TO_SPLIT

    g, n = GEOM, 2 * MIN_PIECES_TO_SPLIT + 5
    rng = np.random.default_rng(31 if direction == "d2h" else 32)
    gpu = allocate("vllm_flash_attn_nhd", g, 2 * n, dtype=torch.bfloat16, device="cuda")
    random_fill(gpu.tensors, 33)
    engine = engine_factory(g, 2, blocks_per_slot=MIN_PIECES_TO_SPLIT + 8)  # chunks above and below the threshold
    with PinnedHostBuffer(2 * n * g.block_bytes) as buf:
        host = host_cache(buf, g, STAGING_ORDER, blocks=2 * n)
        random_fill(host.tensors, 34)
        gpu_ids, host_ids = rng.choice(2 * n, n, replace=False), rng.choice(2 * n, n, replace=False)
        if direction == "d2h":
            host.tensors[0].view(torch.uint8)[torch.as_tensor(host_ids)] = POISON
            want, after = reference_copy(gpu, host, gpu_ids, host_ids), lambda: bytes_of(host)
            handle = engine.offload(gpu, host, gpu_ids, host_ids, path="staged")
        else:
            poison_gpu_blocks(gpu, gpu_ids)
            want, after = reference_copy(host, gpu, host_ids, gpu_ids), lambda: bytes_of(gpu)
            handle = engine.onboard(host, gpu, host_ids, gpu_ids, path="staged")
        handle.wait()
        assert handle.ok
        assert all(torch.equal(a, b) for a, b in zip(after(), want))


@pytest.mark.parametrize("enqueue", ["compiled", "python"])
@pytest.mark.parametrize("preset", ["vllm_flash_attn_nhd", "vllm_flash_attn_hnd"])
def test_layer_views_round_trip_by_2d_copies_byte_exact(preset, enqueue, engine_factory, monkeypatch):
    """Layers 1..3 of five, GPU -> host -> GPU between layer views (`select_layers`): runs of consecutive host blocks
    move as 2-D copies (host pitch the whole block), single blocks as batched pieces; byte-exact against the torch
    reference over the whole caches, so every other layer and block keeps its bytes."""
    from kvbm.kernels import transfer
    from kvbm.kernels.host_memory import PinnedHostBuffer
    from kvbm.layouts import select_layers

    g = KVGeometry(num_layers=5, num_kv=2, block_size=4, num_heads=2, head_dim=64, itemsize=2)
    rng = np.random.default_rng(41 + (enqueue == "python"))
    gpu = allocate(preset, g, 48, dtype=torch.bfloat16, device="cuda")
    random_fill(gpu.tensors, 42)
    rows = []
    if enqueue == "python":
        real = transfer.memcpy_2d_async
        monkeypatch.setattr(transfer, "memcpy_2d_async", lambda *a: (rows.append(a[7]), real(*a)))
    with PinnedHostBuffer(32 * g.block_bytes) as buf:
        host = host_cache(buf, g, STAGING_ORDER, blocks=32)
        random_fill(host.tensors, 43)
        gv, hv = select_layers(gpu, 1, 4), select_layers(host, 1, 4)
        engine = engine_factory(gv.geometry, 2, blocks_per_slot=7)  # chunks cut runs too
        if enqueue == "python":
            engine._enqueue = None
        host_ids = np.array([*range(2, 12), 14, *range(20, 26), 0, 30, 17, 18], dtype=np.int64)
        gpu_ids = rng.choice(24, host_ids.size, replace=False)
        want = reference_copy(gv, hv, gpu_ids, host_ids)
        handle = engine.offload(gv, hv, gpu_ids, host_ids, path="staged")
        handle.wait()
        assert handle.ok and all(torch.equal(a, b) for a, b in zip(bytes_of(host), want))
        dst_ids = 24 + rng.choice(24, host_ids.size, replace=False)
        poison_gpu_blocks(gpu, dst_ids)
        want = reference_copy(hv, gv, host_ids, dst_ids)
        handle = engine.onboard(hv, gv, host_ids, dst_ids, path="staged")
        handle.wait()
        assert handle.ok and all(torch.equal(a, b) for a, b in zip(bytes_of(gpu), want))
    if enqueue == "python":
        assert rows and max(rows) > 1  # the runs went as 2-D copies


@pytest.mark.parametrize("enqueue", ["compiled", "python"])
@pytest.mark.parametrize("preset,host_runs", [("vllm_flash_attn_nhd", True), ("vllm_flash_attn_hnd", False),
                                              ("vllm_flashinfer_nhd", True)])
def test_layer_groups_onboard_in_one_call_each_group_complete_on_its_event(preset, host_runs, enqueue,
                                                                         engine_factory):
    """`onboard_groups` of layer groups (1, 2, 4 and 1 layers of eight) of the same blocks: one handle per group,
    and once group g's event is done its layers hold the host bytes (checked before waiting for the later groups,
    after a wait on that event alone); in the end every byte of the GPU cache is the torch reference's, so layers
    and blocks not named keep theirs (fresh blocks poisoned). Several chunks per group; the same bytes when the
    compiled enqueue is unavailable (one `submit`)."""
    from kvbm.kernels.host_memory import PinnedHostBuffer
    from kvbm.layouts import select_layers

    g = KVGeometry(num_layers=8, num_kv=2, block_size=4, num_heads=2, head_dim=64, itemsize=2)
    rng = np.random.default_rng(zlib.crc32(f"{preset}/{host_runs}/{enqueue}".encode()))
    gpu = allocate(preset, g, 64, dtype=torch.bfloat16, device="cuda")
    random_fill(gpu.tensors, 7)
    groups = [(0, 1), (1, 3), (3, 7), (7, 8)]
    with PinnedHostBuffer(40 * g.block_bytes) as buf:
        host = host_cache(buf, g, STAGING_ORDER, blocks=40)
        random_fill(host.tensors, 8)
        engine = engine_factory(select_layers(gpu, 3, 7).geometry, 2, blocks_per_slot=5)
        if enqueue == "python":
            engine._enqueue = None
        host_ids = np.array([*range(3, 14), 20, *range(25, 33)], dtype=np.int64) if host_runs else \
            rng.choice(40, 20, replace=False).astype(np.int64)
        gpu_ids = rng.choice(64, host_ids.size, replace=False).astype(np.int64)
        poison_gpu_blocks(gpu, gpu_ids)
        reference = type(gpu)([t.clone() for t in gpu.tensors], gpu.layout)
        copy_blocks(host, reference, host_ids, gpu_ids, backend="torch")
        pairs = [(select_layers(host, a, b), select_layers(gpu, a, b)) for a, b in groups]
        handles = engine.onboard_groups(pairs, host_ids, gpu_ids)
        assert len(handles) == len(groups) and all(h.ok and h.num_blocks == host_ids.size for h in handles)
        ids = torch.as_tensor(gpu_ids, device="cuda")
        for (a, b), handle in zip(groups, handles):
            handle.event.synchronize()  # this group's layers are in, whatever the later groups' state
            for layer in range(a, b):
                for kv in range(g.num_kv):
                    assert torch.equal(gpu.piece_view(layer, kv, torch.int16)[ids],
                                       reference.piece_view(layer, kv, torch.int16)[ids]), (layer, kv)
        torch.cuda.synchronize()
        assert all(torch.equal(x, y) for x, y in zip(bytes_of(gpu), bytes_of(reference)))
        # the same groups again with ids the caller checked (as `Transfers` does): the engine keeps the groups' tables
        # from the first such call and checks and looks up nothing per group in the next
        for round_ in range(2):
            host_ids = rng.choice(40, 12, replace=False).astype(np.int64)
            gpu_ids = rng.choice(64, 12, replace=False).astype(np.int64)
            poison_gpu_blocks(gpu, gpu_ids)
            copy_blocks(host, reference, host_ids, gpu_ids, backend="torch")
            handles = engine.onboard_groups(pairs, host_ids, gpu_ids, ids_checked=True)
            assert [h.nbytes for h in handles] == [12 * p[0].geometry.block_bytes for p in pairs]
            for handle in handles:
                handle.wait()
            assert all(torch.equal(x, y) for x, y in zip(bytes_of(gpu), bytes_of(reference))), round_
        caches = [c for h, gv in pairs for c in (h, h.layout, gv, gv.layout)]
        assert (engine._group_tables.find(caches) is not None) == (enqueue == "compiled")


def test_every_layer_group_of_a_deep_model_stays_kept_past_the_default_memo_limit(engine_factory):
    """The layer groups of an 80-layer cache (`layer_group_ranges`: 54 views) and 20 views of a second GPU cache, more
    pairs than `MEMO_LIMIT`, prepared in turn: the lane keeps every pair's tables (a memo that started afresh would
    rebuild them in the loads, and free plans whose tables another group of the same load, or a kernel queued
    earlier, still reads), and a load over one layout of groups is byte-exact."""
    from kvbm.kernels.copy_plan import MEMO_LIMIT
    from kvbm.kernels.host_memory import PinnedHostBuffer
    from kvbm.layouts import select_layers
    from kvbm.worker.layerwise import layer_group_ranges, layer_groups

    g = KVGeometry(num_layers=80, num_kv=2, block_size=4, num_heads=1, head_dim=64, itemsize=2)
    gpu, other = (allocate("vllm_flash_attn_nhd", g, 32, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    random_fill(gpu.tensors, 21)
    ranges = layer_group_ranges(g.num_layers, 4)
    with PinnedHostBuffer(16 * g.block_bytes) as buf:
        host = host_cache(buf, g, STAGING_ORDER, blocks=16)
        random_fill(host.tensors, 22)
        engine = engine_factory(g, 2, blocks_per_slot=4)
        views = {(a, b): (select_layers(host, a, b), select_layers(gpu, a, b)) for a, b in ranges}
        extra = [(views[r][0], select_layers(other, *r)) for r in ranges[:20]]
        assert len(views) + len(extra) > MEMO_LIMIT
        for hv, gv in [*views.values(), *extra]:
            engine.prepare("h2d", hv, gv)
        if engine._enqueue is not None:
            kept = engine.lanes["h2d"]._compiled_pairs
            assert all(kept.find((id(gv), id(hv)), gv, gv.layout, hv, hv.layout) is not None
                       for hv, gv in [*views.values(), *extra])
        host_ids, gpu_ids = np.array([2, 9, 10, 11, 15], dtype=np.int64), np.array([30, 1, 17, 4, 22], dtype=np.int64)
        poison_gpu_blocks(gpu, gpu_ids)
        reference = type(gpu)([t.clone() for t in gpu.tensors], gpu.layout)
        copy_blocks(host, reference, host_ids, gpu_ids, backend="torch")
        groups = layer_groups(g.num_layers, 4, 6.0)
        assert set(groups) <= set(ranges) and len(groups) > 1
        handles = engine.onboard_groups([views[r] for r in groups], host_ids, gpu_ids)
        for handle in handles:
            handle.wait()
        assert all(h.ok for h in handles) and all(torch.equal(x, y) for x, y in zip(bytes_of(gpu), bytes_of(reference)))


def test_prepare_builds_a_pairs_tables_ahead_and_moves_nothing(engine_factory):
    """`prepare` of a layer group's host -> GPU views builds the compiled enqueue's tables of the pair (kept for the
    later onboards), writes no byte, and refuses a pair the engine cannot move; an onboard of those views
    afterwards is byte-exact."""
    from kvbm.kernels.host_memory import PinnedHostBuffer
    from kvbm.layouts import select_layers

    g = KVGeometry(num_layers=8, num_kv=2, block_size=4, num_heads=2, head_dim=64, itemsize=2)
    gpu = allocate("vllm_flash_attn_nhd", g, 32, dtype=torch.bfloat16, device="cuda")
    random_fill(gpu.tensors, 11)
    with PinnedHostBuffer(16 * g.block_bytes) as buf:
        host = host_cache(buf, g, STAGING_ORDER, blocks=16)
        random_fill(host.tensors, 12)
        engine = engine_factory(select_layers(gpu, 2, 6).geometry, 2, blocks_per_slot=4)
        hv, gv = select_layers(host, 2, 6), select_layers(gpu, 2, 6)
        before = bytes_of(gpu)
        engine.prepare("h2d", hv, gv)
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(bytes_of(gpu), before))
        if engine._enqueue is not None:  # the pair's tables are kept from now on (`_Lane.compiled_pair`)
            kept = engine.lanes["h2d"]._compiled_pairs.find((id(gv), id(hv)), gv, gv.layout, hv, hv.layout)
            assert kept is not None and kept[0] is not None
        with pytest.raises((TypeError, ValueError)):
            engine.prepare("h2d", hv, select_layers(gpu, 0, 3))  # 4 layers into 3
        host_ids, gpu_ids = np.array([1, 5, 9], dtype=np.int64), np.array([20, 3, 11], dtype=np.int64)
        poison_gpu_blocks(gpu, gpu_ids)
        want = reference_copy(hv, gv, host_ids, gpu_ids)
        handle = engine.onboard(hv, gv, host_ids, gpu_ids, path="staged")
        handle.wait()
        assert handle.ok and all(torch.equal(a, b) for a, b in zip(bytes_of(gpu), want))


def test_cache_pair_checks_are_kept_per_pair(engine_factory):
    """After a transfer between two caches (its pair checks kept), the same GPU cache with another host cache is
    still checked: a pageable one is refused, a bad id still gets its precise error, a good transfer still runs."""
    from kvbm.kernels.host_memory import PinnedHostBuffer

    g = GEOM
    engine, gpu = small_engine_and_gpu(engine_factory, 41)
    with PinnedHostBuffer(4 * g.block_bytes) as buf:
        host = host_cache(buf, g, STAGING_ORDER, blocks=4)
        engine.offload(gpu, host, [1, 2], [0, 1]).wait()
        pageable = block_major(torch.zeros(4, 3, 2, 4, 2, 64, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="pinned CPU memory"):
            engine.offload(gpu, pageable, [0], [0])
        with pytest.raises(IndexError, match="src_ids holds 8"):
            engine.offload(gpu, host, [8], [0])
        with pytest.raises(ValueError, match="same length"):
            engine.offload(gpu, host, [1, 2], [0])
        with pytest.raises(TypeError, match="must be integers"):
            engine.offload(gpu, host, [0.5], [0])
        host.tensors[0].view(torch.uint8).fill_(POISON)
        want = reference_copy(gpu, host, [5, 3], [3, 2])
        engine.offload(gpu, host, [5, 3], [3, 2]).wait()
        assert all(torch.equal(a, b) for a, b in zip(bytes_of(host), want))


def test_raw_event_record_and_wait_order_two_streams():
    """stream_events: a wait on a raw event recorded after slow work on one stream holds back work on another."""
    from kvbm.kernels import stream_events as events

    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    x = torch.zeros(1 << 20, dtype=torch.int32, device="cuda")
    y = torch.full_like(x, -1)
    event = torch.cuda.Event()
    handle = events.handle(event, a)
    with torch.cuda.stream(a):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before x is written
        x.fill_(7)
    events.record(handle, a.cuda_stream)
    events.wait(b.cuda_stream, handle)
    with torch.cuda.stream(b):
        y.copy_(x)
    torch.cuda.synchronize()
    assert bool((y == 7).all())
    assert events.current_stream(torch.cuda.current_device()) == torch.cuda.current_stream().cuda_stream


@pytest.mark.parametrize("path", ["staged", "zero_copy"])
def test_id_ring_reuse_and_long_id_lists_byte_exact(path, engine_factory, monkeypatch):
    """Block ids go to the device through a ring of pinned slots: more transfers queued at once than the ring has
    slots (a slot is rewritten only after its upload has run), and id lists longer than a slot (a tensor of their
    own), all byte-exact with no wait in between."""
    from kvbm.kernels import transfer
    from kvbm.kernels.host_memory import PinnedHostBuffer

    monkeypatch.setattr(transfer, "ID_RING_SLOTS", 3)
    monkeypatch.setattr(transfer, "ID_RING_SLOT_IDS", 6)
    g = GEOM
    rng = np.random.default_rng(51)
    gpu = allocate("vllm_flash_attn_nhd", g, GPU_BLOCKS, dtype=torch.bfloat16, device="cuda")
    random_fill(gpu.tensors, 52)
    engine = engine_factory(g, 2, blocks_per_slot=4)
    with PinnedHostBuffer(HOST_BLOCKS * g.block_bytes) as buf:
        host = host_cache(buf, g, STAGING_ORDER)
        host.tensors[0].view(torch.uint8).fill_(POISON)
        expected = block_major(host.tensors[0].clone(), STAGING_ORDER)
        sizes = [3, 5, 2, 9, 4, 1]  # 9 > 6 ids per slot: a long list; 6 transfers through a ring of 3 slots
        order, handles, at = rng.permutation(HOST_BLOCKS), [], 0
        for k in sizes:
            src_ids, host_ids = rng.choice(GPU_BLOCKS, k, replace=False), order[at:at + k]
            at += k
            copy_blocks(gpu, expected, src_ids, host_ids, backend="torch")
            handles.append(engine.offload(gpu, host, src_ids, host_ids, path=path))
        for h in handles:
            h.wait()
            assert h.ok
        assert torch.equal(bytes_of(host)[0], bytes_of(expected)[0])


def test_host_buffer_closed_after_a_transfer_is_refused(engine_factory):
    """A host cache found pinned is checked again once any buffer has been closed since: one whose buffer was closed
    (unpinned) after a first transfer is refused with a clear error, not copied into."""
    from kvbm.kernels.host_memory import PinnedHostBuffer

    g = GEOM
    engine, gpu = small_engine_and_gpu(engine_factory, 61)
    buf = PinnedHostBuffer(4 * g.block_bytes)
    host = host_cache(buf, g, STAGING_ORDER, blocks=4)
    engine.offload(gpu, host, [1], [0], path="zero_copy").wait()
    buf.close()  # the cache's tensor still maps the memory, no longer pinned
    for path in ("zero_copy", "staged"):
        with pytest.raises(ValueError, match="pinned CPU memory"):
            engine.offload(gpu, host, [2], [1], path=path)
