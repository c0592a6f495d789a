"""Layer-wise onboarding through DynamoConnector on vLLM 0.33's real scheduler (both runners, async scheduling).

A G2 hit is loaded beside the forward that reads it: vLLM is told the load is synchronous, `start_load_kv` starts
one transfer per layer group and `wait_for_layer_load(layer)` waits only for that layer's group. Here every transfer
of a layer group is held back until something waits for it (on CPU copies would otherwise land at once), so a
layer whose attention ran before its group was waited for would read the poison vLLM's fresh blocks carry; the
harness checks every byte each layer's attention reads, right after that layer's wait.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import vllm_harness as H  # first: imports vLLM for the CPU platform, clear of the repo's kernels/ folder
from test_vllm_connector import assert_clean, chat, kvbm_harness, run_counting, worker_of

from kvbm.kernels.block_transfer import BlockTransfer
from kvbm.leader import MoveKind
from kvbm.worker import layerwise_stores
from kvbm.worker.layerwise import layer_groups

LAYERS = 4
MODEL = H.TinyModelSpec(num_layers=LAYERS)
PER_LAYER = {"DYN_KVBM_ONBOARD_LAYERS_PER_GROUP": 1, "DYN_KVBM_DISABLE_COST_LAYER_GROUPS": 1}
#: the loads' later layer groups enqueued at the forward's first layer wait instead of with the first group
LATER = {"DYN_KVBM_ONBOARD_LATER_GROUPS_IN_FORWARD": 1}


class HeldLayers:
    """Holds back the worker's layer-group transfers of loads until something waits for them (polling does not
    move them, as polling a GPU transfer does not), and records the order in which groups ran; ``fail_group`` fails
    every transfer of that group instead."""

    def __init__(self, worker: Any, fail_group: int | None = None) -> None:
        self.ran: list[int] = []
        self.log: list[tuple[str, int]] = []  # ("queued" / "ran", the group's first layer), in order
        self.failed = Counter()
        store = worker.store
        submit = store._submit
        views = store._layer_views
        held = self

        def held_submit(move: Any, src: Any, dst: Any, ids: Any = None) -> BlockTransfer:
            group = next((start for (_, _, start, _stop), view in views.items() if view is src), None)
            if move.kind is not MoveKind.LOAD or group is None:
                return submit(move, src, dst, ids)
            held.log.append(("queued", group))

            outcome: dict[str, Any] = {}

            class Held:
                def query(self) -> bool:
                    return bool(outcome)

                def synchronize(self) -> None:
                    if not outcome:
                        held.ran.append(group)
                        held.log.append(("ran", group))
                        if group == fail_group:
                            held.failed["blocks"] += move.num_blocks
                            outcome["failed"] = {i: "injected layer failure" for i in range(move.num_blocks)}
                        else:
                            inner = submit(move, src, dst, ids)
                            inner.wait()
                            outcome["failed"] = inner.reasons

            def steps():
                yield Held()
                return outcome["failed"]

            return BlockTransfer(move.num_blocks, "held", steps())

        store._submit = held_submit
        # a load's layer groups reach the transfer library in one call: each group held as one transfer here
        store._submit_groups = lambda move, views, ids: [held_submit(move, src, dst, ids) for src, dst in views]


def watch_layer_waits(h: H.VllmHarness, held: HeldLayers) -> Counter:
    """Check around each ``wait_for_layer_load``: no later layer's group ran before it, its own group ran by its end."""
    seen: Counter = Counter()
    connector = h.worker.connector
    layers = connector._layers
    wait = connector.wait_for_layer_load

    def checked_wait(layer_name: str) -> None:
        layer = layers[layer_name]
        before = len(held.ran)
        wait(layer_name)
        if len(held.ran) > before:
            seen["waits_that_loaded"] += 1
            assert set(held.ran[before:]) == {layer}, f"waiting for layer {layer} ran groups {held.ran[before:]}"

    connector.wait_for_layer_load = checked_wait
    return seen


