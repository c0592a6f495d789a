"""The store backlog rule: stores from the engine into the first tier queue at most ``max_seconds`` of writes at the
tier's learned rate; blocks beyond are not stored and counted, never planned half-way; blocks the cost rule would not
load back take one batch once per keep-alive interval, only while nothing is queued."""
from __future__ import annotations

import random
import time

import pytest

from kvbm.config import KvbmConfig, KvbmConfigError
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import WorkerReport
from kvbm.leader import BlockIndex, MoveResult, TierConfig
from kvbm.metrics import KvbmMetrics
from kvbm.policies.store_backlog import RATE_WEIGHT, StoreBacklog
from kvbm.tiers import kvbm_tiers


def test_no_limit_until_a_store_is_timed_then_rate_times_budget_minus_queue():
    b = StoreBacklog(0.5, batch_size=4)
    assert b.room("G3") is None
    b.started(1, "G3", 16)
    assert b.room("G3") is None and b.pending("G3") == 16
    b.finished(1, 0.4)  # 40 blocks/s
    assert b.rate("G3") == pytest.approx(40.0) and b.pending("G3") == 0
    assert b.room("G3") == 20  # 40 blocks/s x 0.5 s, nothing queued
    b.started(2, "G3", 15)
    assert b.room("G3") == 5
    b.started(3, "G3", 10)
    assert b.room("G3") == 0  # over budget: nothing, not negative
    b.finished(2, 0.1)  # 150 blocks/s, blended into the running rate
    assert b.rate("G3") == pytest.approx((1 - RATE_WEIGHT) * 40 + RATE_WEIGHT * 150)
    assert b.room("G2") is None  # tiers are separate


def test_a_slow_tier_with_nothing_queued_still_takes_one_batch():
    b = StoreBacklog(0.2, batch_size=4)
    b.started(1, "G3", 2)
    b.finished(1, 10.0)  # 0.2 blocks/s: the budget holds no whole block
    assert b.room("G3") == 4
    b.started(2, "G3", 4)
    assert b.room("G3") == 0


def test_untimed_results_and_unknown_moves_change_no_rate():
    b = StoreBacklog(1.0, batch_size=1)
    b.started(1, "G3", 8)
    b.finished(1, None)
    b.finished(99, 0.5)
    assert b.rate("G3") is None and b.pending("G3") == 0


def test_zero_turns_the_rule_off_and_bad_arguments_are_refused():
    b = StoreBacklog(0.0, batch_size=1)
    b.started(1, "G3", 8)
    b.finished(1, 100.0)
    assert b.room("G3") is None
    with pytest.raises(ValueError):
        StoreBacklog(-1.0, batch_size=1)
    with pytest.raises(ValueError):
        StoreBacklog(1.0, batch_size=0)
    with pytest.raises(KvbmConfigError, match="DYN_KVBM_MAX_STORE_BACKLOG_MS"):
        KvbmConfig.from_env({"DYN_KVBM_MAX_STORE_BACKLOG_MS": "-5"})
    assert KvbmConfig.from_env({"DYN_KVBM_MAX_STORE_BACKLOG_MS": "50"}).max_store_backlog_ms == 50.0


def test_blocks_not_worth_loading_take_one_batch_per_keep_alive_interval_while_nothing_is_queued():
    now = [100.0]
    b = StoreBacklog(0.5, batch_size=4, keep_alive_seconds=30.0, clock=lambda: now[0])
    assert b.room("G3", worth_loading=False) == 4  # unmeasured, nothing queued, none such stored yet
    b.started(1, "G3", 4, worth_loading=False)
    assert b.room("G3", worth_loading=False) == 0 and b.room("G3") is None
    b.finished(1, 0.01)  # 400 blocks/s
    assert b.room("G3", worth_loading=False) == 0 and b.room("G3") == 200  # nothing queued, but too soon
    now[0] += 29.9
    assert b.room("G3", worth_loading=False) == 0
    b.started(2, "G3", 8)  # a store worth loading neither waits for the interval nor restarts it
    now[0] += 0.1
    assert b.room("G3", worth_loading=False) == 0  # (queued)
    b.finished(2, 0.02)
    assert b.room("G3", worth_loading=False) == 4
    never = StoreBacklog(0.5, batch_size=4)  # no keep-alive (the rule never probes): none such at all
    assert never.room("G3", worth_loading=False) == 0 and never.room("G3") is None
    unbounded = StoreBacklog(0.0, batch_size=4, keep_alive_seconds=30.0)  # no bound configured: none here either
    unbounded.started(1, "G3", 50)
    assert unbounded.room("G3", worth_loading=False) is None and not unbounded.bounds and b.bounds
    with pytest.raises(ValueError, match="keep_alive_seconds"):
        StoreBacklog(0.5, batch_size=4, keep_alive_seconds=-1.0)


