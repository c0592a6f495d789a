"""Slot allocator of one offload tier (G2 host or G3 disk): which sequence hash lives in which block slot.

A ``BlockPool`` knows nothing of bytes; the tier's storage is indexed by the slot numbers it hands out. Each slot
is FREE, PENDING (allocated, its bytes being written) or COMMITTED (bytes valid, visible to ``lookup``).
Committed blocks carry a hold count: a held block is being read (onboarded to G1, cascaded to G3) and can be
neither evicted nor discarded. Pending blocks are invisible and never evicted.

Life of a block, as the manager drives it::

    alloc = pool.allocate(seq_hash, priority)   # None: every slot pending or held, try later / skip
    if alloc.evicted is not None: registry.forget(alloc.evicted, tier)
    ... write the block's bytes into slot alloc.slot ...
    pool.commit(alloc.slot)       # on success: now found by lookup, evictable
    pool.discard(alloc.slot)      # on failure: slot freed, hash forgotten

    slot = pool.lookup(seq_hash)  # committed only; marks it most recently used
    pool.hold(slot); ... read ...; pool.release(slot)

Eviction takes the inactive (committed, unheld) block of lowest priority, least recently used first, in O(1)
(one insertion-ordered dict per priority, plus a sorted list of the priorities present; that list is as short
as the number of distinct priorities in use, e.g. at most 101 for KVBM's 0..100). Every operation is O(1) per
block apart from ``check_invariants`` (O(n), for tests); the run calls (``lookup_run``, ``hold_run``,
``release_all``) do a prompt's or a move's blocks in one loop. Not thread-safe: the manager calls it from one
thread.
"""
from __future__ import annotations

import bisect
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import NamedTuple, Protocol

__all__ = ["BlockPool", "Allocation", "PoolInvariantError", "PoolWatcher", "FREE", "PENDING", "COMMITTED"]

FREE, PENDING, COMMITTED = 0, 1, 2
_STATE_NAMES = ("free", "pending", "committed")


class PoolInvariantError(RuntimeError):
    """The pool's bookkeeping is inconsistent (a bug in the pool or in how it is driven)."""


class PoolWatcher(Protocol):
    """Told which blocks a pool holds committed (``BlockPool.watcher``; e.g. the shared G4 tier's directory)."""

    def committed(self, seq_hash: int, slot: int) -> None:
        """``seq_hash`` is committed in ``slot``."""

    def dropped(self, seq_hash: int, slot: int) -> None:
        """The committed ``seq_hash`` left ``slot`` (evicted or discarded)."""


class Allocation(NamedTuple):
    """A slot handed out by ``BlockPool.allocate``; ``evicted`` is the hash the slot held before, if any."""

    slot: int
    evicted: int | None