@pytest.mark.parametrize("later", [False, True], ids=["groups-ahead", "later-groups-in-forward"])
@pytest.mark.parametrize("runner", ["v1", "v2"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync-sched", "async-sched"])
def test_each_layer_is_loaded_before_its_attention_and_no_sooner(runner: str, async_scheduling: bool,
                                                                 later: bool) -> None:
    workload = chat(num_users=6, num_rounds=3)
    with kvbm_harness(runner=runner, num_gpu_blocks=32, model=MODEL, async_scheduling=async_scheduling,
                      extra={**PER_LAYER, **(LATER if later else {})}) as h:
        held = HeldLayers(worker_of(h))
        seen = watch_layer_waits(h, held)
        counts = run_counting(h, workload)
        assert workload.done and all(len(h.outputs[t.request_id]) == t.max_tokens for t in workload.completed)
        assert counts["layerwise_jobs"] > 0 and counts["verified"] > 0 and counts["load_errors"] == 0
        # every group was run by its own layer's wait
        assert seen["waits_that_loaded"] >= LAYERS
        assert set(held.ran) == set(range(LAYERS))
        assert_clean(h)


@pytest.mark.parametrize("later", [False, True], ids=["groups-ahead", "later-groups-in-forward"])
@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_a_failed_layer_fails_its_blocks_for_recompute(runner: str, later: bool) -> None:
    """Layer 2's group fails: the request's loaded blocks are reported, vLLM recomputes them, no wrong byte is read
    (the harness raises on any unreported mismatch). Synchronous scheduling: with async scheduling the step after a
    failed synchronous load was already scheduled on the discarded token, which only the real runner can replay."""
    workload = chat(num_users=6, num_rounds=3)
    with kvbm_harness(runner=runner, num_gpu_blocks=32, model=MODEL, async_scheduling=False,
                      extra={**PER_LAYER, **(LATER if later else {})}) as h:
        held = HeldLayers(worker_of(h), fail_group=2)
        counts = run_counting(h, workload)
        assert workload.done and all(len(h.outputs[t.request_id]) == t.max_tokens for t in workload.completed)
        assert counts["layerwise_jobs"] > 0 and held.failed["blocks"] > 0
        assert counts["load_errors"] == held.failed["blocks"]
        assert_clean(h)


@pytest.mark.parametrize("later", [False, True], ids=["groups-ahead", "later-groups-in-forward"])
def test_later_groups_are_enqueued_at_the_forwards_first_layer_wait(later: bool) -> None:
    """``DYN_KVBM_ONBOARD_LATER_GROUPS_IN_FORWARD``: ``start_load_kv`` enqueues a layer-wise load's first group
    only, the forward's first ``wait_for_layer_load`` (layer 0's) the other groups, before it waits for layer 0's
    (on the GPU that wait orders the stream they would otherwise queue behind); off, ``start_load_kv`` enqueues
    every group. Every byte attention reads is checked either way."""
    workload = chat(num_users=6, num_rounds=3)
    with kvbm_harness(num_gpu_blocks=32, model=MODEL, extra={**PER_LAYER, **(LATER if later else {})}) as h:
        held = HeldLayers(worker_of(h))
        seen = watch_layer_waits(h, held)
        connector = h.worker.connector
        layers, start, wait = connector._layers, connector.start_load_kv, connector.wait_for_layer_load
        by_start: list[list[tuple[str, int]]] = []  # what each start_load_kv that enqueued any load did
        by_wait: list[tuple[int, list[tuple[str, int]]]] = []  # (layer, what it did) of each wait that enqueued

        def recording_start(*args: Any, **kwargs: Any) -> None:
            before = len(held.log)
            start(*args, **kwargs)
            if len(held.log) > before:
                by_start.append(held.log[before:])

        def recording_wait(layer_name: str) -> None:
            before = len(held.log)
            wait(layer_name)
            if any(event == "queued" for event, _ in held.log[before:]):
                by_wait.append((layers[layer_name], held.log[before:]))

        connector.start_load_kv, connector.wait_for_layer_load = recording_start, recording_wait
        counts = run_counting(h, workload)
        assert workload.done and counts["layerwise_jobs"] > 0 and counts["verified"] > 0
        assert counts["load_errors"] == 0 and seen["waits_that_loaded"] >= LAYERS
        assert by_start
        if later:
            assert all(log == [("queued", 0)] for log in by_start)
            first_wait = (0, [("queued", g) for g in range(1, LAYERS)] + [("ran", 0)])
            assert by_wait == [first_wait] * len(by_start)
        else:
            assert all(log == [("queued", g) for g in range(LAYERS)] for log in by_start) and not by_wait
        assert_clean(h)


@pytest.mark.parametrize("group", [2, 3, 4])
def test_layer_groups(group: int) -> None:
    """``DYN_KVBM_ONBOARD_LAYERS_PER_GROUP``: one transfer per group of layers (1, 2, 4, ... up to the setting; the
    last may be shorter)."""
    workload = chat(num_users=6, num_rounds=3)
    extra = {"DYN_KVBM_ONBOARD_LAYERS_PER_GROUP": group, "DYN_KVBM_DISABLE_COST_LAYER_GROUPS": 1}
    with kvbm_harness(num_gpu_blocks=32, model=MODEL, extra=extra) as h:
        held = HeldLayers(worker_of(h))
        counts = run_counting(h, workload)
        assert counts["layerwise_jobs"] > 0 and counts["verified"] > 0 and counts["load_errors"] == 0
        assert set(held.ran) == {start for start, _ in layer_groups(LAYERS, group)}
        assert_clean(h)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync-sched", "async-sched"])
def test_layer_groups_follow_the_cost_rules_estimates(async_scheduling: bool) -> None:
    """By default each step's groups are `layer_groups` of the plan's layer ratio (the step's expected forward time
    over its loads' expected transfer time). The tiny model's blocks load far faster than its forward runs, so
    steps double their groups past ``DYN_KVBM_ONBOARD_LAYERS_PER_GROUP`` (1 here): 1, 2, 1 layers instead of four
    groups of one; each layer's wait still runs only its own group and every byte attention reads is checked."""
    workload = chat(num_users=6, num_rounds=3)
    extra = {"DYN_KVBM_ONBOARD_LAYERS_PER_GROUP": 1}
    with kvbm_harness(num_gpu_blocks=32, model=MODEL, async_scheduling=async_scheduling, extra=extra) as h:
        worker = worker_of(h)
        held = HeldLayers(worker)
        seen = watch_layer_waits(h, held)
        loads = worker._layers
        start = loads.start
        started: list[tuple[float, list[tuple[int, int]]]] = []

        def recording(moves: Any, ratio: float = 0.0) -> None:
            start(moves, ratio)
            started.append((ratio, list(loads.groups)))

        loads.start = recording
        counts = run_counting(h, workload)
        assert workload.done and counts["layerwise_jobs"] > 0 and counts["verified"] > 0
        assert counts["load_errors"] == 0 and seen["waits_that_loaded"] > 0
        assert started and all(groups == layer_groups(LAYERS, 1, ratio) for ratio, groups in started)
        assert all(ratio > 0 for ratio, _ in started)
        assert any(len(groups) < LAYERS for _, groups in started)
        assert set(held.ran) == {first for _, groups in started for first, _ in groups}
        assert_clean(h)


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_without_layerwise_loads_are_asynchronous(runner: str) -> None:
    """``DYN_KVBM_DISABLE_LAYERWISE_ONBOARD``: hits load before the request is scheduled (WAITING_FOR_REMOTE_KVS)."""
    workload = chat(num_users=6, num_rounds=3)
    extra = {"DYN_KVBM_DISABLE_LAYERWISE_ONBOARD": "true"}
    with kvbm_harness(runner=runner, num_gpu_blocks=32, model=MODEL, extra=extra) as h:
        counts = run_counting(h, workload)
        assert workload.done and counts["load_jobs"] > 0 and counts["layerwise_jobs"] == 0
        assert counts["verified"] > 0 and counts["load_errors"] == 0
        assert_clean(h)


def test_disk_hits_stay_asynchronous(tmp_path) -> None:
    """A match reaching into G3 is loaded before the request is scheduled, whatever the layer-wise setting."""
    workload = chat(num_users=6, num_rounds=3)
    with kvbm_harness(tmp_path, host=None, disk=512, num_gpu_blocks=32, model=MODEL) as h:
        counts = run_counting(h, workload)
        assert workload.done and counts["load_jobs"] > 0 and counts["layerwise_jobs"] == 0
        assert counts["verified"] > 0 and counts["load_errors"] == 0
        assert_clean(h)


@pytest.mark.parametrize("runner", ["v1", "v2"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync-sched", "async-sched"])
def test_layerwise_stores_run_as_vllm_saves_each_layer(runner: str, async_scheduling: bool, monkeypatch) -> None:
    """``DYN_KVBM_LAYERWISE_STORE``: each step's stores into G2 start one layer group at a time from
    ``save_kv_layer``, right after the harness wrote that layer's KV (on the CPU the copy runs at once, so a group
    started early would store the poison of fresh blocks); every byte later loaded is checked by the harness. (The
    groups' byte minimum is lifted: this model's steps store a few KiB.)"""
    monkeypatch.setattr(layerwise_stores, "MIN_GROUP_BYTES", 0)
    workload = chat(num_users=6, num_rounds=3)
    extra = {"DYN_KVBM_LAYERWISE_STORE": "1", "DYN_KVBM_ONBOARD_LAYERS_PER_GROUP": 2}
    with kvbm_harness(runner=runner, num_gpu_blocks=32, model=MODEL, async_scheduling=async_scheduling,
                      extra=extra) as h:
        worker = worker_of(h)
        groups: Counter = Counter()
        layered = worker.store.layered

        def counting(moves: Any) -> Any:
            moves_obj = layered(moves)
            submit = moves_obj.submit
            moves_obj.submit = lambda start, stop: (groups.update([(start, stop)]), submit(start, stop))[1]
            return moves_obj

        worker.store.layered = counting
        counts = run_counting(h, workload)
        assert workload.done and all(len(h.outputs[t.request_id]) == t.max_tokens for t in workload.completed)
        assert counts["verified"] > 0 and counts["load_errors"] == 0
        assert set(groups) >= {(0, 2), (2, 4)} and groups[(0, 2)] == groups[(2, 4)]  # stores split by layers
        assert_clean(h)
