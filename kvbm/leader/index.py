"""The leader's block index: which sequence hash sits in which slot of each offload tier, and the plans that change
that. No tensors, no CUDA: it runs on an engine's scheduler side, whatever the number of workers.

Tiers form an ordered list (G2 host, then G3 disk; any list of names). Offloaded blocks enter the first tier;
a block registered in tier k goes down to tier k+1 when tier k+1's admission policy admits it (a hit in tier k
counts as a sighting for tier k+1). A lookup walks the tiers in order: the match is a run of hits in the first
tier, then in the next from where that stopped, and so on. Every change is a `Move` that workers execute and
report back (`complete`): a store's slots are PENDING (invisible) until its result commits them; slots read by a
load or a cascade are held (not evictable) until its result releases them; a slot whose bytes a read found bad
(a failed disk read, a checksum mismatch) is dropped.
Eviction inside each tier is the pool's: lowest priority, then least recently used, never a held or pending block.
"""
from __future__ import annotations

import itertools
import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvbm.leader.plans import ENGINE_TIER, Move, MoveKind
from kvbm.leader.pool import BlockPool

__all__ = ["AdmissionPolicy", "BlockIndex", "Match", "StorePlan", "LoadPlan", "TierConfig"]

log = logging.getLogger(__name__)


class AdmissionPolicy(Protocol):
    """Decides which blocks of the tier above are worth a place in a tier (`kvbm.policies.admission`)."""

    def admit(self, seq_hash: int) -> bool:
        """Record a sighting of the block (its registration in the tier above) and say whether to admit it."""

    def record_hit(self, seq_hash: int) -> None:
        """Count a lookup hit of the block in the tier above."""


@dataclass(frozen=True)
class TierConfig:
    """One offload tier as the leader sees it: a name ("G2", "G3", ...), its number of slots, and the admission
    policy for blocks coming down from the tier above (None admits every block)."""

    name: str
    num_blocks: int
    admission: AdmissionPolicy | None = None

    def __post_init__(self) -> None:
        if not self.name or self.name == ENGINE_TIER or self.name.startswith(ENGINE_TIER + "."):
            raise ValueError(f"a tier needs a name other than {ENGINE_TIER!r} or {ENGINE_TIER + '.k'!r} (the engine's "
                             f"caches), got {self.name!r}")
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks <= 0:
            raise ValueError(f"tier {self.name}: num_blocks must be a positive int, got {self.num_blocks!r}")


@dataclass(frozen=True)
class Match:
    """A prefix lookup's result: the first ``num_blocks`` blocks can be loaded, ``hits[k]`` of them from tier k
    (in tier order: the first tier's run, then the next tier's)."""

    num_blocks: int
    hits: tuple[int, ...]

    @property
    def host_hits(self) -> int:
        """Blocks found in the first tier (G2 in a host + disk set-up)."""
        return self.hits[0] if self.hits else 0

    @property
    def disk_hits(self) -> int:
        """Blocks found past the first tier."""
        return self.num_blocks - self.host_hits


@dataclass
class StorePlan:
    """What ``plan_store`` decided per block: ``moves`` to execute, ``skipped`` positions with reasons, ``busy``
    positions for which every slot of the tier was pending or held (retry once moves complete), and ``over_limit``
    positions past the call's ``max_blocks``."""

    moves: list[Move] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    busy: list[int] = field(default_factory=list)
    over_limit: list[int] = field(default_factory=list)
    positions: dict[int, list[int]] = field(default_factory=dict)  #: move id -> positions in the call


@dataclass
class LoadPlan:
    """What ``plan_load`` decided: ``moves`` per source tier, ``missing`` positions (in no tier) with reasons."""

    moves: list[Move] = field(default_factory=list)
    missing: dict[int, str] = field(default_factory=dict)
    positions: dict[int, list[int]] = field(default_factory=dict)  #: move id -> positions in the call


@dataclass
class _Tier:
    config: TierConfig
    pool: BlockPool
    bad: set[int] = field(default_factory=set)  # slots whose bytes a read found bad: dropped once unheld

    @property
    def name(self) -> str:
        return self.config.name


_HASH_END = 2**64


