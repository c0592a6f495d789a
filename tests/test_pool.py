"""BlockPool: unit tests, corruption detection, a randomized run against a simple model (single-block calls and
the run calls a prefix lookup and a load use), and eviction cost."""
from __future__ import annotations

import random
import time

import pytest

from kvbm.leader.pool import COMMITTED, PENDING, BlockPool, PoolInvariantError


def filled(pool: BlockPool, hashes: list[int], priority: int = 0) -> list[int]:
    """Allocate and commit each hash; return the slots."""
    slots = []
    for h in hashes:
        alloc = pool.allocate(h, priority)
        assert alloc is not None and alloc.evicted is None
        pool.commit(alloc.slot)
        slots.append(alloc.slot)
    return slots


def test_allocate_commit_lookup() -> None:
    pool = BlockPool(4, "G2")
    assert pool.num_free() == 4
    alloc = pool.allocate(0xABC)
    assert alloc == (0, None)
    assert pool.contains(0xABC) and pool.lookup(0xABC) is None  # pending: known but invisible
    assert pool.hash_of(0) == 0xABC and pool.num_free() == 3 and pool.num_evictable() == 0
    pool.commit(0)
    assert pool.lookup(0xABC) == 0 and pool.num_evictable() == 1
    assert pool.lookup(0xDEF) is None and not pool.contains(0xDEF)
    pool.check_invariants()


def test_eviction_lowest_priority_then_lru() -> None:
    pool = BlockPool(5, "G2")
    filled(pool, [10, 11], priority=50)
    filled(pool, [20, 21], priority=0)
    filled(pool, [30], priority=90)
    pool.lookup(20)  # 21 is now the least recently used of priority 0
    order = []
    for new in range(100, 105):
        alloc = pool.allocate(new, priority=100)
        order.append(alloc.evicted)
        pool.commit(alloc.slot)
        pool.check_invariants()
    assert order == [21, 20, 10, 11, 30]
    assert not any(pool.contains(h) for h in (10, 11, 20, 21, 30))


def test_held_and_pending_blocks_are_not_evicted() -> None:
    pool = BlockPool(3, "G3")
    a, b = filled(pool, [1, 2])
    pending = pool.allocate(3)
    pool.hold(a)
    pool.hold(a)
    alloc = pool.allocate(4)
    assert alloc.evicted == 2 and alloc.slot == b  # only the unheld committed block can go
    assert pool.allocate(5) is None  # a held twice, b and the third slot pending: nothing to evict
    pool.release(a)
    assert pool.allocate(5) is None  # still one hold
    pool.release(a)
    assert pool.allocate(5) == (a, 1)
    assert pool.hash_of(pending.slot) == 3
    pool.check_invariants()


def test_lookup_hold_is_a_lookup_then_a_hold() -> None:
    pool = BlockPool(3, "G2")
    a, b = filled(pool, [1, 2])
    pending = pool.allocate(3)
    assert pool.lookup_hold(3) is None and pool.lookup_hold(9) is None  # pending, absent: nothing held
    assert pool.lookup_hold(1) == a and pool.lookup_hold(1) == a
    assert pool.allocate(4).evicted == 2  # a is held (twice): b goes
    pool.release(a)
    assert pool.allocate(5) is None  # still held once; the third slot pending
    pool.release(a)
    assert pool.allocate(5) == (a, 1)
    assert pool.hash_of(pending.slot) == 3
    pool.check_invariants()


def test_release_makes_block_most_recently_used() -> None:
    pool = BlockPool(2, "G2")
    a, b = filled(pool, [1, 2])
    pool.hold(a)
    pool.release(a)  # a was read: it is now more recent than b
    assert pool.allocate(3).evicted == 2


def test_discard_pending_and_committed() -> None:
    pool = BlockPool(2, "G2")
    alloc = pool.allocate(7)
    pool.discard(alloc.slot)
    assert not pool.contains(7) and pool.num_free() == 2 and pool.hash_of(alloc.slot) is None
    (slot,) = filled(pool, [8])
    pool.hold(slot)
    with pytest.raises(ValueError, match=r"G2: cannot discard slot \d: it has 1 hold\(s\); release first"):
        pool.discard(slot)
    pool.release(slot)
    pool.discard(slot)
    assert pool.lookup(8) is None and pool.num_free() == 2 and pool.num_evictable() == 0
    pool.check_invariants()
    # The hash may come back later.
    assert pool.allocate(8) is not None


