"""The scheduler-side parts of disaggregated prefill -> decode, without processes: the params a prefill hands out
(`RemotePrefill`), the pins that keep its G2 blocks for a reader (`Pins`), and the leader's remote match and load
plan (`ConnectorLeader.match_remote`, a move from G4 outside the index)."""
from __future__ import annotations

import json
import random

import pytest

from kvbm.config import KvbmConfig
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import WorkerReport
from kvbm.connectors.pd import Pins, RemotePrefill, wants_remote_decode
from kvbm.kernels.medium import Medium
from kvbm.leader import BlockIndex, MoveKind, MoveResult, TierConfig
from kvbm.leader.plans import ENGINE_TIER, REMOTE_TIER, Move, RemoteSource
from kvbm.tiers import TierSpec

BS = 16


def _prefill(rng: random.Random, n: int = 5, ranks: int = 2) -> RemotePrefill:
    source = RemoteSource("engine-p", "req-1", tuple(rng.randbytes(40) for _ in range(ranks)))
    return RemotePrefill(source, BS, tuple(rng.getrandbits(64) for _ in range(n)),
                         tuple(rng.sample(range(1000), n)))


def test_params_round_trip_through_json() -> None:
    rng = random.Random(1)
    prefill = _prefill(rng)
    params = json.loads(json.dumps(prefill.to_params()))  # what a proxy carries
    assert params["do_remote_prefill"] and not params["do_remote_decode"]
    assert RemotePrefill.from_params(params) == prefill
    assert RemotePrefill.from_params({"do_remote_prefill": False}) is None
    assert RemotePrefill.from_params(None) is None
    assert wants_remote_decode({"do_remote_decode": True}) and not wants_remote_decode(None)


@pytest.mark.parametrize(("change", "message"), [
    (lambda kv: kv.pop("kvbm"), "no 'kvbm' section"),
    (lambda kv: kv["kvbm"].update(version=9), "version 9"),
    (lambda kv: kv["kvbm"].update(slots=[1]), "5 hashes, 1 slots"),
    (lambda kv: kv["kvbm"].update(endpoints=["not base64!"]), "malformed"),
    (lambda kv: kv["kvbm"].update(hashes=["x"] * 5), "malformed"),
    (lambda kv: kv["kvbm"].update(endpoints=[]), "0 endpoints"),
])
def test_malformed_params_are_refused_with_the_reason(change, message) -> None:
    params = _prefill(random.Random(2)).to_params()
    change(params)
    with pytest.raises(ValueError, match=message):
        RemotePrefill.from_params(params)


def test_a_remote_move_needs_its_source_and_only_it() -> None:
    source = RemoteSource("e", "r", (b"x",))
    Move(1, MoveKind.LOAD, REMOTE_TIER, ENGINE_TIER, (3,), (4,), (5,), source)
    with pytest.raises(ValueError, match="RemoteSource"):
        Move(1, MoveKind.LOAD, REMOTE_TIER, ENGINE_TIER, (3,), (4,), (5,))
    with pytest.raises(ValueError, match="RemoteSource"):
        Move(1, MoveKind.LOAD, "G2", ENGINE_TIER, (3,), (4,), (5,), source)


def test_pins_hold_stored_and_pending_blocks_until_every_reader_is_done() -> None:
    rng = random.Random(3)
    index = BlockIndex([TierConfig("G2", 8)], batch_size=2)
    hashes = [rng.getrandbits(63) for _ in range(4)]
    first, second = index.plan_store(hashes, [10, 11, 12, 13]).moves
    index.complete(first.move_id, {})
    now = [0.0]
    pins = Pins(index, "G2", readers=2, timeout_s=5.0, clock=lambda: now[0])
    run, slots = pins.pin("r", hashes + [rng.getrandbits(63)])  # the last is in no tier: the run stops there
    assert run == hashes and slots == list(first.dst_ids + second.dst_ids)
    pool = index.pool("G2")
    assert [pool.holds(s) for s in first.dst_ids] == [1, 1]
    index.complete(second.move_id, {1: "store failed"})
    pins.stored(second.hashes, {1: "store failed"})
    assert pool.holds(second.dst_ids[0]) == 1 and pool.find(hashes[3]) is None
    # pinned blocks survive pressure: every new store finds only the 5 other slots
    others = [rng.getrandbits(63) for _ in range(8)]
    plan = index.plan_store(others, list(range(8)))
    assert len(plan.busy) == 3 and not set(first.dst_ids) & {s for m in plan.moves for s in m.dst_ids}
    pins.acknowledge("r", 1)
    assert pool.holds(first.dst_ids[0]) == 1
    pins.acknowledge("r", 1)
    assert len(pins) == 0 and pool.holds(first.dst_ids[0]) == 0


def test_pins_expire_after_the_timeout() -> None:
    index = BlockIndex([TierConfig("G2", 4)])
    (move,) = index.plan_store([7, 8], [0, 1]).moves
    index.complete(move.move_id, {})
    now = [100.0]
    pins = Pins(index, "G2", readers=1, timeout_s=5.0, clock=lambda: now[0])
    pins.pin("r", [7, 8])
    now[0] = 104.9
    assert pins.expire() == []
    now[0] = 105.0
    assert pins.expire() == ["r"] and pins.expired == 1
    assert index.pool("G2").holds(move.dst_ids[0]) == 0
    with pytest.raises(ValueError, match="timeout_s"):
        Pins(index, "G2", readers=1, timeout_s=0)


