"""Nothing is kept alive by the memos of a transfer: a copy plan, a pair check or an engine's tables between a
long-lived cache and a short-lived one must not keep the short-lived one (or its memory) once it is dropped, and a
memo entry must never be found again by a new object that got a dropped one's id.

The CPU tests build caches over numpy arrays: a tensor made by `torch.from_numpy` keeps its array alive, so a weak
reference to the array tells when the memory itself is freed (not only the cache object). The GPU test runs one
`TransferEngine` over many large GPU caches and checks `torch.cuda.memory_allocated()`.
"""
from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest
import torch

from kvbm.kernels.copy_plan import IdentityMemo, build_plan
from kvbm.layouts import KVGeometry, PagedKVCache, allocate, block_major, copy_blocks
from kvbm.layouts.presets import vllm_flash_attn

G = KVGeometry(num_layers=2, num_kv=2, block_size=4, num_heads=2, head_dim=8, itemsize=2)


def numpy_caches(n: int, blocks: int = 6):
    """`n` caches over numpy memory (FlashAttention per-layer tensors and block-major, alternately), and weak
    references to their arrays."""
    caches, arrays = [], []
    for k in range(n):
        if k % 2:
            mem = [np.zeros((2, blocks, G.block_size, G.num_heads, G.head_dim), np.float16) for _ in range(G.num_layers)]
            cache = vllm_flash_attn([torch.from_numpy(a) for a in mem])
        else:
            mem = [np.zeros((blocks, G.num_layers, 2, G.block_size, G.num_heads, G.head_dim), np.float16)]
            cache = block_major(torch.from_numpy(mem[0]))
        caches.append(cache)
        arrays += [weakref.ref(a) for a in mem]
    return caches, arrays


def collected(refs) -> bool:
    gc.collect()
    return all(r() is None for r in refs)


def test_plans_and_copies_keep_no_short_lived_cache_alive():
    """Copies both ways between one long-lived cache and many short-lived ones (numba backend, plans cached on both
    sides): once the short-lived ones are dropped, they and their memory are freed; the long-lived cache still
    copies correctly afterwards."""
    keeper = allocate("kvbm_staging", G, 8, dtype=torch.float16)
    keeper.tensors[0].copy_(torch.arange(keeper.tensors[0].numel(), dtype=torch.float16).view_as(keeper.tensors[0]))
    short, arrays = numpy_caches(10)
    others = [allocate(p, G, 5, dtype=torch.float16) for p in ("vllm_flash_attn_hnd", "trtllm_pool", "vllm_lbnhc")]
    refs = [weakref.ref(c) for c in short + others] + [weakref.ref(t) for c in others for t in c.tensors] + arrays
    for cache in short + others:
        copy_blocks(keeper, cache, [1, 3], [0, 4], backend="numba")
        copy_blocks(cache, keeper, [4, 0], [5, 6], backend="numba")
        build_plan(keeper, cache), build_plan(cache, keeper)
    del cache, short, others
    assert collected(refs), "a dropped cache (or its memory) is still alive"
    probe = allocate("kvbm_staging", G, 8, dtype=torch.float16)
    copy_blocks(keeper, probe, [1, 3], [2, 7], backend="numba")
    assert torch.equal(probe.tensors[0][2], keeper.tensors[0][1]) and torch.equal(probe.tensors[0][7],
                                                                                  keeper.tensors[0][3])


def test_pair_checks_keep_no_short_lived_cache_alive():
    """The transfer engine's pair checks (kept on the source cache per destination) hold no destination."""
    from kvbm.kernels import transfer

    class Engine:  # the attributes `_check_pair` reads
        device = torch.device("cpu")

    keeper = allocate("kvbm_staging", G, 8, dtype=torch.float16)
    short, arrays = numpy_caches(6)
    refs = [weakref.ref(c) for c in short] + arrays
    for cache in short:
        assert transfer.TransferEngine._check_pair(Engine(), "h2d", keeper, cache) == "staged"
        assert transfer.TransferEngine._check_pair(Engine(), "d2h", cache, keeper) == "staged"
    del cache, short
    assert collected(refs), "a pair check keeps a dropped cache (or its memory) alive"


def test_a_plan_is_rebuilt_for_a_new_cache_that_got_a_dropped_ones_id():
    """A new cache over new memory that gets a dropped cache's id (and even its layout object) gets a new plan with
    its own addresses, never the dropped cache's plan."""
    keeper = allocate("kvbm_staging", G, 8, dtype=torch.float16)
    layout = allocate("kvbm_staging", G, 6, dtype=torch.float16).layout

    tensor = torch.zeros(6, G.num_layers, 2, G.block_size, G.num_heads, G.head_dim, dtype=torch.float16)

    def cache():
        return PagedKVCache([tensor.clone()], layout)

    old = cache()
    old_id, old_plan = id(old), weakref.ref(build_plan(keeper, old))
    build_plan(old, keeper)
    del old
    gc.collect()
    assert old_plan() is None, "the plan of a dropped destination is still kept"
    misses = []  # kept, so that the allocator hands out other free slots in turn
    for _ in range(5000):
        new = cache()
        if id(new) == old_id:
            break
        misses.append(new)
    else:
        pytest.skip("no new object got the dropped cache's id")
    plan = build_plan(keeper, new)
    assert plan.dst_base.data_ptr() == new.tensors[0].data_ptr()
    assert build_plan(new, keeper).src_base.data_ptr() == new.tensors[0].data_ptr()


