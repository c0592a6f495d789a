"""Layer-wise stores (`DYN_KVBM_LAYERWISE_STORE`): a step's stores into host memory start one group of layers at a
time, as the forward saves the group's last layer. On the CPU each copy runs inside its submit, so a group started
before its layers were written would store the poison they held before; every stored byte is checked against the
bytes the layers were given, through a load back into fresh (poisoned) engine blocks."""
from __future__ import annotations

import pytest
import torch
from layout_oracle import fill_random, to_logical

from kvbm.config import KvbmConfig
from kvbm.connectors.messages import RequestLoad, RequestStore
from kvbm.connectors.worker import ConnectorWorker
from kvbm.kernels.medium import Medium
from kvbm.layouts import KVGeometry, allocate
from kvbm.leader.plans import Move, MoveKind
from kvbm.tiers import TierSpec
from kvbm.worker import layerwise_stores
from kvbm.worker.layerwise_stores import even_groups, store_groups

GEOMETRY = KVGeometry(num_layers=5, num_kv=2, block_size=4, num_heads=2, head_dim=8, itemsize=2)
PRESET = "vllm_flash_attn_nhd"
POISON = -7.0


def test_even_groups() -> None:
    assert even_groups(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert even_groups(4, 4) == [(0, 4)] and even_groups(3, 8) == [(0, 3)]
    with pytest.raises(ValueError):
        even_groups(0, 2)


def test_store_groups_double_until_a_group_moves_the_minimum() -> None:
    assert store_groups(32, 4, 64 << 20, 16 << 20) == even_groups(32, 4)  # large steps: the configured size
    assert store_groups(32, 4, 1 << 20, 16 << 20) == even_groups(32, 16)  # 1 MiB a layer: 16 layers a group
    assert store_groups(32, 4, 3 << 20, 16 << 20) == even_groups(32, 8)
    assert store_groups(5, 2, 1, 16 << 20) == [(0, 5)]  # never past every layer
    assert store_groups(5, 2, 1, 0) == even_groups(5, 2)
    with pytest.raises(ValueError):
        store_groups(5, 2, -1)


@pytest.fixture
def no_minimum(monkeypatch) -> None:
    """Groups of the configured size whatever the step's bytes (this file's caches are a few KiB)."""
    monkeypatch.setattr(layerwise_stores, "MIN_GROUP_BYTES", 0)


def test_a_small_step_is_stored_in_fewer_groups() -> None:
    """With the default minimum, a step of a few KiB is one group, started when the last layer is saved."""
    g1 = allocate(PRESET, GEOMETRY, 16, dtype=torch.bfloat16)
    fill_random(g1, torch.Generator().manual_seed(5))
    worker = worker_for(g1, layerwise_store=True, per_group=1)
    try:
        store = RequestStore("r", (Move(1, MoveKind.STORE, "G1", "G2", (3, 7), (0, 1), (11, 12)),))
        worker.begin_layer_stores([store])
        assert worker._layer_stores.groups == [(0, GEOMETRY.num_layers)]
        for layer in range(GEOMETRY.num_layers - 1):
            worker.save_layer(layer)
            assert worker._layer_stores._next == 0
        worker.save_layer(GEOMETRY.num_layers - 1)
        assert worker._layer_stores._next == 1
        worker.start_stores([store])
        worker.store.wait_all()
        worker.poll()
        assert not worker.take_report().results[1].failed
        blocks = to_logical(PRESET, g1)
        for t in g1.tensors:
            t[:, [8, 9]] = POISON
        worker.start_loads([RequestLoad("r", (Move(2, MoveKind.LOAD, "G2", "G1", (0, 1), (8, 9), (11, 12)),))])
        worker.store.wait_all()
        worker.poll()
        assert torch.equal(to_logical(PRESET, g1)[[8, 9]], blocks[[3, 7]])
    finally:
        worker.close()


def worker_for(g1, *, layerwise_store: bool, per_group: int = 2, disk_dir=None) -> ConnectorWorker:
    tiers = [TierSpec("G2", Medium.HOST, 16)]
    if disk_dir is not None:
        tiers.append(TierSpec("G3", Medium.DISK, 16, directory=disk_dir))
    return ConnectorWorker(g1, tiers, KvbmConfig(onboard_layers_per_group=per_group, layerwise_store=layerwise_store))


@pytest.mark.parametrize("per_group", [1, 2, 5])
def test_each_group_is_stored_once_its_last_layer_is_saved(per_group: int, no_minimum: None) -> None:
    g1 = allocate(PRESET, GEOMETRY, 16, dtype=torch.bfloat16)
    for t in g1.tensors:
        t.fill_(POISON)
    gen = torch.Generator().manual_seed(per_group)
    worker = worker_for(g1, layerwise_store=True, per_group=per_group)
    try:
        submitted: list[tuple[int, int]] = []
        layered = worker.store.layered

        def spy(moves):
            moves_obj = layered(moves)
            real = moves_obj.submit
            moves_obj.submit = lambda a, b: (submitted.append((a, b)), real(a, b))[1]
            return moves_obj

        worker.store.layered = spy
        store = RequestStore("r", (Move(1, MoveKind.STORE, "G1", "G2", (3, 7, 5), (0, 1, 2), (11, 12, 13)),))
        worker.begin_layer_stores([store])
        want = []
        for layer, t in enumerate(g1.tensors):  # the forward writes layer by layer, then saves it
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
            want.append(t.clone())
            worker.save_layer(layer)
            started = [g for g in even_groups(GEOMETRY.num_layers, per_group) if g[1] <= layer + 1]
            assert submitted == started
        worker.start_stores([store])  # nothing left to start, and the move is not run twice
        assert submitted == even_groups(GEOMETRY.num_layers, per_group)
        worker.store.wait_all()
        worker.poll()
        results = worker.take_report().results
        assert set(results) == {1} and not results[1].failed
        for t in g1.tensors:  # load back into poisoned blocks
            t[:, [8, 9, 10]] = POISON
        worker.start_loads([RequestLoad("r", (Move(2, MoveKind.LOAD, "G2", "G1", (0, 1, 2), (8, 9, 10),
                                                   (11, 12, 13)),))])
        worker.store.wait_all()
        worker.poll()
        for layer, t in enumerate(g1.tensors):
            assert torch.equal(t[:, [8, 9, 10]], want[layer][:, [3, 7, 5]]), f"layer {layer}"
    finally:
        worker.close()


def test_groups_not_saved_start_with_the_stores_and_disk_stores_wait_for_them(tmp_path) -> None:
    """An engine that saves no layer: every group starts in ``start_stores``; a store into the disk tier is never
    taken by the layer-wise stores (it starts in ``start_stores``, after the forward)."""
    g1 = allocate(PRESET, GEOMETRY, 16, dtype=torch.bfloat16)
    fill_random(g1, torch.Generator().manual_seed(3))
    worker = worker_for(g1, layerwise_store=True, disk_dir=tmp_path)
    try:
        host = Move(1, MoveKind.STORE, "G1", "G2", (3, 4), (0, 1), (11, 12))
        disk = Move(2, MoveKind.STORE, "G1", "G3", (5,), (0,), (13,))
        stores = [RequestStore("r", (host, disk))]
        worker.begin_layer_stores(stores)
        assert worker._layer_stores.active and worker._taken == {1}
        worker.start_stores(stores)
        worker.store.wait_all()
        worker.poll()
        results = worker.take_report().results
        assert set(results) == {1, 2} and not results[1].failed and not results[2].failed
        assert not worker._layer_stores.active
        blocks = to_logical(PRESET, g1)
        for t in g1.tensors:
            t[:, [8, 9, 10]] = POISON
        worker.start_loads([RequestLoad("r", (Move(3, MoveKind.LOAD, "G2", "G1", (0, 1), (8, 9), (11, 12)),
                                              Move(4, MoveKind.LOAD, "G3", "G1", (0,), (10,), (13,))))])
        worker.store.wait_all()
        worker.poll()
        assert torch.equal(to_logical(PRESET, g1)[[8, 9, 10]], blocks[[3, 4, 5]])
    finally:
        worker.close()


def test_on_by_default_and_when_off_nothing_is_taken() -> None:
    g1 = allocate(PRESET, GEOMETRY, 16, dtype=torch.bfloat16)
    worker = worker_for(g1, layerwise_store=False)
    try:
        worker.begin_layer_stores([RequestStore("r", (Move(1, MoveKind.STORE, "G1", "G2", (3,), (0,), (11,)),))])
        worker.save_layer(0)
        assert worker._layer_stores is None and not worker._taken
        assert KvbmConfig.from_env({}).layerwise_store
        assert not KvbmConfig.from_env({"DYN_KVBM_LAYERWISE_STORE": "0"}).layerwise_store
    finally:
        worker.close()


def test_stores_are_looked_over_once_per_step(tmp_path) -> None:
    """vLLM's connector calls ``begin_layer_stores`` from every layer's ``save_kv_layer``: a step whose stores all go
    to disk (none taken) is looked over at its first call only, and again in the next step."""
    g1 = allocate(PRESET, GEOMETRY, 16, dtype=torch.bfloat16)
    fill_random(g1, torch.Generator().manual_seed(4))
    worker = worker_for(g1, layerwise_store=True, disk_dir=tmp_path)
    try:
        asked: list[int] = []
        takes = worker._layer_stores.takes
        worker._layer_stores.takes = lambda move: (asked.append(move.move_id), takes(move))[1]
        for step, move_id in enumerate((1, 2)):
            stores = [RequestStore("r", (Move(move_id, MoveKind.STORE, "G1", "G3", (5,), (step,), (13 + step,)),))]
            for layer in range(GEOMETRY.num_layers):
                worker.begin_layer_stores(stores)
                worker.save_layer(layer)
            assert not worker._layer_stores.active and not worker._taken
            worker.start_stores(stores)
        assert asked == [1, 2]
        worker.store.wait_all()
        worker.poll()
        results = worker.take_report().results
        assert set(results) == {1, 2} and not results[1].failed and not results[2].failed
    finally:
        worker.close()


def test_waiting_for_stores_not_started_yet_raises_rather_than_spins() -> None:
    """A preempted request's stores taken for this step's layer-wise groups but not started cannot end a wait:
    ``finish_stores_of`` says so. Once started they are waited for, and a request with no stores returns at once."""
    g1 = allocate(PRESET, GEOMETRY, 16, dtype=torch.bfloat16)
    fill_random(g1, torch.Generator().manual_seed(6))
    worker = worker_for(g1, layerwise_store=True)
    try:
        stores = [RequestStore("r", (Move(1, MoveKind.STORE, "G1", "G2", (3,), (0,), (11,)),))]
        worker.begin_layer_stores(stores)
        with pytest.raises(RuntimeError, match=r"stores \[1\] of requests \['r'\] are neither running nor queued"):
            worker.finish_stores_of(["r"])
        worker.finish_stores_of(["other"])
        worker.start_stores(stores)
        worker.finish_stores_of(iter(["r"]))
        assert not worker._storing.get("r")
        worker.store.wait_all()
        worker.poll()
        assert not worker.take_report().results[1].failed
    finally:
        worker.close()


def test_a_step_with_a_move_the_store_cannot_run_queues_and_tracks_none_of_its_moves() -> None:
    """A store into a tier the worker lacks fails the whole call before anything runs: no move is queued, none is
    waited for, and the worker is left idle."""
    g1 = allocate(PRESET, GEOMETRY, 16, dtype=torch.bfloat16)
    fill_random(g1, torch.Generator().manual_seed(7))
    worker = worker_for(g1, layerwise_store=False)
    try:
        good = Move(1, MoveKind.STORE, "G1", "G2", (3,), (0,), (11,))
        bad = Move(2, MoveKind.STORE, "G1", "G9", (4,), (0,), (12,))
        with pytest.raises((KeyError, ValueError), match="G9"):
            worker.start_stores([RequestStore("r", (good, bad))])
        assert not worker.store.busy and worker.store.num_queued() == 0
        worker.finish_stores_of(["r"])
        assert worker.poll() == (set(), set()) and worker.idle()
    finally:
        worker.close()