def _leader(num_workers: int = 2) -> ConnectorLeader:
    return ConnectorLeader([TierSpec("G2", Medium.HOST, 32)], KvbmConfig(), BS, num_workers=num_workers)


def test_remote_match_loads_the_blocks_whose_hashes_agree() -> None:
    rng = random.Random(4)
    tokens = [rng.randrange(1, 1000) for _ in range(5 * BS + 3)]
    producer, consumer = _leader(), _leader()
    producer.endpoints, producer.engine_id = (b"rank0", b"rank1"), "P"
    p_state = producer.track("req-p", salt=0)
    p_state.block_ids = list(range(6))
    producer.plan_stores(p_state, tokens, 5)
    plan = producer.take_step()
    kept = producer.keep_for_remote(p_state, tokens)
    assert kept is not None and len(kept.hashes) == 5 and kept.source.endpoints == (b"rank0", b"rank1")
    for move in (m for store in plan.stores for m in store.moves):  # both ranks report: the pending pins hold
        producer.apply(WorkerReport({move.move_id: MoveResult(move.move_id)}))
        producer.apply(WorkerReport({move.move_id: MoveResult(move.move_id)}))
    pool = producer.index.pool("G2")
    assert all(pool.holds(s) == 1 for s in kept.slots)

    state = consumer.track("req-d", salt=0)
    assert consumer.match_remote(state, tokens, 2 * BS, kept) == 3 * BS  # vLLM's own hit: the first 2 blocks
    load = consumer.plan_matched_load(state, list(range(100, 106)), 3)
    (move,) = load.moves
    assert move.src_tier == REMOTE_TIER and move.remote == kept.source
    assert move.src_ids == kept.slots[2:5] and move.dst_ids == (102, 103, 104)
    consumer.apply(WorkerReport({move.move_id: MoveResult(move.move_id)}))
    consumer.apply(WorkerReport({move.move_id: MoveResult(move.move_id, {0: "lost"}, frozenset({0}))}))
    assert not consumer._remote_moves and not consumer.index.open_moves()

    producer.apply(WorkerReport(released={"req-p": 2}))  # both reading ranks done
    assert len(producer.pins) == 0 and all(pool.holds(s) == 0 for s in kept.slots)

    other = consumer.track("req-x", salt=1)  # another salt: other hashes, nothing matches
    assert consumer.match_remote(other, tokens, 0, kept) == 0
    changed = tokens[:3 * BS] + [t + 1 for t in tokens[3 * BS:]]
    assert consumer.match_remote(consumer.track("req-y", salt=0), changed, 0, kept) == 3 * BS
    consumer.take_step()
    consumer.release_remote(kept.source)  # e.g. vLLM's own cache had the blocks: the holder unpins at once
    (release,) = consumer.take_step().cascades
    assert release.remote == kept.source and release.num_blocks == 0 and release.src_tier == REMOTE_TIER
    consumer.apply(WorkerReport({release.move_id: MoveResult(release.move_id, reports=2)}))
    assert not consumer._remote_moves
    single = _leader(1)  # one rank cannot read a two-rank prefill (rank r reads rank r)
    assert single.match_remote(single.track("req-z", salt=0), tokens, 0, kept) == 0


def test_no_params_without_endpoints_or_stored_blocks() -> None:
    leader = _leader(1)
    state = leader.track("r", salt=0)
    assert leader.keep_for_remote(state, list(range(40))) is None  # no exporting workers
    leader.endpoints = (b"e",)
    assert leader.keep_for_remote(state, list(range(40))) is None  # nothing stored


def test_worker_reports_merge_released_counts() -> None:
    a, b = WorkerReport(released={"x": 1}), WorkerReport(released={"x": 1, "y": 1})
    assert a.merged(b).released == {"x": 2, "y": 1}


def test_pin_metrics() -> None:
    from kvbm.metrics import KvbmMetrics

    metrics = KvbmMetrics()
    leader = ConnectorLeader([TierSpec("G2", Medium.HOST, 8)], KvbmConfig(pd_pin_timeout_secs=60.0), BS,
                             metrics=metrics)
    leader.endpoints = (b"e",)
    state = leader.track("r", salt=0)
    state.block_ids = [0, 1]
    tokens = list(range(1, 2 * BS + 1))
    leader.plan_stores(state, tokens, 2)
    (store,) = leader.take_step().stores
    leader.apply(WorkerReport({m.move_id: MoveResult(m.move_id) for m in store.moves}))
    assert leader.keep_for_remote(state, tokens) is not None
    leader.take_step()
    assert "kvbm_remote_pinned_requests 1.0" in metrics.render().decode()
    leader.pins.clock = lambda: float("inf")
    leader.take_step()
    text = metrics.render().decode()
    assert "kvbm_remote_pinned_requests 0.0" in text and "kvbm_remote_pin_timeouts 1" in text