@pytest.mark.parametrize("action, setup, exc, match", [
    ("commit", "free", ValueError, r"G2: cannot commit slot 0: it is free, expected pending"),
    ("commit", "committed", ValueError, r"cannot commit slot 0: it is committed, expected pending"),
    ("hold", "pending", ValueError, r"cannot hold slot 0: it is pending, expected committed"),
    ("release", "committed", ValueError, r"cannot release slot 0: it is not held"),
    ("release", "free", ValueError, r"cannot release slot 0: it is free"),
    ("discard", "free", ValueError, r"cannot discard slot 0: it is free"),
])
def test_illegal_transitions(action: str, setup: str, exc: type, match: str) -> None:
    pool = BlockPool(2, "G2")
    if setup in ("pending", "committed"):
        pool.allocate(99)
    if setup == "committed":
        pool.commit(0)
    with pytest.raises(exc, match=match):
        getattr(pool, action)(0)
    pool.check_invariants()


def test_bad_arguments() -> None:
    pool = BlockPool(2, "G3")
    filled(pool, [5])
    with pytest.raises(ValueError, match=r"G3: hash 0x5 is already in slot 0 \(committed\)"):
        pool.allocate(5)
    with pytest.raises(IndexError, match=r"G3: slot 2 out of range for a pool of 2 blocks"):
        pool.hold(2)
    with pytest.raises(IndexError, match=r"slot -1 out of range"):
        pool.hash_of(-1)
    with pytest.raises(TypeError, match=r"slot must be an int, got float"):
        pool.commit(0.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"seq_hash must be an int, got str"):
        pool.allocate("5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"priority must be an int, got float"):
        pool.allocate(6, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_blocks must be positive, got 0"):
        BlockPool(0, "G2")
    with pytest.raises(TypeError, match=r"num_blocks must be an integer"):
        BlockPool(2.0, "G2")  # type: ignore[arg-type]
    for bad_start in (-1, 2, 0.5):  # a run starts inside the hashes given
        for run in (pool.lookup_run, pool.hold_run):
            with pytest.raises(ValueError, match="start must be an int in"):
                run([5], bad_start)
    pool.hold(0)
    for slots, error, match in (([0, -1], IndexError, "slot -1 out of range"), ([0, 1.5], TypeError, "got float"),
                                ([0, 0], ValueError, r"cannot release slot 0 2 time\(s\): it has 1 hold")):
        with pytest.raises(error, match=match):
            pool.release_all(slots)
        assert pool.holds(0) == 1  # nothing released
    pool.check_invariants()


@pytest.mark.parametrize("corrupt, match", [
    (lambda p: p._free.append(0), r"free list holds a slot twice|free list holds slot 0, which is committed"),
    (lambda p: p._free.append(1), r"free list holds slot 1, which is committed"),
    (lambda p: p._hash.__setitem__(1, p._hash[0]), r"hash 0x64 is owned by slots 0 and 1"),
    (lambda p: p._holds.__setitem__(0, -1), r"slot 0 has a negative hold count -1"),
    (lambda p: p._free.remove(2), r"free slot 2 is missing from the free list"),
    (lambda p: p._slot_of.__setitem__(12345, 2), r"hash map has 3 entries for 2 used slots \(stale: \[12345\]\)"),
    (lambda p: p._holds.__setitem__(0, 1), r"slot 0 \(committed, 1 holds\) is wrongly in the eviction order"),
    (lambda p: p._priority.__setitem__(1, 7), r"slot 1 of priority 7 is filed under priority 0"),
])
def test_check_invariants_detects_corruption(corrupt, match) -> None:
    pool = BlockPool(4, "G2")
    filled(pool, [100, 101])
    pool.check_invariants()
    corrupt(pool)
    with pytest.raises(PoolInvariantError, match=match):
        pool.check_invariants()


class Model:
    """The pool's contract in the plainest terms: a dict per slot, eviction by min (priority, last use)."""

    def __init__(self, n: int) -> None:
        self.slots: dict[int, dict] = {}  # used slots only
        self.n = n
        self.tick = 0

    def touch(self, slot: int) -> None:
        self.tick += 1
        self.slots[slot]["last"] = self.tick

    def slot_of(self, h: int) -> int | None:
        return next((s for s, v in self.slots.items() if v["hash"] == h), None)

    def victim(self) -> int | None:
        cands = [(v["prio"], v["last"], s) for s, v in self.slots.items() if v["state"] == COMMITTED and not v["holds"]]
        return min(cands)[2] if cands else None


def test_randomized_against_model() -> None:
    for seed in range(4):
        rng = random.Random(seed)
        n = rng.choice([1, 3, 16, 40])
        pool, model = BlockPool(n, "G2"), Model(n)
        hashes = [rng.randrange(2**64) for _ in range(3 * n + 4)]
        for step in range(1500):
            op = rng.random()
            h = rng.choice(hashes)
            used = list(model.slots)
            if op < 0.30:  # allocate
                if model.slot_of(h) is not None:
                    with pytest.raises(ValueError, match="already in slot"):
                        pool.allocate(h, rng.randrange(3))
                else:
                    prio = rng.randrange(3)
                    alloc = pool.allocate(h, prio)
                    if len(model.slots) < n:
                        assert alloc is not None and alloc.evicted is None and alloc.slot not in model.slots
                    else:
                        victim = model.victim()
                        if victim is None:
                            assert alloc is None
                        else:
                            assert alloc == (victim, model.slots[victim]["hash"])
                            del model.slots[victim]
                    if alloc is not None:
                        model.slots[alloc.slot] = {"hash": h, "state": PENDING, "holds": 0, "prio": prio, "last": 0}
            elif op < 0.45 and used:  # commit, or a wrong commit
                s = rng.choice(used)
                if model.slots[s]["state"] == PENDING:
                    pool.commit(s)
                    model.slots[s]["state"] = COMMITTED
                    model.touch(s)
                else:
                    with pytest.raises(ValueError, match="expected pending"):
                        pool.commit(s)
            elif op < 0.55 and used:  # discard
                s = rng.choice(used)
                v = model.slots[s]
                if v["holds"]:
                    with pytest.raises(ValueError, match="release first"):
                        pool.discard(s)
                else:
                    pool.discard(s)
                    del model.slots[s]
            elif op < 0.68 and used:  # hold
                s = rng.choice(used)
                if model.slots[s]["state"] == COMMITTED:
                    pool.hold(s)
                    model.slots[s]["holds"] += 1
                else:
                    with pytest.raises(ValueError, match="expected committed"):
                        pool.hold(s)
            elif op < 0.80 and used:  # release
                s = rng.choice(used)
                v = model.slots[s]
                if v["holds"]:
                    pool.release(s)
                    v["holds"] -= 1
                    if not v["holds"]:
                        model.touch(s)
                else:
                    with pytest.raises(ValueError):
                        pool.release(s)
            elif op < 0.86:  # lookup
                s = model.slot_of(h)
                expected = s if s is not None and model.slots[s]["state"] == COMMITTED else None
                assert pool.lookup(h) == expected
                if expected is not None:
                    model.touch(expected)
            elif op < 0.96:  # a run looked up, or looked up and held (a prefix lookup, a load)
                run = [rng.choice(hashes) for _ in range(rng.randrange(6))]
                start = rng.randrange(len(run) + 1)
                expected = []
                for x in run[start:]:
                    s = model.slot_of(x)
                    if s is None or model.slots[s]["state"] != COMMITTED:
                        break
                    expected.append(s)
                hold = op >= 0.91
                assert (pool.hold_run if hold else pool.lookup_run)(run, start) == expected
                for s in expected:
                    model.touch(s)
                    model.slots[s]["holds"] += hold
            elif used:  # release several (a move's slots; all or nothing)
                slots = [rng.choice(used) for _ in range(rng.randrange(1, 4))]
                valid = all(model.slots[s]["state"] == COMMITTED and model.slots[s]["holds"] >= slots.count(s)
                            for s in slots)
                if valid:
                    pool.release_all(slots)
                    for s in slots:
                        model.slots[s]["holds"] -= 1
                        if not model.slots[s]["holds"]:
                            model.touch(s)
                else:
                    with pytest.raises(ValueError, match="cannot release"):
                        pool.release_all(slots)
            pool.check_invariants()
            assert pool.num_free() == n - len(model.slots)
            assert pool.num_evictable() == sum(
                1 for v in model.slots.values() if v["state"] == COMMITTED and not v["holds"])
            for s in range(n):
                v = model.slots.get(s)
                assert pool.hash_of(s) == (v["hash"] if v else None), (seed, step, s)
                assert pool.holds(s) == (v["holds"] if v else 0)
            for x in hashes:
                assert pool.contains(x) == (model.slot_of(x) is not None)


def test_eviction_cost_does_not_grow_with_pool_size() -> None:
    """50k evicting allocations in a 200k-block pool with mixed priorities: O(1) each, so well under a second
    (an O(n) scan per eviction would take minutes)."""
    n = 200_000
    pool = BlockPool(n, "G2")
    rng = random.Random(0)
    for h in range(n):
        pool.commit(pool.allocate(h, rng.randrange(4)).slot)
    t0 = time.perf_counter()
    for h in range(n, n + 50_000):
        alloc = pool.allocate(h, rng.randrange(4))
        pool.commit(alloc.slot)
        pool.lookup(h - n // 2)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"{elapsed:.2f} s for 50k evictions"
    pool.check_invariants()