def test_identity_memo_finds_only_the_live_objects_it_was_kept_for():
    class Thing:
        pass

    memo, a, b = IdentityMemo(), Thing(), Thing()
    memo.keep(id(a), "for a", a)
    memo.keep((id(a), id(b)), "for a and b", a, b)
    assert memo.find(id(a), a) == "for a" and memo.find((id(a), id(b)), a, b) == "for a and b"
    assert memo.find((id(a), id(b)), a, a) is None and memo.find(id(a), a, b) is None
    memo[id(b)] = memo[id(a)]  # an entry kept for `a` under the id of `b`, as when an id is reused
    assert memo.find(id(b), b) is None
    del a
    gc.collect()
    assert list(memo) == [id(b)]  # the entries under the keys they were kept for went with `a`
    assert memo.find(id(b), b) is None


def test_identity_memo_limit_and_a_memo_without_one():
    """A memo starts afresh once it holds ``limit`` entries (`MEMO_LIMIT` by default); with no limit it keeps every
    entry whose objects live (a lane's compiled tables: one per layer-group view, which kernels read later), and its
    entries still go with their objects."""
    from kvbm.kernels.copy_plan import MEMO_LIMIT

    class Thing:
        pass

    things = [Thing() for _ in range(MEMO_LIMIT + 8)]
    default, two, unlimited = IdentityMemo(), IdentityMemo(limit=2), IdentityMemo(limit=None)
    for memo in (default, two, unlimited):
        for k, t in enumerate(things):
            memo.keep(id(t), k, t)
    assert len(default) == 8 and default.find(id(things[-1]), things[-1]) == len(things) - 1
    assert default.find(id(things[0]), things[0]) is None  # dropped when the memo started afresh
    assert sorted(two.values(), key=lambda entry: entry[0])[0][0] == len(things) - 2 and len(two) == 2
    assert len(unlimited) == len(things) and all(unlimited.find(id(t), t) == k for k, t in enumerate(things))
    del things[:10]
    gc.collect()
    assert len(unlimited) == MEMO_LIMIT - 2


def test_identity_sequence_memo_finds_only_the_live_objects_in_their_order():
    """`IdentitySequenceMemo`: a value per sequence of objects, found for exactly those objects in that order, dropped
    when one of them dies (a new object that got its id never finds it)."""
    from kvbm.kernels.copy_plan import IdentitySequenceMemo

    class Thing:
        pass

    memo, things = IdentitySequenceMemo(), [Thing() for _ in range(4)]
    memo.keep(things, "all four")
    memo.keep(things[:2], "first two")
    assert memo.find(things) == "all four" and memo.find(things[:2]) == "first two"
    assert memo.find(things[::-1]) is None and memo.find(things[:3]) is None and memo.find([]) is None
    memo[tuple(map(id, things[1:3]))] = memo[tuple(map(id, things[:2]))]  # kept for others under these ids
    assert memo.find(things[1:3]) is None
    del things[3]
    gc.collect()
    assert memo.find(things[:2]) == "first two" and len(memo) == 2  # "all four" went with its last object


# -- on a GPU ---------------------------------------------------------------------------------------------------------

GPU_GEOM = KVGeometry(num_layers=8, num_kv=2, block_size=16, num_heads=8, head_dim=128, itemsize=2)  # 512 KiB blocks
GPU_CACHE_BLOCKS = 512  # 256 MiB per cache
MOVED = 96  # blocks moved each way per cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the transfer engine needs a CUDA GPU")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the engine launches compiled kernels")
@pytest.mark.parametrize("path,enqueue", [("staged", "compiled"), ("staged", "python"), ("zero_copy", "compiled"),
                                          ("auto", "compiled")])
def test_engine_frees_every_gpu_cache_it_moved(path, enqueue):
    """One engine moves blocks of 15 GPU caches of 256 MiB in turn to and from one pinned host cache, each cache
    dropped after use: GPU memory allocated returns to where it was before the first (the engine's staging and
    first-use buffers are made by a warm-up transfer before the measurement), and every cache object is freed."""
    from kvbm.kernels.host_memory import PinnedHostBuffer
    from kvbm.kernels.transfer import TransferEngine

    g, rng = GPU_GEOM, np.random.default_rng(7)
    engine = TransferEngine("cuda", staging_bytes=32 * g.block_bytes)
    if enqueue == "python":
        engine._enqueue = None
    with PinnedHostBuffer(MOVED * g.block_bytes) as buf:
        host = block_major(buf.tensor(torch.bfloat16)[: MOVED * g.block_bytes // 2].view(
            MOVED, g.num_layers, 2, g.block_size, g.num_heads, g.head_dim))

        def round_trip(blocks: int) -> weakref.ref:
            gpu = allocate("vllm_flash_attn_nhd", g, blocks, dtype=torch.bfloat16, device="cuda")
            ids = rng.choice(blocks, MOVED, replace=False)
            for handle in (engine.offload(gpu, host, ids, np.arange(MOVED), path=path),
                           engine.onboard(host, gpu, np.arange(MOVED), ids[::-1].copy(), path=path)):
                handle.wait()
                assert handle.ok
            return weakref.ref(gpu)

        round_trip(MOVED)  # warm-up: the engine's own buffers of first use
        torch.cuda.synchronize()
        gc.collect()
        start = torch.cuda.memory_allocated()
        freed = [round_trip(GPU_CACHE_BLOCKS) for _ in range(15)]
        torch.cuda.synchronize()
        gc.collect()
        end = torch.cuda.memory_allocated()
    assert all(r() is None for r in freed), "the engine keeps a GPU cache alive"
    assert end - start < 4 << 20, f"{(end - start) / 2**30:.2f} GiB of GPU memory still allocated after the caches"
