"""The transfer library's one face: `Transfers.submit` routed by (source medium, destination medium), and the
`BlockTransfer` handle that completes per block."""
from __future__ import annotations

import gc
import threading
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvbm.kernels.block_transfer import BlockStatus, BlockTransfer
from kvbm.kernels.medium import Medium, medium_of
from kvbm.kernels.transfers import Transfers, register_path, registered_paths
from kvbm.layouts import KVGeometry, allocate, block_major

GEOM = KVGeometry(num_layers=2, num_kv=2, block_size=4, num_heads=2, head_dim=8, itemsize=2)


def random_cache(preset: str, num_blocks: int, seed: int):
    cache = allocate(preset, GEOM, num_blocks=num_blocks, dtype=torch.bfloat16, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    for t in cache.tensors:
        t.view(torch.int16).copy_(torch.randint(-2**15, 2**15, t.shape, dtype=torch.int16, generator=gen))
    return cache


def block_bytes(cache, block: int) -> bytes:
    g = cache.geometry
    return b"".join(cache.piece_view(layer, kv, torch.int16)[block].contiguous().numpy().tobytes()
                    for layer in range(g.num_layers) for kv in range(g.num_kv))


def test_host_to_host_submit_is_byte_exact_and_leaves_other_blocks_alone():
    src = random_cache("vllm_flash_attn_hnd", 8, 1)
    dst = random_cache("kvbm_staging", 6, 2)  # random bytes act as poison for the blocks not written
    before = [block_bytes(dst, b) for b in range(6)]
    with Transfers() as transfers:
        transfer = transfers.submit(src, dst, [5, 0, 3], [1, 4, 2])
        assert transfer.done() and transfer.ok and transfer.results == [BlockStatus.OK] * 3
    assert [block_bytes(dst, b) for b in (1, 4, 2)] == [block_bytes(src, b) for b in (5, 0, 3)]
    assert [block_bytes(dst, b) for b in (0, 3, 5)] == [before[b] for b in (0, 3, 5)]


@pytest.mark.parametrize(("src_ids", "dst_ids", "error", "match"), [
    ([0, 1], [0], ValueError, "differ in length"),
    ([0, 9], [0, 1], IndexError, "src_ids holds 9"),
    ([-1, 0], [0, 1], IndexError, "src_ids holds -1"),
    ([0, 1], [0, -3], IndexError, "dst_ids holds -3"),
    ([0, 1], [1, 4], IndexError, "dst_ids holds 4"),
    (np.array([0, 2**63], dtype=np.uint64), [0, 1], IndexError, "src_ids holds -9223372036854775808"),
    ([0, 1], [2, 2], ValueError, "duplicates"),
    ([True, False], [0, 1], TypeError, "ints"),
    ([0.5], [0], TypeError, "ints"),
])
def test_bad_ids_raise_before_anything_moves(src_ids, dst_ids, error, match):
    src, dst = random_cache("vllm_flash_attn_nhd", 4, 3), random_cache("kvbm_staging", 4, 4)
    before = [block_bytes(dst, b) for b in range(4)]
    with Transfers() as transfers, pytest.raises(error, match=match):
        transfers.submit(src, dst, src_ids, dst_ids)
    assert [block_bytes(dst, b) for b in range(4)] == before


def test_geometry_mismatch_and_missing_path_are_refused():
    src = random_cache("vllm_flash_attn_nhd", 4, 5)
    other = allocate("kvbm_staging", KVGeometry(num_layers=1, num_kv=2, block_size=4, num_heads=2, head_dim=8,
                                                itemsize=2), num_blocks=4, dtype=torch.bfloat16, device="cpu")
    with Transfers() as transfers:
        with pytest.raises(ValueError, match="geometry"):
            transfers.submit(src, other, [0], [0])
        with pytest.raises(ValueError, match="no transfer path from host to remote"):
            transfers.submit(src, _RemoteCache(src), [0], [0])


def test_medium_comes_from_the_device_or_the_cache_class():
    assert medium_of(random_cache("kvbm_staging", 1, 6)) is Medium.HOST
    meta = block_major(torch.empty(2, 2, 2, 4, 2, 8, dtype=torch.bfloat16, device="meta"))
    with pytest.raises(ValueError, match="cannot tell the medium"):
        medium_of(meta)
    assert (Medium.HOST, Medium.HOST) in registered_paths()


class _RemoteCache:
    """A toy cache on the REMOTE medium: block bytes kept in a dict, as a peer's pool would be behind an agent."""

    medium = Medium.REMOTE

    def __init__(self, like) -> None:
        self.geometry, self.dtype, self.num_blocks, self.name = like.geometry, like.dtype, like.num_blocks, "toy"
        self.blocks: dict[int, bytes] = {}


class _ToyRemotePath:
    """Host -> remote in a background future, failing blocks whose id is odd (to show per-block results)."""

    name = "toy-remote"

    def __init__(self, transfers: Transfers) -> None:
        self.transfers = transfers

    def submit(self, src, dst, src_ids, dst_ids) -> BlockTransfer:
        future: Future = Future()

        def steps():
            yield future
            return future.result()

        transfer = BlockTransfer(src_ids.size, self.name, steps())
        errors = {}
        for i, (s, d) in enumerate(zip(src_ids, dst_ids)):
            if d % 2:
                errors[i] = "peer refused an odd block"
            else:
                dst.blocks[int(d)] = block_bytes(src, int(s))
        future.set_result(errors)
        return transfer

    def close(self) -> None:
        pass


def test_a_new_path_is_one_registration(monkeypatch):
    import kvbm.kernels.transfers as transfers_module

    monkeypatch.setitem(transfers_module._PATHS, (Medium.HOST, Medium.REMOTE), _ToyRemotePath)
    src = random_cache("vllm_flash_attn_nhd", 4, 7)
    remote = _RemoteCache(src)
    with Transfers() as transfers:
        transfer = transfers.submit(src, remote, [3, 2, 1], [0, 1, 2])
        transfer.wait()
    assert transfer.results == [BlockStatus.OK, BlockStatus.FAILED, BlockStatus.OK]
    assert transfer.reasons == {1: "peer refused an odd block"} and transfer.lost == set()
    assert remote.blocks == {0: block_bytes(src, 3), 2: block_bytes(src, 1)}
    register_path(Medium.HOST, Medium.REMOTE, _ToyRemotePath)  # the public call does the same
    assert (Medium.HOST, Medium.REMOTE) in registered_paths()
    del transfers_module._PATHS[(Medium.HOST, Medium.REMOTE)]


def test_layer_groups_are_one_transfer_each_and_reach_a_path_in_one_call(monkeypatch):
    """`submit_groups`: the same ids for several (src, dst) layer views, one transfer per view in order, byte-exact
    and only those layers; a path with ``submit_groups`` gets every pair in one call; bad ids raise before anything
    moves."""
    from kvbm.kernels.paths.host_host import HostHostPath
    from kvbm.layouts import select_layers

    geometry = KVGeometry(num_layers=5, num_kv=2, block_size=4, num_heads=2, head_dim=8, itemsize=2)
    gen = torch.Generator().manual_seed(21)
    src = allocate("vllm_flash_attn_nhd", geometry, num_blocks=9, dtype=torch.bfloat16)
    dst = allocate("kvbm_staging", geometry, num_blocks=7, dtype=torch.bfloat16)
    for t in (*src.tensors, *dst.tensors):  # random bytes everywhere: dst's act as poison
        t.view(torch.int16).copy_(torch.randint(-2**15, 2**15, t.shape, dtype=torch.int16, generator=gen))
    groups = [(0, 1), (1, 3), (4, 5)]  # layer 3 left out
    pairs = [(select_layers(src, a, b), select_layers(dst, a, b)) for a, b in groups]
    def pieces(cache):
        return {(layer, kv): cache.piece_view(layer, kv, torch.int16).clone()
                for layer in range(geometry.num_layers) for kv in range(2)}

    before, want = pieces(dst), pieces(src)
    calls = []

    def submit_groups(self, pairs, src_ids, dst_ids):
        calls.append(len(pairs))
        return [self.submit(a, b, src_ids, dst_ids) for a, b in pairs]

    assert not hasattr(HostHostPath, "submit_groups")  # (the face's own fallback is the test above's submit)
    monkeypatch.setattr(HostHostPath, "submit_groups", submit_groups, raising=False)
    with Transfers() as transfers:
        for bad, error in (([0, 9], IndexError), ([1, 1], ValueError)):
            with pytest.raises(error):
                transfers.submit_groups(pairs, [3, 4], bad)
        assert calls == [] and all(torch.equal(before[k], v) for k, v in pieces(dst).items())
        assert transfers.submit_groups([], [1], [2]) == []
        moved = transfers.submit_groups(pairs, [8, 0, 5], [2, 6, 0])
        assert calls == [3] and len(moved) == 3
        for transfer in moved:
            transfer.wait()
            assert transfer.ok and transfer.num_blocks == 3
        with pytest.raises(IndexError):  # the pairs' checks are kept, the ids' are not
            transfers.submit_groups(pairs, [1], [7])
        assert calls == [3] and len(transfers._group_checks) == 2  # (these pairs; the empty sequence)
        transfers.submit_groups(pairs[1:], [], [])
        assert len(transfers._group_checks) == 3
        del pairs, moved
        gc.collect()
        assert len(transfers._group_checks) == 1  # an entry goes with its caches
    after = pieces(dst)
    for (layer, kv), got in after.items():
        for s_id, d_id in ((8, 2), (0, 6), (5, 0)):
            expected = want[layer, kv][s_id] if layer != 3 else before[layer, kv][d_id]
            assert torch.equal(got[d_id], expected), (layer, kv, s_id)
        assert all(torch.equal(got[b], before[layer, kv][b]) for b in (1, 3, 4, 5))


def test_prepare_checks_the_pair_and_reaches_a_path_that_builds_ahead(monkeypatch):
    """`Transfers.prepare`: a pair no path can move is refused as `submit` refuses it; a path without ``prepare``
    (host <-> host builds nothing ahead) leaves the bytes alone; a path with one gets the pair."""
    from kvbm.kernels.paths.host_host import HostHostPath

    src = random_cache("vllm_flash_attn_nhd", 4, 9)
    dst = random_cache("vllm_flash_attn_nhd", 4, 10)
    other = allocate("kvbm_staging", KVGeometry(num_layers=1, num_kv=2, block_size=4, num_heads=2, head_dim=8,
                                                itemsize=2), num_blocks=4, dtype=torch.bfloat16, device="cpu")
    before = [block_bytes(dst, b) for b in range(4)]
    calls = []
    with Transfers() as transfers:
        with pytest.raises(ValueError, match="geometry"):
            transfers.prepare(src, other)
        with pytest.raises(ValueError, match="no transfer path from host to remote"):
            transfers.prepare(src, _RemoteCache(src))
        transfers.prepare(src, dst)
        assert [block_bytes(dst, b) for b in range(4)] == before
        monkeypatch.setattr(HostHostPath, "prepare", lambda self, a, b: calls.append((a, b)), raising=False)
        transfers.prepare(src, dst)
    assert calls == [(src, dst)]


def test_block_transfer_steps_wait_and_fail_per_block():
    gate: Future = Future()

    def steps():
        yield gate
        yield None  # a busy resource: asked again later
        return {1: "read failed"}, {1}

    transfer = BlockTransfer(3, "test", steps())
    assert not transfer.done() and transfer.results == [BlockStatus.PENDING] * 3
    gate.set_result(None)
    transfer.wait()
    assert transfer.results == [BlockStatus.OK, BlockStatus.FAILED, BlockStatus.OK]
    assert transfer.lost == {1} and not transfer.ok

    def raising():
        yield None
        raise RuntimeError("copy broke")

    broken = BlockTransfer(2, "test", raising())
    broken.wait()
    assert broken.results == [BlockStatus.FAILED] * 2 and "copy broke" in broken.reasons[0]

    def out_of_range():
        return {5: "?"}
        yield

    odd = BlockTransfer(2, "test", out_of_range())
    assert odd.done() and odd.results == [BlockStatus.FAILED] * 2


def test_ordering_a_raw_stream_after_a_transfer_without_a_device_event_waits_for_it():
    """A transfer whose work is not all on the device (no ``device_done``) cannot be waited for by a stream: ordering
    a raw stream after it blocks until it is done."""
    gate: Future = Future()

    def steps():
        yield gate
        return {}, set()

    transfer = BlockTransfer(2, "test", steps())
    threading.Timer(0.05, gate.set_result, (None,)).start()
    assert not transfer.done()
    transfer.order_raw_stream(0)
    assert transfer.done() and transfer.ok


def test_random_layouts_round_trip_through_a_host_tier():
    rng = np.random.default_rng(11)
    presets = ["vllm_flash_attn_nhd", "vllm_flash_attn_hnd", "vllm_flashinfer_nhd", "trtllm_pool"]
    with Transfers() as transfers:
        for seed, preset in enumerate(presets):
            g1 = random_cache(preset, 12, 20 + seed)
            tier = random_cache("kvbm_staging", 10, 40 + seed)
            back = random_cache(preset, 12, 60 + seed)
            ids = rng.permutation(12)[:7]
            slots = rng.permutation(10)[:7]
            dst = rng.permutation(12)[:7]
            assert transfers.submit(g1, tier, ids, slots).ok
            assert transfers.submit(tier, back, slots, dst).ok
            assert [block_bytes(back, int(b)) for b in dst] == [block_bytes(g1, int(b)) for b in ids]


def test_the_gpu_path_keeps_its_group_onboard_check_until_a_host_buffer_closes(monkeypatch):
    """`GpuHostPath.submit_groups` gives a sequence of host -> GPU layer-group pairs to the engine's
    ``onboard_groups`` in one call where the engine moves every pair into one GPU, and keeps that finding per
    sequence of pairs: the host sides' pinning is checked once, again after a host buffer is closed, and a host side
    no longer pinned is refused. Offloads, and pairs over two GPUs, go pair by pair."""
    import kvbm.kernels.paths.gpu_host as gpu_host
    from kvbm.layouts import select_layers

    class GpuStandIn:  # (only its medium and device are asked for before the engine is called)
        medium = Medium.GPU

        def __init__(self, index: int) -> None:
            self.device = torch.device("cuda", index)

    geometry = KVGeometry(num_layers=4, num_kv=2, block_size=4, num_heads=2, head_dim=8, itemsize=2)
    host = allocate("kvbm_staging", geometry, num_blocks=6, dtype=torch.bfloat16)
    views = [select_layers(host, 0, 1), select_layers(host, 1, 4)]
    gpus = [GpuStandIn(0), GpuStandIn(0), GpuStandIn(1)]
    pairs = [(views[0], gpus[0]), (views[1], gpus[1])]
    pinned, closed, checks, onboards, singles = [True], [0], [], [], []
    monkeypatch.setattr(gpu_host, "cache_is_pinned", lambda cache: checks.append(cache) or pinned[0])
    monkeypatch.setattr(gpu_host, "unregistrations", lambda: closed[0])

    class EngineStandIn:
        def onboard_groups(self, pairs, src_ids, dst_ids, *, ids_checked):
            onboards.append((len(pairs), ids_checked))
            return [SimpleNamespace(num_blocks=src_ids.size, path="staged", error=None, event=None) for _ in pairs]

    path = gpu_host.GpuHostPath(Transfers())
    monkeypatch.setattr(path, "_engine", lambda device: EngineStandIn())
    monkeypatch.setattr(path, "submit", lambda src, dst, s, d: singles.append((src, dst)) or "single")
    ids = np.array([4, 1], dtype=np.int64)
    moved = path.submit_groups(pairs, ids, ids)
    assert onboards == [(2, True)] and len(moved) == 2 and all(t.num_blocks == 2 for t in moved)
    assert len(checks) == 2  # one pinning check per pair
    path.submit_groups(pairs, ids, ids)
    assert len(onboards) == 2 and len(checks) == 2  # kept for the sequence
    closed[0] += 1
    path.submit_groups(pairs, ids, ids)
    assert len(onboards) == 3 and len(checks) == 4  # a host buffer closed: checked again
    assert path.submit_groups([(views[0], gpus[0]), (views[1], gpus[2])], ids, ids) == ["single", "single"]
    assert path.submit_groups([(gpus[0], views[0]), (gpus[1], views[1])], ids, ids) == ["single", "single"]
    assert len(onboards) == 3 and len(singles) == 4
    pinned[0], closed[0] = False, closed[0] + 1
    with pytest.raises(ValueError, match="pinned memory"):
        path.submit_groups(pairs, ids, ids)
    assert len(onboards) == 3