def as_hashes(seq_hashes: Sequence[int]) -> list[int]:
    """Sequence hashes checked to be ints (not bools) in [0, 2**64)."""
    hashes = list(seq_hashes)
    if not hashes or (set(map(type, hashes)) == {int} and min(hashes) >= 0 and max(hashes) < _HASH_END):
        return hashes  # the common case, checked in C
    out = []
    for h in hashes:
        if isinstance(h, bool):
            raise TypeError(f"seq_hashes must hold int hashes, got the bool {h!r}")
        try:
            h = operator.index(h)
        except TypeError:
            raise TypeError(f"seq_hashes must hold int hashes, got {type(h).__name__} {h!r}") from None
        if not 0 <= h < _HASH_END:
            raise ValueError(f"seq_hashes must be in [0, 2**64), got {h}")
        out.append(h)
    return out


class BlockIndex:
    """Hashes -> slots for an ordered list of tiers, and the moves that offload, load and cascade blocks.

    ``batch_size`` caps the blocks of one move (``DYN_KVBM_MAX_TRANSFER_BATCH_SIZE``); ``min_priority`` is the
    lowest priority stored (``DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY``). Not thread-safe: one thread drives it.
    """

    def __init__(self, tiers: Sequence[TierConfig], *, batch_size: int = 16, min_priority: int = 0) -> None:
        if not tiers:
            raise ValueError("a block index needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be distinct, got {names}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.min_priority = min_priority
        self._tiers = [_Tier(t, BlockPool(t.num_blocks, t.name)) for t in tiers]
        self._by_name = {t.name: k for k, t in enumerate(self._tiers)}
        self._ids = itertools.count(1)
        self._open: dict[int, Move] = {}  # moves planned and not completed
        self._admitted: dict[int, tuple[int, int]] = {}  # hash -> (tier index, held slot), in admission order

    # -- queries -----------------------------------------------------------------------------------------------

    @property
    def tier_names(self) -> list[str]:
        """The tiers' names, in order."""
        return [t.name for t in self._tiers]

    def pool(self, name: str) -> BlockPool:
        """The slot pool of tier ``name``."""
        return self._tiers[self._tier_index(name)].pool

    def release_slot(self, name: str, slot: int) -> None:
        """Drop a hold taken on a slot of tier ``name`` outside a move (``pool(name).hold``); a slot a read found
        bad is dropped once nothing holds it."""
        self._release_all(self._tier_index(name), (slot,))

    def reserve_move_id(self) -> int:
        """A fresh move id for a move planned outside the index (a remote load); ``complete`` does not know it."""
        return next(self._ids)

    def open_moves(self) -> list[Move]:
        """Moves planned whose results have not come back."""
        return list(self._open.values())

    def lookup(self, seq_hashes: Sequence[int], *, whole_prompt: bool = True) -> Match:
        """The longest stored prefix of ``seq_hashes`` (tiers in order, see the module docstring); hits in a
        tier count as sightings for the next tier's admission. With ``whole_prompt`` (the prompt ends at the last
        full block), a match of every block leaves the last one out: the engine must compute one token."""
        hashes = as_hashes(seq_hashes)
        tiers = self._tiers
        hits = [0] * len(tiers)
        k = n = 0
        while k < len(tiers) and n < len(hashes):  # a run in tier k, then the next tier holding the block after it
            run = len(tiers[k].pool.lookup_run(hashes, n))
            if not run:
                k += 1
                continue
            self._hits(k, hashes[n:n + run])
            hits[k] += run
            n += run
        if n and n == len(hashes) and whole_prompt:
            hits[max(j for j, h in enumerate(hits) if h)] -= 1
            n -= 1
        return Match(n, tuple(hits))

    def holds(self, seq_hash: int) -> bool:
        """Whether some tier holds ``seq_hash`` committed (loadable now); marks it recently used there."""
        return any(tier.pool.lookup(seq_hash) is not None for tier in self._tiers)

    # -- plans -------------------------------------------------------------------------------------------------

    def plan_store(self, seq_hashes: Sequence[int], engine_ids: Sequence[int], priority: int = 0,
                   max_blocks: int | None = None) -> StorePlan:
        """Moves copying engine blocks ``engine_ids`` (holding ``seq_hashes``) into pending slots of the first
        tier. Blocks already there (or on their way), repeated, below ``min_priority`` are skipped; those past the
        first ``max_blocks`` to store are ``over_limit`` (None: no limit); blocks that find every slot pending or held
        are ``busy``."""
        hashes = as_hashes(seq_hashes)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {type(priority).__name__} {priority!r}")
        _same_length(hashes, engine_ids)
        tier = self._tiers[0]
        plan = StorePlan()
        if priority < self.min_priority:
            low = f"priority {priority} is below DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY={self.min_priority}"
            plan.skipped = dict.fromkeys(range(len(hashes)), low)
            return plan
        # one pass per block; a long prompt's stored prefix (2048 blocks at 32k tokens) is mostly skips, so the
        # loop's lookups and its one reason string are bound outside it
        part: list[tuple[int, int]] = []
        seen: set[int] = set()
        contains, skipped, stored = tier.pool.contains, plan.skipped, f"already stored in {tier.name}"
        for i, h in enumerate(hashes):
            if h in seen or contains(h):
                skipped[i] = stored
            elif max_blocks is not None and len(part) >= max_blocks:
                plan.over_limit.append(i)
            else:
                alloc = tier.pool.allocate(h, priority)
                if alloc is None:
                    plan.busy.append(i)
                else:
                    part.append((i, alloc.slot))
            seen.add(h)
        for start in range(0, len(part), self.batch_size):
            chunk = part[start:start + self.batch_size]
            move = self._move(MoveKind.STORE, ENGINE_TIER, tier.name, [engine_ids[i] for i, _ in chunk],
                              [s for _, s in chunk], [hashes[i] for i, _ in chunk])
            plan.moves.append(move)
            plan.positions[move.move_id] = [i for i, _ in chunk]
        return plan

    def plan_load(self, seq_hashes: Sequence[int], engine_ids: Sequence[int], *, whole: bool = False) -> LoadPlan:
        """Moves copying the stored blocks ``seq_hashes`` into engine blocks ``engine_ids``, each from the first
        tier that holds it; their slots are held until the moves complete. A tier's blocks go in moves of at most
        ``batch_size`` blocks, or in one move with ``whole`` (a layer-wise load, which runs as one transfer per
        layer group whatever its moves)."""
        hashes = as_hashes(seq_hashes)
        _same_length(hashes, engine_ids)
        plan = LoadPlan()
        per_tier: dict[int, tuple[list[int], list[int]]] = {}  # tier -> (positions, slots)
        first, i = self._tiers[0].pool, 0
        while i < len(hashes):  # runs held in the first tier; a block it lacks from the next tier holding it
            run = first.hold_run(hashes, i)
            if run:
                positions, slots = per_tier.setdefault(0, ([], []))
                positions.extend(range(i, i + len(run)))
                slots.extend(run)
                i += len(run)
                continue
            for k in range(1, len(self._tiers)):
                slot = self._tiers[k].pool.lookup_hold(hashes[i])
                if slot is not None:
                    positions, slots = per_tier.setdefault(k, ([], []))
                    positions.append(i)
                    slots.append(slot)
                    break
            else:
                plan.missing[i] = "block is in no tier (never stored, or evicted)"
            i += 1
        size = max(len(hashes), 1) if whole else self.batch_size
        for k in sorted(per_tier):
            positions, slots = per_tier[k]
            engine = [engine_ids[i] for i in positions]
            held = [hashes[i] for i in positions]
            for start in range(0, len(positions), size):
                end = start + size
                move = self._move(MoveKind.LOAD, self._tiers[k].name, ENGINE_TIER, slots[start:end],
                                  engine[start:end], held[start:end])
                plan.moves.append(move)
                plan.positions[move.move_id] = positions[start:end]
        return plan

    def plan_cascades(self) -> list[Move]:
        """Moves copying admitted blocks one tier down, into pending slots there; a block that finds every slot
        of the lower tier busy is not copied (its hold is released)."""
        groups: dict[int, list[tuple[int, int, int]]] = {}
        for h, (k, slot) in list(self._admitted.items()):
            del self._admitted[h]
            lower = self._tiers[k + 1]
            alloc = None if lower.pool.contains(h) else lower.pool.allocate(h)
            if alloc is None:
                if not lower.pool.contains(h):
                    log.debug("%s full (every block busy): block %#x not copied down", lower.name, h)
                self._release_all(k, (slot,))
                continue
            groups.setdefault(k, []).append((h, slot, alloc.slot))
        moves = []
        for k, blocks in groups.items():
            for start in range(0, len(blocks), self.batch_size):
                chunk = blocks[start:start + self.batch_size]
                moves.append(self._move(MoveKind.CASCADE, self._tiers[k].name, self._tiers[k + 1].name,
                                        [s for _, s, _ in chunk], [d for _, _, d in chunk], [h for h, _, _ in chunk]))
        return moves

    def has_cascades(self) -> bool:
        """Whether admitted blocks wait for ``plan_cascades``."""
        return bool(self._admitted)

    def complete(self, move_id: int, failed: dict[int, str], lost: Iterable[int] = ()) -> Move:
        """Apply a move's result (``failed``: block index -> reason; ``lost``: failed indices whose source bytes are
        bad): commit or discard stored slots, release held ones, drop lost ones; returns the move."""
        move = self._open.pop(move_id, None)
        if move is None:
            raise KeyError(f"move {move_id} is not open (completed twice, or never planned here)")
        lost = set(lost)
        if lost and move.kind is not MoveKind.STORE:
            k = self._tier_index(move.src_tier)
            for i, slot in enumerate(move.src_ids):
                if i in lost:
                    self._tiers[k].bad.add(slot)
        if move.kind is MoveKind.LOAD:
            self._release_all(self._tier_index(move.src_tier), move.src_ids)
            return move
        k = self._tier_index(move.dst_tier)
        pool = self._tiers[k].pool
        for i, slot in enumerate(move.dst_ids):
            if i in failed:
                pool.discard(slot)
            else:
                pool.commit(slot)
                self._registered(k, move.hashes[i])
        if move.kind is MoveKind.CASCADE:
            self._release_all(self._tier_index(move.src_tier), move.src_ids)
        return move

    def check_invariants(self) -> None:
        """Verify every pool and that holds match the open moves and admitted blocks (O(n), for tests)."""
        for tier in self._tiers:
            tier.pool.check_invariants()
        expected = [dict() for _ in self._tiers]
        for move in self._open.values():
            if move.kind is not MoveKind.STORE:
                k = self._tier_index(move.src_tier)
                for slot in move.src_ids:
                    expected[k][slot] = expected[k].get(slot, 0) + 1
        for k, slot in self._admitted.values():
            expected[k][slot] = expected[k].get(slot, 0) + 1
        for k, tier in enumerate(self._tiers):
            for slot in range(tier.pool.num_blocks):
                if tier.pool.hash_of(slot) is not None and tier.pool.holds(slot) != expected[k].get(slot, 0):
                    raise AssertionError(f"{tier.name} slot {slot}: {tier.pool.holds(slot)} holds, "
                                         f"{expected[k].get(slot, 0)} expected from open moves and admissions")

    # -- internals ---------------------------------------------------------------------------------------------

    def _move(self, kind: MoveKind, src: str, dst: str, src_ids: list[int], dst_ids: list[int],
              hashes: list[int]) -> Move:
        move = Move(next(self._ids), kind, src, dst, tuple(src_ids), tuple(dst_ids), tuple(hashes))
        self._open[move.move_id] = move
        return move

    def _tier_index(self, name: str) -> int:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tier named {name!r}; tiers: {self.tier_names}") from None

    def _registered(self, k: int, seq_hash: int) -> None:
        """A block was committed to tier k: a sighting for the tier below."""
        if k + 1 < len(self._tiers):
            admission = self._tiers[k + 1].config.admission
            if admission is None or admission.admit(seq_hash):
                self._admit(k, seq_hash)

    def _hits(self, k: int, seq_hashes: Sequence[int]) -> None:
        """A lookup found a run of blocks in tier k: hits for the tier below's admission (none without one)."""
        admission = self._tiers[k + 1].config.admission if k + 1 < len(self._tiers) else None
        if admission is None:
            return
        for seq_hash in seq_hashes:
            admission.record_hit(seq_hash)
            if admission.admit(seq_hash):
                self._admit(k, seq_hash)

    def _admit(self, k: int, seq_hash: int) -> None:
        """Hold a tier-k block for its copy one tier down (unless it is there or queued already)."""
        if seq_hash in self._admitted or self._tiers[k + 1].pool.contains(seq_hash):
            return
        slot = self._tiers[k].pool.lookup(seq_hash)
        if slot is not None:
            self._tiers[k].pool.hold(slot)
            self._admitted[seq_hash] = (k, slot)

    def _release_all(self, k: int, slots: Sequence[int]) -> None:
        """Drop a hold on each of ``slots`` (a move's, or one slot), in one pass over the pool; a slot that failed a
        load is dropped once nothing holds it."""
        tier = self._tiers[k]
        tier.pool.release_all(slots)
        for slot in tier.bad.intersection(slots) if tier.bad else ():
            if not tier.pool.holds(slot):
                tier.bad.discard(slot)
                tier.pool.discard(slot)


def _same_length(hashes: list[int], engine_ids: Sequence[int]) -> None:
    if len(hashes) != len(engine_ids):
        raise ValueError(f"seq_hashes and the engine's block ids must have the same length, got {len(hashes)} and "
                         f"{len(engine_ids)}")
