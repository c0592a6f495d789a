"""Plans as plain data: what the leader asks workers to move, and what workers report back.

A `Move` names two tiers by name ("G1" is the engine's own cache) and the block ids on each side: for G1 the
engine's block ids, for every other tier its slot ids. A move from another kvbm instance's G2 (``REMOTE_TIER``)
carries a `RemoteSource`: whose pool, per rank, the slot ids refer to. Workers execute moves on their own shard of
each tier and report a `MoveResult` per move; nothing else crosses between the two sides, so both pickle cheaply
into the engine's connector metadata.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["ENGINE_TIER", "REMOTE_TIER", "Move", "MoveKind", "MoveResult", "RemoteSource", "direction"]

#: The name of the engine's cache among the tiers a move names.
ENGINE_TIER = "G1"
#: The tier name of a move whose source is another kvbm instance's G2 pool, read over NIXL.
REMOTE_TIER = "G4"


class MoveKind(enum.Enum):
    """Why the leader planned a move; it decides what completing it means for the index."""

    STORE = "store"  #: engine blocks into the first offload tier (their slots are pending until done)
    LOAD = "load"  #: tier slots into engine blocks (the slots are held until done)
    CASCADE = "cascade"  #: slots of one tier into the next tier down (source held, destination pending)


@dataclass(frozen=True, slots=True)
class RemoteSource:
    """Where a remote load reads: ``endpoints[r]`` is what rank ``r`` of the reading engine needs to reach rank
    ``r`` of the holding engine (its NIXL export and seal table, see `kvbm.worker.g4`); ``request_id`` names the
    holder's request whose blocks are pinned for the read (told when the read is over)."""

    engine_id: str
    request_id: str
    endpoints: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Move:
    """Copy blocks ``src_ids`` of tier ``src_tier`` into blocks ``dst_ids`` of tier ``dst_tier``; block ``i``
    holds the block with sequence hash ``hashes[i]``."""

    move_id: int
    kind: MoveKind
    src_tier: str
    dst_tier: str
    src_ids: tuple[int, ...]
    dst_ids: tuple[int, ...]
    hashes: tuple[int, ...]
    remote: RemoteSource | None = None  #: set for a load from another instance (``src_tier`` is ``REMOTE_TIER``)

    def __post_init__(self) -> None:
        if not len(self.src_ids) == len(self.dst_ids) == len(self.hashes):
            raise ValueError(f"move {self.move_id}: {len(self.src_ids)} source ids, {len(self.dst_ids)} destination "
                             f"ids and {len(self.hashes)} hashes")
        if (self.remote is not None) != (self.src_tier == REMOTE_TIER):
            raise ValueError(f"move {self.move_id}: a move from {REMOTE_TIER} needs a RemoteSource, and only it")

    @property
    def num_blocks(self) -> int:
        """Blocks the move copies."""
        return len(self.hashes)

    @property
    def engine_ids(self) -> tuple[int, ...]:
        """The engine's block ids of a store or load (empty for a cascade)."""
        if self.src_tier == ENGINE_TIER:
            return self.src_ids
        return self.dst_ids if self.dst_tier == ENGINE_TIER else ()


@dataclass(frozen=True, slots=True)
class MoveResult:
    """A worker's outcome of one move: ``failed`` maps block index (into the move's lists) to the reason; ``lost``
    are the failed blocks whose source copy is known bad (to be dropped); ``reports`` counts the ranks merged in;
    ``seconds`` is the move's share of the time its worker ran moves between the same two tiers, from its start to
    when the worker saw it finished: time in which N such moves ran counts 1/N to each (`kvbm.worker.store`), so
    bytes over seconds is that path's bandwidth however many moves overlapped (the slowest rank's share)."""

    move_id: int
    failed: dict[int, str] = field(default_factory=dict)
    lost: frozenset[int] = frozenset()
    reports: int = 1
    seconds: float | None = None

    def merged(self, other: MoveResult) -> MoveResult:
        """The result of the same move on more ranks: a block that failed (or was lost) on any rank does."""
        if other.move_id != self.move_id:
            raise ValueError(f"cannot merge results of moves {self.move_id} and {other.move_id}")
        times = [t for t in (self.seconds, other.seconds) if t is not None]
        return MoveResult(self.move_id, {**other.failed, **self.failed}, self.lost | other.lost,
                          self.reports + other.reports, max(times) if times else None)


def direction(move: Move) -> str:
    """The move's direction as the metrics name it, e.g. "g1_to_g2" (a hybrid model's group engine caches, "G1.k",
    count as G1)."""
    return f"{_tier_label(move.src_tier)}_to_{_tier_label(move.dst_tier)}"


def _tier_label(tier: str) -> str:
    return ENGINE_TIER.lower() if tier.startswith(ENGINE_TIER + ".") else tier.lower()
