"""The leader's block index over a generic tier list, the connector leader's result handling, and the layering:
the scheduler side imports neither torch nor the transfer library."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kvbm.config import KvbmConfig
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import WorkerReport
from kvbm.leader import BlockIndex, MoveKind, MoveResult, TierConfig
from kvbm.tiers import kvbm_tiers


class AdmitSecondSighting:
    """Admits a block once seen twice (registration or hit), like KVBM's disk filter at frequency 2."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def admit(self, seq_hash: int) -> bool:
        self.seen[seq_hash] = self.seen.get(seq_hash, 0) + 1
        return self.seen[seq_hash] >= 2

    def record_hit(self, seq_hash: int) -> None:
        self.seen[seq_hash] = self.seen.get(seq_hash, 0) + 1


def complete_all(index: BlockIndex, moves, failed=None, lost=()) -> None:
    for move in moves:
        index.complete(move.move_id, failed or {}, lost)


def test_scheduler_side_imports_no_torch_and_no_transfer_library():
    code = ("import sys; import kvbm.leader, kvbm.tiers, kvbm.policies.admission, kvbm.policies.cost, "
            "kvbm.connectors.leader, kvbm.connectors.messages; "
            "bad = [m for m in ('torch', 'triton', 'numba', 'kvbm.layouts', 'kvbm.kernels.transfers') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_stores_are_invisible_until_committed_and_discarded_on_failure():
    index = BlockIndex([TierConfig("G2", 4)], batch_size=2)
    plan = index.plan_store([11, 12, 13], [5, 6, 7])
    assert [m.num_blocks for m in plan.moves] == [2, 1] and plan.positions[plan.moves[1].move_id] == [2]
    assert all(m.kind is MoveKind.STORE and m.src_tier == "G1" and m.dst_tier == "G2" for m in plan.moves)
    assert index.lookup([11, 12, 13], whole_prompt=False).num_blocks == 0  # pending
    index.complete(plan.moves[0].move_id, {})
    index.complete(plan.moves[1].move_id, {0: "copy failed"})
    assert index.lookup([11, 12, 13], whole_prompt=False).hits == (2,)
    assert index.lookup([11, 12], whole_prompt=True).num_blocks == 1  # the engine computes the last block
    again = index.plan_store([11, 13], [1, 2])
    assert again.skipped == {0: "already stored in G2"} and again.moves[0].hashes == (13,)
    with pytest.raises(KeyError, match="not open"):
        index.complete(plan.moves[0].move_id, {})
    index.check_invariants()


@pytest.mark.parametrize("bad, error", [([1, True], TypeError), ([1, 2**64], ValueError), ([-1], ValueError),
                                        ([1.0], TypeError), (["1"], TypeError)])
def test_hashes_must_be_64_bit_ints(bad, error):
    index = BlockIndex([TierConfig("G2", 4)], batch_size=2)
    with pytest.raises(error, match="seq_hashes"):
        index.lookup(bad, whole_prompt=False)
    with pytest.raises(error, match="seq_hashes"):
        index.plan_load(bad, list(range(len(bad))))
    # numpy's integers are hashes too (taken by value), from any iterable
    assert index.lookup([np.uint64(2**64 - 1), np.int64(5)], whole_prompt=False).num_blocks == 0
    assert index.plan_load((np.int64(h) for h in (5, 6)), [0, 1]).missing.keys() == {0, 1}


def test_loads_hold_their_slots_and_only_lost_blocks_are_dropped():
    index = BlockIndex([TierConfig("G2", 2)], batch_size=4)
    complete_all(index, index.plan_store([1, 2], [0, 1]).moves)
    load = index.plan_load([1, 2, 3], [7, 8, 9])
    assert load.missing == {2: "block is in no tier (never stored, or evicted)"}
    assert index.plan_store([4], [3]).busy == [0]  # both slots held by the load: nothing evictable
    index.check_invariants()
    index.complete(load.moves[0].move_id, {0: "copy raised", 1: "read failed"}, lost={1})
    assert index.lookup([1, 2], whole_prompt=False).num_blocks == 1  # block 2 dropped, block 1 kept
    index.check_invariants()


def test_cascade_over_three_tiers_with_admission():
    admission = AdmitSecondSighting()
    index = BlockIndex([TierConfig("A", 2), TierConfig("B", 4), TierConfig("C", 4, admission)], batch_size=8)
    complete_all(index, index.plan_store([1, 2], [0, 1]).moves)  # A -> B admits every block
    assert index.has_cascades()
    cascades = index.plan_cascades()
    assert [(m.src_tier, m.dst_tier, m.hashes) for m in cascades] == [("A", "B", (1, 2))]
    assert index.plan_store([3, 4], [2, 3]).busy == [0, 1]  # A's blocks are held until copied down
    complete_all(index, cascades)
    assert not index.has_cascades()  # B -> C needs a second sighting
    complete_all(index, index.plan_store([3, 4], [2, 3]).moves)  # evicts 1 and 2 from A
    assert index.lookup([1, 2], whole_prompt=False).hits == (0, 2, 0)  # hits in B: second sightings for C
    down = index.plan_cascades()
    assert [(m.src_tier, m.dst_tier, sorted(m.hashes)) for m in down] == [("A", "B", [3, 4]), ("B", "C", [1, 2])]
    complete_all(index, down)
    load = index.plan_load([1, 3], [5, 6])
    assert sorted((m.src_tier, m.hashes) for m in load.moves) == [("A", (3,)), ("B", (1,))]
    complete_all(index, load.moves)
    index.check_invariants()


def test_lookup_walks_tiers_in_order_and_never_goes_back_up():
    index = BlockIndex([TierConfig("G2", 4), TierConfig("G3", 4)])
    complete_all(index, index.plan_store([1, 3], [0, 1]).moves)
    complete_all(index, index.plan_cascades())
    index.pool("G2").discard(index.pool("G2").lookup(1))
    assert index.lookup([1, 3], whole_prompt=False).hits == (0, 2)  # 1 from G3, then 3 from G3 too


def _holder(index: BlockIndex, h: int, tiers) -> int | None:
    """The first of ``tiers`` (indices) holding ``h`` committed, looked up without side effects."""
    return next((k for k in tiers if (index.pool(index.tier_names[k]).find(h) or (0, False))[1]), None)


def test_lookup_and_load_plans_match_the_block_by_block_rule_on_random_states():
    """Lookups and load plans (runs per tier) against the per-block rule on random tiers: a lookup's run moves to a
    later tier only, a load takes each block from the first tier holding it, in moves of at most ``batch_size``, or
    in one move per tier for a layer-wise load (``whole``)."""
    rng = np.random.default_rng(3)
    for trial in range(60):
        index = BlockIndex([TierConfig(name, 12) for name in ("A", "B", "C")], batch_size=int(rng.integers(1, 5)))
        universe = [int(h) for h in rng.choice(2**62, 24, replace=False)]
        for k, name in enumerate(index.tier_names):  # each tier holds a random subset, some blocks pending
            held = [h for h in universe if rng.random() < 0.5][:12]
            pool = index.pool(name)
            for h in held:
                slot = pool.allocate(h).slot
                if rng.random() < 0.85:
                    pool.commit(slot)
        hashes = [universe[i] for i in rng.integers(0, len(universe), int(rng.integers(0, 16)))]
        hashes = list(dict.fromkeys(hashes))  # a prompt's block hashes are distinct
        expected_hits, k = [0, 0, 0], 0
        for h in hashes:
            k = _holder(index, h, range(k, 3))
            if k is None:
                break
            expected_hits[k] += 1
        assert index.lookup(hashes, whole_prompt=False).hits == tuple(expected_hits), trial
        engine_ids = [1000 + i for i in range(len(hashes))]
        holders = [_holder(index, h, range(3)) for h in hashes]
        whole = trial % 2 == 1
        plan = index.plan_load(hashes, engine_ids, whole=whole)
        assert sorted(plan.missing) == [i for i, k in enumerate(holders) if k is None]
        for k, name in enumerate(index.tier_names):
            mine = [i for i, t in enumerate(holders) if t == k]
            moves = [m for m in plan.moves if m.src_tier == name]
            assert [i for m in moves for i in plan.positions[m.move_id]] == mine
            assert all(0 < m.num_blocks <= index.batch_size for m in moves) or whole
            assert len(moves) == (1 if mine else 0) or not whole
            for m in moves:
                positions = plan.positions[m.move_id]
                assert m.hashes == tuple(hashes[i] for i in positions)
                assert m.dst_ids == tuple(engine_ids[i] for i in positions)
                assert m.src_ids == tuple(index.pool(name).find(hashes[i])[0] for i in positions)
                assert all(index.pool(name).holds(slot) == 1 for slot in m.src_ids)
        index.check_invariants()
        complete_all(index, plan.moves)
        index.check_invariants()
        assert all(index.pool(name).holds(slot) == 0 for name in index.tier_names for slot in range(12))


def test_connector_leader_completes_a_move_once_every_worker_reported():
    config = KvbmConfig(cpu_cache_override_num_blocks=8, max_transfer_batch_size=4)
    leader = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4, num_workers=2)
    state = leader.track("r", salt=0)
    state.block_ids = [10, 11]
    leader.plan_stores(state, list(range(8)), 2)
    plan = leader.take_step()
    move = plan.stores[0].moves[0]
    assert leader.busy("r")
    leader.apply(WorkerReport({move.move_id: MoveResult(move.move_id, {}, seconds=0.1)}))
    assert leader.busy("r") and leader.index.lookup(move.hashes, whole_prompt=False).num_blocks == 0
    leader.apply(WorkerReport({move.move_id: MoveResult(move.move_id, {1: "rank 1 failed", }, seconds=0.2)}))
    assert not leader.busy("r")
    assert leader.index.lookup(move.hashes, whole_prompt=False).num_blocks == 1  # failed on a rank: not stored
    merged = WorkerReport({1: MoveResult(1, {0: "a"}, frozenset({0}))}).merged(WorkerReport({1: MoveResult(1, {})}))
    assert merged.results[1].reports == 2 and merged.results[1].lost == frozenset({0})