def test_leader_stores_blocks_the_cost_rule_would_not_load_one_batch_per_probe_interval():
    """Disk-only tier with the cost rule on: while it expects a load from the disk to be slower than recomputing
    the request's whole prompt, a store takes one batch, then none while it is queued nor until the rule's probe
    interval has passed since (the rest counted as dropped); once loads pay off, stores take the backlog's room
    again."""
    probe_s = 0.2
    config = KvbmConfig(disk_cache_override_num_blocks=256, max_transfer_batch_size=4, max_store_backlog_ms=100,
                        disable_disk_offload_filter=True, cost_probe_secs=probe_s)
    leader = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4, block_bytes=4096)
    cost = leader.cost
    assert cost is not None and "G3" in cost.tiers
    rng = random.Random(9)

    def store(rid: str, n: int):
        state = leader.track(rid, salt=0)
        state.block_ids = rng.sample(range(1000), n)
        leader.plan_stores(state, [rng.randrange(32000) for _ in range(4 * n)], n)
        return [m for s in leader.take_step().stores for m in s.moves]

    for _ in range(8):  # 1 MB/s from the disk (4 ms a block) against 400k tokens/s of prefill (10 us a block)
        cost.observe_load("G3", num_bytes=4096 * 16, seconds=16 * 4096 / 1e6 + cost.latency("G3"))
        cost.observe_prefill(4000, 0.01)
        cost.observe_prefill(8000, 0.02)
    assert not cost.pays_off("G3", 30)
    before = time.monotonic()
    first = store("a", 30)
    after = time.monotonic()  # the batch's store was planned between these two
    assert sum(m.num_blocks for m in first) == 4
    assert store("b", 30) == []  # one batch queued: nothing more
    leader.apply(WorkerReport({m.move_id: MoveResult(m.move_id, {}, seconds=0.001) for m in first}))
    dropped = 26 + 30
    if time.monotonic() - before < probe_s:
        assert store("c", 30) == []  # nothing queued, but within the probe interval
        dropped += 30
    time.sleep(max(0.0, probe_s - (time.monotonic() - after)) + 0.01)
    assert sum(m.num_blocks for m in store("c2", 30)) == 4
    assert leader.backlog.total_dropped("G3") == dropped + 26
    for _ in range(40):  # the disk now reads at 10 GB/s
        cost.observe_load("G3", num_bytes=4096 * 1000, seconds=4096 * 1000 / 10e9 + cost.latency("G3"))
    assert cost.pays_off("G3", 30)
    pending = leader.backlog.pending("G3")
    room = int(leader.backlog.rate("G3") * 0.1) - pending
    assert sum(m.num_blocks for m in store("d", 30)) == min(30, room)


def test_index_stops_allocating_after_max_blocks():
    index = BlockIndex([TierConfig("G3", 16)], batch_size=4)
    plan = index.plan_store([1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15], max_blocks=3)
    assert [m.hashes for m in plan.moves] == [(1, 2, 3)] and plan.over_limit == [3, 4, 5]
    index.complete(plan.moves[0].move_id, {})
    assert index.lookup([1, 2, 3, 4], whole_prompt=False).num_blocks == 3
    again = index.plan_store([3, 4, 5], [12, 13, 14], max_blocks=1)  # stored ones are skipped, not counted
    assert again.skipped == {0: "already stored in G3"} and again.moves[0].hashes == (4,) and again.over_limit == [2]
    index.check_invariants()


def test_leader_drops_stores_past_a_slow_tiers_queue_and_counts_them():
    """Disk-only tier writing 100 blocks/s with a 100 ms budget: after the first timed store, a request's store
    takes 10 blocks while nothing is queued and nothing while they are; dropped blocks are counted per tier and
    the stored blocks are found afterwards."""
    config = KvbmConfig(disk_cache_override_num_blocks=256, max_transfer_batch_size=4, max_store_backlog_ms=100,
                        disable_disk_offload_filter=True)
    metrics = KvbmMetrics()
    leader = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4, metrics=metrics)
    rng = random.Random(7)

    def store(rid: str, n: int):
        state = leader.track(rid, salt=0)
        state.block_ids = rng.sample(range(1000), n)
        tokens = [rng.randrange(32000) for _ in range(4 * n)]
        leader.plan_stores(state, tokens, n)
        return [m for s in leader.take_step().stores for m in s.moves], state

    first, _ = store("a", 8)  # unmeasured: everything
    assert sum(m.num_blocks for m in first) == 8
    leader.apply(WorkerReport({m.move_id: MoveResult(m.move_id, {}, seconds=m.num_blocks / 100) for m in first}))
    assert leader.backlog.rate("G3") == pytest.approx(100.0)
    second, state_b = store("b", 30)
    assert sum(m.num_blocks for m in second) == 10
    third, _ = store("c", 5)
    assert third == []  # 10 blocks queued fill the 100 ms
    assert leader.backlog.total_dropped("G3") == 25
    assert metrics._totals.get("kvbm_store_dropped_blocks", ("G3",)) == 25
    leader.apply(WorkerReport({m.move_id: MoveResult(m.move_id, {}, seconds=m.num_blocks / 100) for m in second}))
    stored = [h for m in second for h in m.hashes]
    assert leader.index.lookup(stored, whole_prompt=False).num_blocks == 10  # the first ten of b, a prefix run
    assert tuple(stored) == tuple(state_b.hashes[:10])
    fourth, _ = store("d", 12)
    assert sum(m.num_blocks for m in fourth) == 10


def test_a_host_first_tier_is_never_bounded():
    """Stores into pinned host memory take milliseconds: however slow its stores were timed, nothing is dropped."""
    config = KvbmConfig(cpu_cache_override_num_blocks=256, max_transfer_batch_size=4, max_store_backlog_ms=100)
    leader = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4)
    rng = random.Random(8)
    for k in range(3):
        state = leader.track(f"r{k}", salt=0)
        state.block_ids = rng.sample(range(1000), 20)
        leader.plan_stores(state, [rng.randrange(32000) for _ in range(80)], 20)
        moves = [m for s in leader.take_step().stores for m in s.moves]
        assert sum(m.num_blocks for m in moves) == 20
        leader.apply(WorkerReport({m.move_id: MoveResult(m.move_id, {}, seconds=5.0) for m in moves[:1]}))
    assert leader.backlog.total_dropped("G2") == 0