class BlockPool:
    """Slots of one tier: hash -> slot map, free list, holds, priorities and LRU order (see module docstring)."""

    def __init__(self, num_blocks: int, name: str) -> None:
        """A pool of ``num_blocks`` free slots numbered 0..num_blocks-1; ``name`` (e.g. "G2") labels errors."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
            raise TypeError(f"num_blocks must be an integer, got {type(num_blocks).__name__} {num_blocks!r}")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.name = str(name)
        self.num_blocks = num_blocks
        self._state = [FREE] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._holds = [0] * num_blocks
        self._priority = [0] * num_blocks
        self._last_use = [0] * num_blocks
        self._tick = 0
        self._slot_of: dict[int, int] = {}
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack; slot 0 is handed out first
        # Inactive (committed, unheld) slots: priority -> {slot: None} in least-recently-used-first order, and the
        # sorted priorities whose dict is non-empty. OrderedDict, not dict: popping a plain dict's oldest entry
        # scans over the holes earlier deletions left at its front, which is not O(1).
        self._inactive: dict[int, OrderedDict[int, None]] = {}
        self._priorities: list[int] = []
        self.watcher: PoolWatcher | None = None  #: told of every commit, eviction and discard of a committed block

    # -- queries ---------------------------------------------------------------------------------------------

    def lookup(self, seq_hash: int) -> int | None:
        """Slot of a committed block, marked most recently used; None when absent or still pending."""
        slot = self._used(seq_hash)
        if slot is not None and self._holds[slot] == 0:
            self._inactive[self._priority[slot]].move_to_end(slot)
        return slot

    def lookup_hold(self, seq_hash: int) -> int | None:
        """``lookup`` and ``hold`` in one step (a load of the block): the slot of a committed block, held until
        released; None when absent or still pending."""
        slot = self._used(seq_hash)
        if slot is not None:
            if self._holds[slot] == 0:
                self._deactivate(slot)
            self._holds[slot] += 1
        return slot

    def lookup_run(self, seq_hashes: Sequence[int], start: int = 0) -> list[int]:
        """Slots of ``seq_hashes[start:]`` up to the first that is absent or pending, each marked most recently
        used, in order (``lookup`` of each: a prefix lookup over a long prompt in one loop)."""
        return self._run(seq_hashes, start, hold=False)

    def hold_run(self, seq_hashes: Sequence[int], start: int = 0) -> list[int]:
        """``lookup_run`` that also holds each slot it returns (``lookup_hold`` of each: a load's blocks)."""
        return self._run(seq_hashes, start, hold=True)

    def _run(self, seq_hashes: Sequence[int], start: int, hold: bool) -> list[int]:
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(seq_hashes):
            raise ValueError(f"{self.name}: start must be an int in [0, {len(seq_hashes)}], got {start!r}")
        slot_of, state, holds, last_use = self._slot_of.get, self._state, self._holds, self._last_use
        inactive, priority = self._inactive, self._priority
        slots: list[int] = []
        tick = self._tick
        for i in range(start, len(seq_hashes)):
            slot = slot_of(seq_hashes[i])
            if slot is None or state[slot] != COMMITTED:
                break
            tick += 1
            last_use[slot] = tick
            if not hold:
                if holds[slot] == 0:
                    inactive[priority[slot]].move_to_end(slot)
            else:
                if holds[slot] == 0:  # out of the eviction order (`_deactivate`, its common case inline)
                    bucket = inactive[priority[slot]]
                    del bucket[slot]
                    if not bucket:
                        self._drop_priority(priority[slot])
                holds[slot] += 1
            slots.append(slot)
        self._tick = tick
        return slots

    def release_all(self, slots: Sequence[int]) -> None:
        """``release`` each of ``slots`` (a load's blocks), all checked first: nothing is released when one is not a
        committed slot holding as many holds as it is listed."""
        holds, state, num_blocks = self._holds, self._state, self.num_blocks
        for slot, n in Counter(slots).items():
            if type(slot) is not int or not 0 <= slot < num_blocks or state[slot] != COMMITTED or holds[slot] < n:
                self._expect(slot, COMMITTED, "release")
                raise ValueError(f"{self.name}: cannot release slot {slot} {n} time(s): it has {holds[slot]} hold(s)")
        inactive, priority, last_use, tick = self._inactive, self._priority, self._last_use, self._tick
        for slot in slots:
            holds[slot] -= 1
            if holds[slot] == 0:  # filed as most recently used (`_make_inactive`, inline)
                tick += 1
                last_use[slot] = tick
                bucket = inactive.get(priority[slot])
                if bucket is None:
                    bucket = self._add_priority(priority[slot])
                bucket[slot] = None
        self._tick = tick

    def _used(self, seq_hash: int) -> int | None:
        """Slot of a committed block, its last use now; None when absent or still pending."""
        slot = self._slot_of.get(seq_hash)
        if slot is None or self._state[slot] != COMMITTED:
            return None
        self._tick += 1
        self._last_use[slot] = self._tick
        return slot

    def contains(self, seq_hash: int) -> bool:
        """True when the pool holds ``seq_hash``, committed or pending (so it must not be allocated again)."""
        return seq_hash in self._slot_of

    def find(self, seq_hash: int) -> tuple[int, bool] | None:
        """``(slot, committed)`` of ``seq_hash`` (pending or committed), or None; does not count as a use."""
        slot = self._slot_of.get(seq_hash)
        return None if slot is None else (slot, self._state[slot] == COMMITTED)

    def num_free(self) -> int:
        """Slots never used or freed; evictable blocks are not counted (see ``num_evictable``)."""
        return len(self._free)

    def num_evictable(self) -> int:
        """Committed, unheld blocks that ``allocate`` may evict."""
        return sum(len(d) for d in self._inactive.values())

    def hash_of(self, slot: int) -> int | None:
        """Sequence hash stored in ``slot`` (pending or committed), or None when the slot is free."""
        return self._hash[self._check_slot(slot)]

    def holds(self, slot: int) -> int:
        """Number of outstanding holds on ``slot``."""
        return self._holds[self._check_slot(slot)]

    # -- state changes ---------------------------------------------------------------------------------------

    def allocate(self, seq_hash: int, priority: int = 0) -> Allocation | None:
        """A PENDING slot for ``seq_hash``: a free slot, else the evicted inactive block of lowest priority and
        least recent use. None when every slot is pending or held. ``seq_hash`` must not be in the pool."""
        if isinstance(seq_hash, bool) or not isinstance(seq_hash, int):
            raise TypeError(f"seq_hash must be an int, got {type(seq_hash).__name__} {seq_hash!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {type(priority).__name__} {priority!r}")
        if seq_hash in self._slot_of:
            slot = self._slot_of[seq_hash]
            raise ValueError(
                f"{self.name}: hash {seq_hash:#x} is already in slot {slot} ({_STATE_NAMES[self._state[slot]]})"
            )
        evicted = None
        if self._free:
            slot = self._free.pop()
        elif self._priorities:
            slot = next(iter(self._inactive[self._priorities[0]]))
            self._deactivate(slot)
            evicted = self._hash[slot]
            del self._slot_of[evicted]
            if self.watcher is not None:
                self.watcher.dropped(evicted, slot)
        else:
            return None
        self._state[slot] = PENDING
        self._hash[slot] = seq_hash
        self._priority[slot] = priority
        self._slot_of[seq_hash] = slot
        return Allocation(slot, evicted)

    def commit(self, slot: int) -> None:
        """Mark a PENDING slot's bytes valid: the block becomes visible to lookup and, unheld, evictable."""
        self._expect(slot, PENDING, "commit")
        self._state[slot] = COMMITTED
        self._make_inactive(slot)
        if self.watcher is not None:
            self.watcher.committed(self._hash[slot], slot)

    def discard(self, slot: int) -> None:
        """Free a PENDING slot whose write failed, or an unheld COMMITTED one whose bytes are known bad;
        its hash is forgotten."""
        self._check_slot(slot)
        state = self._state[slot]
        if state == FREE:
            raise ValueError(f"{self.name}: cannot discard slot {slot}: it is free")
        if state == COMMITTED:
            if self._holds[slot]:
                raise ValueError(
                    f"{self.name}: cannot discard slot {slot}: it has {self._holds[slot]} hold(s); release first"
                )
            self._deactivate(slot)
            if self.watcher is not None:
                self.watcher.dropped(self._hash[slot], slot)
        del self._slot_of[self._hash[slot]]
        self._state[slot] = FREE
        self._hash[slot] = None
        self._priority[slot] = 0
        self._free.append(slot)

    def hold(self, slot: int) -> None:
        """Pin a COMMITTED block while it is read: it cannot be evicted or discarded until released."""
        self._expect(slot, COMMITTED, "hold")
        if self._holds[slot] == 0:
            self._deactivate(slot)
        self._holds[slot] += 1

    def release(self, slot: int) -> None:
        """Drop one hold; at zero holds the block becomes evictable again, as most recently used."""
        self._expect(slot, COMMITTED, "release")
        if self._holds[slot] == 0:
            raise ValueError(f"{self.name}: cannot release slot {slot}: it is not held")
        self._holds[slot] -= 1
        if self._holds[slot] == 0:
            self._make_inactive(slot)

    # -- checks ----------------------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Verify all bookkeeping (O(n)); raise PoolInvariantError describing the first inconsistency."""

        def fail(msg: str) -> None:
            raise PoolInvariantError(f"{self.name}: {msg}")

        n = self.num_blocks
        for lst_name in ("_state", "_hash", "_holds", "_priority", "_last_use"):
            if len(getattr(self, lst_name)) != n:
                fail(f"{lst_name} has {len(getattr(self, lst_name))} entries for {n} slots")
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            fail("free list holds a slot twice")
        for slot in self._free:
            if not 0 <= slot < n:
                fail(f"free list holds slot {slot}, out of range")
            if self._state[slot] != FREE:
                fail(f"free list holds slot {slot}, which is {_STATE_NAMES[self._state[slot]]}")
        inactive_seen: set[int] = set()
        for prio, bucket in self._inactive.items():
            prev_tick = -1
            for slot in bucket:
                if slot in inactive_seen:
                    fail(f"slot {slot} is in the eviction order twice")
                inactive_seen.add(slot)
                if self._priority[slot] != prio:
                    fail(f"slot {slot} of priority {self._priority[slot]} is filed under priority {prio}")
                if self._last_use[slot] < prev_tick:
                    fail(f"eviction order of priority {prio} is not least recently used first at slot {slot}")
                prev_tick = self._last_use[slot]
        if self._priorities != sorted(p for p, b in self._inactive.items() if b) or len(self._priorities) != len(
            self._inactive
        ):
            fail(f"priority index {self._priorities} does not match the non-empty buckets {sorted(self._inactive)}")
        owners: dict[int, int] = {}
        for slot in range(n):
            state, h, holds = self._state[slot], self._hash[slot], self._holds[slot]
            if holds < 0:
                fail(f"slot {slot} has a negative hold count {holds}")
            if state == FREE:
                if slot not in free_set:
                    fail(f"free slot {slot} is missing from the free list")
                if h is not None or holds:
                    fail(f"free slot {slot} still has hash {h} / {holds} holds")
                continue
            if slot in free_set:
                fail(f"{_STATE_NAMES[state]} slot {slot} is on the free list")
            if h is None:
                fail(f"{_STATE_NAMES[state]} slot {slot} has no hash")
            if h in owners:
                fail(f"hash {h:#x} is owned by slots {owners[h]} and {slot}")
            owners[h] = slot
            if self._slot_of.get(h) != slot:
                fail(f"hash {h:#x} of slot {slot} maps to slot {self._slot_of.get(h)}")
            should_be_inactive = state == COMMITTED and holds == 0
            if state == PENDING and holds:
                fail(f"pending slot {slot} has {holds} holds")
            if should_be_inactive != (slot in inactive_seen):
                fail(f"slot {slot} ({_STATE_NAMES[state]}, {holds} holds) is "
                     f"{'missing from' if should_be_inactive else 'wrongly in'} the eviction order")
        if len(self._slot_of) != len(owners):
            extra = set(self._slot_of) - set(owners)
            fail(f"hash map has {len(self._slot_of)} entries for {len(owners)} used slots (stale: {sorted(extra)[:4]})")

    # -- internals -------------------------------------------------------------------------------------------

    def _check_slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"slot must be an int, got {type(slot).__name__} {slot!r}")
        if not 0 <= slot < self.num_blocks:
            raise IndexError(f"{self.name}: slot {slot} out of range for a pool of {self.num_blocks} blocks")
        return slot

    def _expect(self, slot: int, state: int, action: str) -> None:
        self._check_slot(slot)
        if self._state[slot] != state:
            raise ValueError(
                f"{self.name}: cannot {action} slot {slot}: it is {_STATE_NAMES[self._state[slot]]}, "
                f"expected {_STATE_NAMES[state]}"
            )

    def _make_inactive(self, slot: int) -> None:
        """File a committed, unheld slot as the most recently used of its priority."""
        self._tick += 1
        self._last_use[slot] = self._tick
        prio = self._priority[slot]
        bucket = self._inactive.get(prio)
        if bucket is None:
            bucket = self._add_priority(prio)
        bucket[slot] = None

    def _add_priority(self, prio: int) -> OrderedDict[int, None]:
        """The (new, empty) eviction order of a priority no inactive slot had."""
        bucket = self._inactive[prio] = OrderedDict()
        bisect.insort(self._priorities, prio)
        return bucket

    def _deactivate(self, slot: int) -> None:
        """Take a slot out of the eviction order (it is being held, evicted, re-filed or discarded)."""
        prio = self._priority[slot]
        bucket = self._inactive[prio]
        del bucket[slot]
        if not bucket:
            self._drop_priority(prio)

    def _drop_priority(self, prio: int) -> None:
        """Forget a priority whose last inactive slot left."""
        del self._inactive[prio]
        del self._priorities[bisect.bisect_left(self._priorities, prio)]
