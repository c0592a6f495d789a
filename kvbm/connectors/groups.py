"""KV cache groups of a hybrid model, engine-independent: which blocks of each group a hit needs and which a
store may read.

An engine with several KV cache groups (full attention next to sliding-window attention or recurrent state) keeps
one block table per group. Every group's blocks are keyed apart (`group_salt` mixes the group's index and spec into
the request's salt), and each group's engine cache is its own tier on the workers (`KVGroup.engine_tier`), so a move
names its group through the engine tier it reads or writes. A full-attention group needs every block of a hit; a
sliding-window group only the blocks holding the last ``window - 1`` tokens before the hit point: the engine
keeps nothing below them (its block table holds its null block there), so nothing is loaded there either. A state
group (Mamba, linear attention, kept at block boundaries: vLLM's ``mamba_cache_mode="align"``) holds in its block
``i`` the recurrent state after the first ``(i + 1) * block_size`` tokens; a hit needs only the one block ending at
the hit point, and the engine keeps no block below the one holding the state of its last computed token.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvbm.hashing import group_salt
from kvbm.leader.plans import ENGINE_TIER

__all__ = ["FULL", "STATE", "WINDOW", "KVGroup", "single_group"]

FULL = "full"
WINDOW = "window"
STATE = "state"


@dataclass(frozen=True)
class KVGroup:
    """One KV cache group: its index among the engine's groups, ``kind`` (`FULL`, `WINDOW` or `STATE`), tokens per
    block, for a window group the tokens attended before a position (``window - 1``) plus those the engine retains
    below them (``retained``), and ``spec_key``, a text naming the group's cache spec (it enters the group's
    hashes)."""

    index: int
    kind: str
    block_size: int
    spec_key: str
    window: int = 0
    retained: int = 0

    def __post_init__(self) -> None:
        if self.kind not in (FULL, WINDOW, STATE):
            raise ValueError(f"group {self.index}: kind must be {FULL!r}, {WINDOW!r} or {STATE!r}, got {self.kind!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"group {self.index}: block_size must be a positive int, got {self.block_size!r}")
        if self.kind == WINDOW and self.window <= 0:
            raise ValueError(f"group {self.index}: a sliding-window group needs a positive window, got {self.window}")

    @property
    def engine_tier(self) -> str:
        """The name of this group's engine cache among a worker's tiers ("G1" for group 0)."""
        return ENGINE_TIER if self.index == 0 else f"{ENGINE_TIER}.{self.index}"

    def salt(self, request_salt: int, hybrid: bool) -> int:
        """The seed of this group's block hashes: the request's own salt for a single-group engine (so its hashes
        stay Dynamo KVBM's), the request's salt mixed with the group's index and spec for a hybrid one."""
        return group_salt(request_salt, self.index, self.spec_key) if hybrid else request_salt

    def first_kept_block(self, num_tokens: int) -> int:
        """The first block the engine keeps for a request with ``num_tokens`` computed: 0 for full attention; for
        a sliding window, the block of the first token the next position may still read (the engine frees the
        blocks below it and holds its null block there); for a state group, the block holding the state after
        ``num_tokens`` (the only one a hit at ``num_tokens`` loads: block ``num_tokens // block_size - 1`` when the
        hit is whole blocks)."""
        if self.kind == FULL:
            return 0
        if self.kind == STATE:
            return max(0, num_tokens - 1) // self.block_size
        return max(0, num_tokens - self.window - self.retained) // self.block_size


def single_group(block_size: int) -> tuple[KVGroup, ...]:
    """The groups of a model with full attention only."""
    return (KVGroup(0, FULL, block_size, "full"),)
