"""Layer views (`select_layers`) and what layer-wise transfers are made of, on the CPU: a copy between the views of
two caches moves exactly those layers of the chosen blocks (checked against an independent oracle, every other byte
untouched); the staged schedule of a layer view of a block-major cache moves each run of blocks as one 2-D copy; a
transfer made of per-group parts fails a block where any part failed it, and each move of a layer-wise load is
reported by its own blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layout_oracle import fill_random, to_logical

from kvbm.kernels.block_transfer import BlockStatus, BlockTransfer
from kvbm.kernels.host_runs import schedule
from kvbm.kernels.paths.gpu_host import blocks_dense, whole_blocks_contiguous
from kvbm.layouts import KVGeometry, allocate, copy_blocks, presets_for, select_layers

GEOMETRY = KVGeometry(num_layers=5, num_kv=2, block_size=4, num_heads=2, head_dim=8, itemsize=2)


@pytest.mark.parametrize("seed", range(6))
def test_copy_between_layer_views_moves_only_those_layers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = [p for p in presets_for(GEOMETRY) if p != "sglang_mha"]
    src_preset, dst_preset = rng.choice(names, 2)
    gen = torch.Generator().manual_seed(seed)
    src = allocate(src_preset, GEOMETRY, 12, dtype=torch.bfloat16)
    dst = allocate(dst_preset, GEOMETRY, 10, dtype=torch.bfloat16)
    fill_random(src, gen)
    fill_random(dst, gen)  # the poison: every byte not copied must keep it
    start = int(rng.integers(0, GEOMETRY.num_layers))
    stop = int(rng.integers(start + 1, GEOMETRY.num_layers + 1))
    n = int(rng.integers(1, 8))
    s_ids, d_ids = rng.choice(12, n, replace=False), rng.choice(10, n, replace=False)
    want = to_logical(dst_preset, dst).clone()
    want[torch.as_tensor(d_ids), start:stop] = to_logical(src_preset, src)[torch.as_tensor(s_ids), start:stop]
    src_view, dst_view = select_layers(src, start, stop), select_layers(dst, start, stop)
    assert src_view.geometry.num_layers == stop - start
    copy_blocks(src_view, dst_view, s_ids, d_ids)
    assert torch.equal(to_logical(dst_preset, dst), want), (src_preset, dst_preset, start, stop)


def test_select_layers_refuses_bad_bounds() -> None:
    cache = allocate("kvbm_staging", GEOMETRY, 2, dtype=torch.bfloat16)
    assert select_layers(cache, 0, GEOMETRY.num_layers) is cache
    for bounds in [(0, 0), (3, 2), (-1, 2), (0, 6)]:
        with pytest.raises(ValueError, match="layers"):
            select_layers(cache, *bounds)
    with pytest.raises(TypeError, match="ints"):
        select_layers(cache, 0.0, 2)


def test_layer_view_of_block_major_is_dense_per_block_but_not_across_blocks() -> None:
    cache = allocate("kvbm_staging", GEOMETRY, 4, dtype=torch.bfloat16)
    view = select_layers(cache, 1, 3)
    assert whole_blocks_contiguous(cache) and blocks_dense(cache)
    assert blocks_dense(view) and not whole_blocks_contiguous(view)


def test_schedule_of_a_layer_view_is_one_row_per_block_of_each_run() -> None:
    ids = np.array([3, 4, 5, 9], dtype=np.int64)
    state = np.zeros(2, dtype=np.int64)
    block_bytes, stride = 64, 320  # two of five layers of a block-major cache
    _, hosts, stage, widths, rows = schedule(ids, 8, "h2d", 1 << 20, stride, block_bytes, 1 << 30, 1 << 16, state, 2)
    assert hosts.tolist() == [(1 << 20) + i * stride for i in (3, 9)]  # run 3..5 (a 2-D copy of 3 rows), then 9
    assert widths.tolist() == [block_bytes] * 2 and rows.tolist() == [3, 1]
    assert (stage - stage[0]).tolist() == [0, 3 * block_bytes]
    _, hosts, _, widths, rows = schedule(ids, 8, "h2d", 1 << 20, block_bytes, block_bytes, 1 << 30, 1 << 16, state, 2)
    assert widths.tolist() == [3 * block_bytes, block_bytes] and rows.tolist() == [1, 1]  # whole blocks: dense runs


@pytest.mark.parametrize("num_layers,per_group,sizes", [
    (32, 4, [1, 2] + [4] * 7 + [1]), (4, 4, [1, 2, 1]), (4, 1, [1] * 4), (28, 8, [1, 2, 4, 8, 8, 5]), (1, 4, [1]),
    (6, 2, [1, 2, 2, 1])])
def test_layer_groups_grow_from_one_layer_to_the_group_size(num_layers: int, per_group: int, sizes: list[int]) -> None:
    from kvbm.worker.layerwise import layer_groups

    groups = layer_groups(num_layers, per_group)
    assert [b - a for a, b in groups] == sizes
    assert groups[0][0] == 0 and groups[-1][1] == num_layers and all(
        groups[k][1] == groups[k + 1][0] for k in range(len(groups) - 1))
    with pytest.raises(ValueError, match="layer groups need"):
        layer_groups(num_layers, 0)


@pytest.mark.parametrize("num_layers,ratio,sizes", [
    (32, 0.0, [1, 2] + [4] * 7 + [1]), (32, 1.0, [1, 2] + [4] * 7 + [1]), (32, 2.0, [1, 2, 4, 4, 4, 8, 8, 1]),
    (32, 3.0, [1, 2, 4, 8, 16, 1]), (32, 100.0, [1, 2, 4, 8, 16, 1]), (28, 3.0, [1, 2, 4, 8, 8, 4, 1]),
    (80, 5.0, [1, 2, 4, 8, 16, 32, 16, 1])])
def test_layer_groups_keep_doubling_where_the_forward_outlasts_the_transfer(num_layers: int, ratio: float,
                                                                            sizes: list[int]) -> None:
    """With a ratio, groups are powers of two (one compiled copy kernel per size), at most double the one before,
    and no longer than the default size or what the transfer delivers while the forward, started after layer 0,
    computes layers [0, a) (at COMPUTE_MARGIN of the ratio)."""
    from kvbm.worker.layerwise import COMPUTE_MARGIN, layer_groups

    groups = layer_groups(num_layers, 4, ratio)
    assert [b - a for a, b in groups] == sizes
    assert groups[0][0] == 0 and groups[-1][1] == num_layers
    for k, (a, b) in enumerate(groups):
        assert b - a <= max(min(2 ** k, 4), 1 + a * ratio * COMPUTE_MARGIN - a) and b - a <= 2 ** k
        if ratio:
            assert (b - a) & (b - a - 1) == 0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="compute_ratio"):
            layer_groups(32, 4, bad)


def test_a_transfer_of_parts_fails_a_block_where_any_part_failed() -> None:
    parts = [BlockTransfer.completed(4, "a"), BlockTransfer.completed(4, "b", {1: "layer 1 failed"}),
             BlockTransfer.completed(4, "c", {1: "later", 3: "read bad"}, lost={3})]
    whole = BlockTransfer.all_of(parts, "layers")
    assert whole.done() and whole.reasons == {1: "layer 1 failed", 3: "read bad"} and whole.lost == {3}
    assert whole.results == [BlockStatus.OK, BlockStatus.FAILED, BlockStatus.OK, BlockStatus.FAILED]
    with pytest.raises(ValueError, match="same blocks"):
        BlockTransfer.all_of([BlockTransfer.completed(2, "a"), BlockTransfer.completed(3, "b")], "x")


class _Flag:
    """A waitable a test sets done, counting the polls it answers (as a CUDA event's ``query``)."""

    def __init__(self) -> None:
        self.set = False
        self.polls = 0

    def query(self) -> bool:
        self.polls += 1
        return self.set


def _waiting_on(flag: _Flag, errors: dict[int, str]):
    yield flag
    return errors


def test_a_transfer_of_pending_parts_polls_nothing_until_asked_and_finishes_with_them() -> None:
    """Making the transfer of a layer-wise load's groups (`all_of`) polls none of them; asked, it finishes once
    every group has, with their failures."""
    flags = [_Flag() for _ in range(3)]
    groups = [BlockTransfer(4, "layers", _waiting_on(f, {2: "group failed"} if k == 1 else {}))
              for k, f in enumerate(flags)]
    whole = BlockTransfer.all_of(groups, "layers")
    assert [f.polls for f in flags] == [0, 0, 0] and not whole.over
    flags[0].set = flags[2].set = True
    assert not whole.done()
    flags[1].set = True
    assert whole.done() and whole.over and whole.reasons == {2: "group failed"}


def test_a_layerwise_load_of_several_moves_reports_each_moves_own_blocks() -> None:
    """The moves of one layer-wise load run as one transfer per layer group; each move's result names the failed
    (and lost) blocks by its own indices, and the blocks of the moves that did not fail arrive byte-exact."""
    from kvbm.config import KvbmConfig
    from kvbm.connectors.messages import RequestLoad, RequestStore
    from kvbm.connectors.worker import ConnectorWorker
    from kvbm.kernels.medium import Medium
    from kvbm.leader.plans import Move, MoveKind
    from kvbm.tiers import TierSpec

    g1 = allocate("vllm_flash_attn_nhd", GEOMETRY, 24, dtype=torch.bfloat16)
    fill_random(g1, torch.Generator().manual_seed(5))
    worker = ConnectorWorker(g1, [TierSpec("G2", Medium.HOST, 16)], KvbmConfig(onboard_layers_per_group=2))
    try:
        stored = tuple(range(1, 8))
        worker.start_stores([RequestStore("r", (Move(1, MoveKind.STORE, "G1", "G2", stored, tuple(range(7)),
                                                     tuple(range(101, 108))),))])
        worker.store.wait_all()
        worker.poll()
        worker.take_report()
        submit_groups = worker.store.transfers.submit_groups

        def second_group_fails_two_blocks(pairs, src_ids, dst_ids):
            transfers = submit_groups(pairs, src_ids, dst_ids)
            for t in transfers:
                t.wait()
            bad = BlockTransfer.completed(len(src_ids), "test", {3: "group 1 failed", 5: "read bad"}, lost={5})
            return [transfers[0], bad, *transfers[2:]]

        worker.store.transfers.submit_groups = second_group_fails_two_blocks
        targets = [(10, 11), (12, 13, 14), (15, 16)]
        moves, start = [], 0
        for k, dst in enumerate(targets):
            moves.append(Move(2 + k, MoveKind.LOAD, "G2", "G1", tuple(range(start, start + len(dst))), dst,
                              tuple(range(101 + start, 101 + start + len(dst)))))
            start += len(dst)
        worker.start_loads([RequestLoad("r", tuple(moves), layerwise=True)])
        for layer in range(GEOMETRY.num_layers):
            worker.wait_for_layer(layer)
        worker.finish_layerwise_loads()
        results = worker.take_report().results
        assert not results[2].failed and not results[2].lost
        assert results[3].failed == {1: "group 1 failed"} and not results[3].lost
        assert results[4].failed == {0: "read bad"} and results[4].lost == frozenset({0})
        blocks = to_logical("vllm_flash_attn_nhd", g1)
        assert torch.equal(blocks[[10, 11, 12, 14, 16]], blocks[[1, 2, 3, 5, 7]])
    finally:
        worker.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: the stream ordering of layer-wise loads")
@pytest.mark.parametrize("later", [False, True], ids=["groups-ahead", "later-groups-in-forward"])
@pytest.mark.parametrize("host_runs", [False, True])
def test_layerwise_load_into_a_gpu_cache_orders_each_layer_on_the_stream(host_runs: bool, later: bool) -> None:
    """A layer-wise G2 -> G1 load on the GPU: each layer's reads, queued on the current stream after
    ``wait_for_layer``, see that layer's loaded bytes (fresh blocks poisoned first); no host wait is needed. With
    runs of consecutive G2 blocks the layer groups move by 2-D copies, else by batched pieces; with ``later`` the
    groups after the first are enqueued by the first wait."""
    from kvbm.config import KvbmConfig
    from kvbm.connectors.messages import RequestLoad
    from kvbm.connectors.worker import ConnectorWorker
    from kvbm.kernels.medium import Medium
    from kvbm.leader.plans import Move, MoveKind
    from kvbm.tiers import TierSpec

    g = KVGeometry(num_layers=6, num_kv=2, block_size=16, num_heads=8, head_dim=128, itemsize=2)
    gen = torch.Generator().manual_seed(3)
    g1 = allocate("vllm_flash_attn_nhd", g, 96, dtype=torch.bfloat16, device="cuda")
    config = KvbmConfig(onboard_layers_per_group=1, onboard_later_groups_in_forward=later)
    worker = ConnectorWorker(g1, [TierSpec("G2", Medium.HOST, 64)], config)
    try:
        g2 = worker.store.cache("G2")
        fill_random(g2, gen)
        fill_random(g1, gen)  # poison
        rng = np.random.default_rng(3)
        src = np.concatenate([np.arange(2, 19), [40], np.arange(44, 64), [0, 30]]) if host_runs else \
            rng.choice(64, 40, replace=False)
        dst = np.arange(10, 50)
        moves = tuple(Move(k, MoveKind.LOAD, "G2", "G1", tuple(int(i) for i in src[k * 20:(k + 1) * 20]),
                           tuple(int(i) for i in dst[k * 20:(k + 1) * 20]), tuple(range(20))) for k in range(2))
        want = to_logical("kvbm_staging", g2)[torch.as_tensor(src)].cuda()
        worker.start_loads([RequestLoad("r", moves, layerwise=True)])
        seen = []
        for layer in range(g.num_layers):
            worker.wait_for_layer(layer)
            seen.append(to_logical("vllm_flash_attn_nhd", g1)[torch.as_tensor(dst, device="cuda"), layer])
        assert [len(group) for group in worker.layer_transfers] == [1] * g.num_layers  # the two moves joined
        worker.finish_layerwise_loads()
        torch.cuda.synchronize()
        for layer in range(g.num_layers):
            assert torch.equal(seen[layer], want[:, layer]), layer
        assert not worker.take_load_errors()
    finally:
        worker.close()


def _store_then_load_layerwise(worker) -> None:
    """Store G1 blocks 3, 4 into G2 slots 0, 1 (a move timed as usual), then load them layer-wise into G1 blocks 8, 9
    (every layer waited for, the loads finished)."""
    from kvbm.connectors.messages import RequestLoad, RequestStore
    from kvbm.leader.plans import Move, MoveKind

    worker.start_stores([RequestStore("r", (Move(1, MoveKind.STORE, "G1", "G2", (3, 4), (0, 1), (11, 12)),))])
    worker.store.wait_all()
    worker.poll()
    worker.start_loads([RequestLoad("r", (Move(2, MoveKind.LOAD, "G2", "G1", (0, 1), (8, 9), (11, 12)),),
                                    layerwise=True)])
    for layer in range(GEOMETRY.num_layers):
        worker.wait_for_layer(layer)
    worker.finish_layerwise_loads()


def test_layer_wise_results_carry_no_time_for_the_cost_rule() -> None:
    """A layer-wise load completes only when the forward beside it is done: its result has no ``seconds``, so the
    cost rule's G2 bandwidth is not learned from it; an ordinary move's result has its time."""
    from kvbm.config import KvbmConfig
    from kvbm.connectors.worker import ConnectorWorker
    from kvbm.kernels.medium import Medium
    from kvbm.tiers import TierSpec

    g1 = allocate("vllm_flash_attn_nhd", GEOMETRY, 16, dtype=torch.bfloat16)
    fill_random(g1, torch.Generator().manual_seed(9))
    worker = ConnectorWorker(g1, [TierSpec("G2", Medium.HOST, 16)], KvbmConfig(onboard_layers_per_group=2))
    try:
        _store_then_load_layerwise(worker)
        results = worker.take_report().results
        assert results[1].seconds is not None and results[2].seconds is None and not results[2].failed
        blocks = to_logical("vllm_flash_attn_nhd", g1)
        assert torch.equal(blocks[[8, 9]], blocks[[3, 4]])
    finally:
        worker.close()


@pytest.mark.parametrize("num_layers,per_group", [(1, 4), (5, 2), (28, 4), (32, 4), (32, 8), (61, 4)])
def test_layer_group_ranges_are_every_group_any_ratio_gives(num_layers: int, per_group: int) -> None:
    """The ranges built ahead are exactly the union of `layer_groups` over ratios sampled finely up to 3x the
    layer count (past which the layout no longer changes); without cost-sized groups, the ratio-0 layout alone."""
    from kvbm.worker.layerwise import layer_group_ranges, layer_groups

    sampled = set(layer_groups(num_layers, per_group))
    for ratio in np.arange(0.0, 3.0 * num_layers, 0.002):
        sampled.update(layer_groups(num_layers, per_group, float(ratio)))
    assert set(layer_group_ranges(num_layers, per_group)) == sampled
    assert list(layer_group_ranges(num_layers, per_group)) == sorted(sampled)
    assert set(layer_group_ranges(num_layers, per_group, False)) == set(layer_groups(num_layers, per_group))
    with pytest.raises(ValueError, match="layer groups need"):
        layer_group_ranges(num_layers, 0)


def test_warm_up_prepares_each_layer_group_of_each_host_tier(monkeypatch, tmp_path) -> None:
    """`LayerwiseLoads.warm_up` hands every range of `layer_group_ranges` from each host tier (not the disk tier)
    into the engine cache to the transfer library's `prepare`, as the layer views the loads use; on the CPU the
    worker's `prepare_transfers` builds nothing (its paths compile nothing ahead), and layer-wise loads run as
    before."""
    from kvbm.config import KvbmConfig
    from kvbm.connectors.worker import ConnectorWorker
    from kvbm.kernels.medium import Medium
    from kvbm.tiers import TierSpec
    from kvbm.worker.layerwise import layer_group_ranges

    g1 = allocate("vllm_flash_attn_nhd", GEOMETRY, 16, dtype=torch.bfloat16)
    fill_random(g1, torch.Generator().manual_seed(5))
    tiers = [TierSpec("G2", Medium.HOST, 16), TierSpec("G3", Medium.DISK, 8, tmp_path, use_o_direct=False)]
    worker = ConnectorWorker(g1, tiers, KvbmConfig(onboard_layers_per_group=2))
    try:
        assert worker.store.host_tiers == ["G2"]
        prepared = []
        transfers = worker.store.transfers
        monkeypatch.setattr(transfers, "prepare", lambda src, dst: prepared.append((src, dst)))
        worker.prepare_transfers()
        assert prepared == []  # a CPU engine cache: nothing to build ahead
        worker._layers.warm_up()
        ranges = layer_group_ranges(GEOMETRY.num_layers, 2)
        assert [(s.geometry.num_layers, d.geometry.num_layers) for s, d in prepared] == [(b - a, b - a)
                                                                                         for a, b in ranges]
        assert all(s is worker.store._layer_view("G2", "G1", a, b) and d is worker.store._layer_view("G1", "G2", a, b)
                   for (s, d), (a, b) in zip(prepared, ranges))
        prepared.clear()
        worker._layers.warm_up(cost_sized=False)
        assert len(prepared) == len(layer_group_ranges(GEOMETRY.num_layers, 2, False))
        monkeypatch.undo()
        _store_then_load_layerwise(worker)
        blocks = to_logical("vllm_flash_attn_nhd", g1)
        assert torch.equal(blocks[[8, 9]], blocks[[3, 4]]) and not worker.take_load_errors()
    finally:
        worker.close()


def test_a_failed_warm_up_is_logged_and_the_loads_go_on(monkeypatch, caplog) -> None:
    """`prepare_transfers` on a GPU engine cache whose warm-up raises: a warning, no exception (the loads
    build their plans on first use); with DYN_KVBM_DISABLE_LAYERWISE_ONBOARD the loads' groups are not built."""
    from kvbm.config import KvbmConfig
    from kvbm.connectors.worker import ConnectorWorker
    from kvbm.kernels.medium import Medium
    from kvbm.tiers import TierSpec

    g1 = allocate("vllm_flash_attn_nhd", GEOMETRY, 16, dtype=torch.bfloat16)
    for disabled in (False, True):
        worker = ConnectorWorker(g1, [TierSpec("G2", Medium.HOST, 16)],
                                 KvbmConfig(onboard_layers_per_group=2, disable_layerwise_onboard=disabled,
                                            layerwise_store=False))
        try:
            calls = []

            def broken(cost_sized: bool = True) -> None:
                calls.append(cost_sized)
                raise RuntimeError("no kernel for you")
            monkeypatch.setattr(worker._layers, "warm_up", broken)
            monkeypatch.setattr(worker, "_gpu_cache", True)  # as for a GPU engine cache
            with caplog.at_level("WARNING", logger="kvbm.connectors.worker"):
                worker.prepare_transfers()
            monkeypatch.undo()
            assert calls == ([] if disabled else [True])
            assert ("no kernel for you" in caplog.text) is not disabled
            caplog.clear()
        finally:
            worker.close()


@pytest.mark.parametrize("num_layers,per_group", [(1, 4), (7, 2), (28, 4), (32, 4), (61, 8)])
def test_store_group_ranges_are_every_group_any_step_gives(num_layers: int, per_group: int) -> None:
    """The layer-wise stores' ranges built ahead are the union of `store_groups` over every step size."""
    from kvbm.worker.layerwise_stores import MIN_GROUP_BYTES, store_group_ranges, store_groups

    sampled = set()
    for layer_bytes in [0, 1, *(MIN_GROUP_BYTES // 2**k for k in range(12)), MIN_GROUP_BYTES * 4]:
        sampled.update(store_groups(num_layers, per_group, layer_bytes))
    assert store_group_ranges(num_layers, per_group) == tuple(sorted(sampled))


def test_layer_groups_of_stores_are_prepared_with_the_loads(monkeypatch) -> None:
    """With layer-wise stores, `prepare_transfers` on a GPU engine cache builds the loads' groups from the host tier
    and the stores' groups into it, then the whole-block pairs of both ways (the worker told its cache is on a GPU;
    the transfer library's `prepare` recorded, not run)."""
    from kvbm.config import KvbmConfig
    from kvbm.connectors.worker import ConnectorWorker
    from kvbm.kernels.medium import Medium
    from kvbm.tiers import TierSpec
    from kvbm.worker.layerwise import layer_group_ranges
    from kvbm.worker.layerwise_stores import store_group_ranges

    g1 = allocate("vllm_flash_attn_nhd", GEOMETRY, 16, dtype=torch.bfloat16)
    worker = ConnectorWorker(g1, [TierSpec("G2", Medium.HOST, 16)],
                             KvbmConfig(onboard_layers_per_group=2, layerwise_store=True))
    try:
        prepared = []
        monkeypatch.setattr(worker.store.transfers, "prepare", lambda src, dst: prepared.append((src, dst)))
        monkeypatch.setattr(worker, "_gpu_cache", True)  # as for a GPU engine cache
        worker.prepare_transfers()
        monkeypatch.undo()
        store = worker.store
        whole = [(store.end("G2", "G1"), store.end("G1", "G2")), (store.end("G1", "G2"), store.end("G2", "G1"))]
        loads = [(store._layer_view("G2", "G1", a, b), store._layer_view("G1", "G2", a, b))
                 for a, b in layer_group_ranges(GEOMETRY.num_layers, 2)]
        stores = [(store._layer_view("G1", "G2", a, b), store._layer_view("G2", "G1", a, b))
                  for a, b in store_group_ranges(GEOMETRY.num_layers, 2)]
        assert len(prepared) == len(whole) + len(loads) + len(stores)
        assert all(s is s2 and d is d2 for (s, d), (s2, d2) in zip(prepared, loads + stores + whole))
    finally:
        worker.close()


def test_whole_block_pairs_are_prepared_as_the_moves_use_them(monkeypatch, tmp_path) -> None:
    """`prepare_transfers(layer_groups=False)` on a GPU engine cache with a second KV cache group of unlike
    geometry: the transfer library prepares, for each engine cache and each offload tier (host and disk), both ways,
    the very cache objects the bulk loads and stores between them then submit (each group's view of the raw slots),
    and no layer group; the moves' bytes arrive."""
    from kvbm.config import KvbmConfig
    from kvbm.connectors.worker import ConnectorWorker
    from kvbm.kernels.medium import Medium
    from kvbm.leader.plans import Move, MoveKind
    from kvbm.tiers import TierSpec

    big = allocate("vllm_flash_attn_nhd", GEOMETRY, 8, dtype=torch.bfloat16)
    small = allocate("vllm_flash_attn_nhd", KVGeometry(2, 2, 8, 1, 8, 2), 8, dtype=torch.float16)
    for cache, seed in ((big, 1), (small, 2)):
        fill_random(cache, torch.Generator().manual_seed(seed))
    tiers = [TierSpec("G2", Medium.HOST, 8), TierSpec("G3", Medium.DISK, 8, tmp_path, use_o_direct=False)]
    worker = ConnectorWorker(big, tiers, KvbmConfig(onboard_layers_per_group=2, layerwise_store=True),
                             groups={"G1.1": small})
    try:
        transfers = worker.store.transfers
        prepared, submitted = [], []
        monkeypatch.setattr(transfers, "prepare", lambda src, dst: prepared.append((src, dst)))
        monkeypatch.setattr(worker, "_gpu_cache", True)  # as for a GPU engine cache
        worker.prepare_transfers(layer_groups=False)
        monkeypatch.undo()
        assert len(prepared) == 8 and all(src.geometry.num_layers == dst.geometry.num_layers for src, dst in prepared)
        submit = transfers.submit

        def recorded(src, dst, *args, **kwargs):
            submitted.append((src, dst))
            return submit(src, dst, *args, **kwargs)
        monkeypatch.setattr(transfers, "submit", recorded)
        ids = iter(range(1, 100))
        for engine, tier_blocks in (("G1", (0, 1)), ("G1.1", (2, 3))):
            for tier, into in (("G2", [6, 7]), ("G3", [2, 3])):  # (random bytes there before: the poison)
                hashes = (next(ids), next(ids))
                store = Move(next(ids), MoveKind.STORE, engine, tier, (4, 5), tier_blocks, hashes)
                load = Move(next(ids), MoveKind.LOAD, tier, engine, tier_blocks, tuple(into), hashes)
                blocks = to_logical("vllm_flash_attn_nhd", big if engine == "G1" else small)
                assert not torch.equal(blocks[into], blocks[[4, 5]])
                for move in (store, load):
                    worker.store.execute([move])
                    worker.store.wait_all()
                blocks = to_logical("vllm_flash_attn_nhd", big if engine == "G1" else small)
                assert torch.equal(blocks[into], blocks[[4, 5]])
        results = worker.store.poll()
        monkeypatch.undo()
        assert len(results) == 8 and not any(r.failed for r in results)
        assert len(submitted) == 8
        assert all(any(s is p and d is q for p, q in prepared) for s, d in submitted)
    finally:
        worker.close()


def test_a_disk_tier_that_refuses_its_pairs_leaves_the_rest_prepared(monkeypatch, caplog, tmp_path) -> None:
    """`prepare_transfers` where the disk tier's preparing raises (a file cuFile refuses under
    DYN_KVBM_DISK_IO=gds): the layer groups and the host tier's whole-block pairs are built first, and the failure
    is logged, not raised."""
    from kvbm.config import KvbmConfig
    from kvbm.connectors.worker import ConnectorWorker
    from kvbm.kernels.medium import Medium, medium_of
    from kvbm.tiers import TierSpec
    from kvbm.worker.layerwise import layer_group_ranges

    g1 = allocate("vllm_flash_attn_nhd", GEOMETRY, 8, dtype=torch.bfloat16)
    tiers = [TierSpec("G2", Medium.HOST, 8), TierSpec("G3", Medium.DISK, 8, tmp_path, use_o_direct=False)]
    worker = ConnectorWorker(g1, tiers, KvbmConfig(onboard_layers_per_group=2, layerwise_store=False))
    try:
        prepared = []

        def prepare(src, dst):
            if Medium.DISK in (medium_of(src), medium_of(dst)):
                raise ValueError("cuFileHandleRegister failed")
            prepared.append((src, dst))
        monkeypatch.setattr(worker.store.transfers, "prepare", prepare)
        monkeypatch.setattr(worker, "_gpu_cache", True)  # as for a GPU engine cache
        with caplog.at_level("WARNING", logger="kvbm.connectors.worker"):
            worker.prepare_transfers()
        monkeypatch.undo()
        store = worker.store
        assert len(prepared) == len(layer_group_ranges(GEOMETRY.num_layers, 2)) + 2
        assert prepared[-2][0] is store.end("G2", "G1") and prepared[-1][1] is store.end("G2", "G1")
        assert "cuFileHandleRegister failed" in caplog.text and "not built ahead" in caplog.text
    finally:
        worker.close()
