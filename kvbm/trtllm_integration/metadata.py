"""What the TensorRT-LLM leader tells its worker each step, and the leader's per-request block bookkeeping.

Independent of TensorRT-LLM (plain data), so it is importable and testable without the engine.

``ConnectorMetadata`` is the compact per-step message: the loads to start (stored blocks into freshly allocated
cache blocks) and the saves to start after the forward pass (newly computed full blocks). Each move names the
request, the blocks' sequence hashes and the engine's cache block ids, translated once here and carried as plain
ints (the executor pickles the metadata to broadcast it).

``TrackedRequest`` follows one request through ``RequestData`` reports: it accumulates the request's tokens and
cache block ids, knows how many tokens have valid KV once the step being planned has run, hashes full blocks
incrementally, and hands out each full block for offload exactly once.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Sequence

from kvbm.hashing import sequence_hashes

__all__ = ["BlockMove", "ConnectorMetadata", "TrackedRequest", "non_negative_int"]


@dataclass(frozen=True)
class BlockMove:
    """Blocks of one request to move: ``seq_hashes[i]`` is stored in / comes from cache block ``block_ids[i]``."""

    request_id: int
    seq_hashes: tuple[int, ...]
    block_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.seq_hashes) != len(self.block_ids):
            raise ValueError(f"request {self.request_id}: {len(self.seq_hashes)} hashes but {len(self.block_ids)} "
                             f"block ids")


@dataclass(frozen=True)
class ConnectorMetadata:
    """One step's plan for the worker: ``loads`` start in ``start_load_kv``, ``saves`` after the forward pass."""

    step: int
    loads: tuple[BlockMove, ...] = ()
    saves: tuple[BlockMove, ...] = ()


def non_negative_int(name: str, value: object) -> int:
    """``value`` as an int >= 0, or a TypeError / ValueError naming ``name`` and the value."""
    if type(value) is int and value >= 0:  # the common case, checked cheaply (called per request per step)
        return value
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {out}")
    return out


@dataclass
class TrackedRequest:
    """The leader's view of one request (see the module docstring).

    ``valid_tokens`` starts at the tokens whose KV is in the cache before the request's first computed step (the
    engine's own prefix match plus the blocks this connector loads) and grows with each scheduled step.
    """

    request_id: int
    block_size: int
    salt: int
    valid_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    seq_hashes: list[int] = field(default_factory=list)
    saved_blocks: int = 0  #: blocks [0, saved_blocks) were handed out for offload
    loaded: BlockMove | None = None  #: the load planned for this request, checked against its first report

    def report(self, new_tokens: Sequence[int], new_block_ids: Sequence[int], computed_position: int,
               num_scheduled_tokens: int) -> None:
        """Take one step's ``RequestData``: append tokens and block ids, advance ``valid_tokens``.

        The executor's ``computed_position`` on a request's first report leaves out tokens a connector loaded in
        the same step, so the step starts at the larger of it and what is already known valid. Tokens scheduled
        past the known tokens (speculative drafts, whose KV may be rejected) never count as valid.
        """
        position = non_negative_int("computed_position", computed_position)
        scheduled = non_negative_int("num_scheduled_tokens", num_scheduled_tokens)
        first = not self.tokens
        self.tokens += map(operator.index, new_tokens)
        if new_block_ids:
            self.block_ids += [non_negative_int("new_block_ids entry", b) for b in new_block_ids]
        if first and self.loaded is not None:
            self._check_loaded()
        self.valid_tokens = min(max(self.valid_tokens, position) + scheduled, len(self.tokens))

    def _check_loaded(self) -> None:
        """The blocks loaded must be the request's own blocks at the loaded positions (else the engine and this
        connector disagree on block ids, and the loaded KV sits in the wrong blocks: fail loudly)."""
        first = self.loaded.block_ids
        start = self.valid_tokens // self.block_size - len(first)
        mine = tuple(self.block_ids[start:start + len(first)])
        if mine != first:
            raise RuntimeError(f"request {self.request_id}: blocks were loaded into cache blocks {list(first)} but "
                               f"the engine reports blocks {list(mine)} at those positions")

    def take_new_full_blocks(self) -> BlockMove | None:
        """The full blocks with valid KV not handed out before (hashes computed incrementally), or None."""
        full = min(self.valid_tokens // self.block_size, len(self.block_ids))
        if full <= self.saved_blocks:
            return None
        have = len(self.seq_hashes)
        if full > have:
            parent = self.seq_hashes[-1] if have else None
            self.seq_hashes += sequence_hashes(self.tokens[have * self.block_size:full * self.block_size],
                                               self.block_size, self.salt, parent_hash=parent)
        move = BlockMove(self.request_id, tuple(self.seq_hashes[self.saved_blocks:full]),
                         tuple(self.block_ids[self.saved_blocks:full]))
        self.saved_blocks = full
        return move
