"""How many engine blocks a store into the first tier may take, so that stores never hold the engine's cache long.

A store copies engine (G1) blocks into the first offload tier, and the engine keeps those blocks until the copy is
done. Into pinned host memory that takes milliseconds; into a disk tier without host memory in front of it (disk-only
mode) it takes as long as the disk writes, and a disk slower than the engine's prefill lets the stores queue up:
the engine then waits for its own blocks and time to first token grows even for requests that hit nothing (measured
with the TTFT benchmark's multi-round QA on an H100 machine's ~1 GB/s disk: 171 ms mean TTFT against 105 ms without
kvbm). Offloading is best effort, so the rule is: blocks whose store would start more than ``max_seconds`` of
writes behind the tier's queue are not stored (they are counted as dropped, and the engine recomputes them if they
are asked for again).

The tier's write rate is learned from the stores it completes (blocks per second of each store's share of the
time the tier's stores ran, as the worker-side store reports it). Until a tier's first store is measured, and
whenever nothing is queued, a store of at least one batch is let through, so the rate is measured and a slow tier
still stores.

Where the cost rule would not load a request's blocks back from the tier (`LoadCostPolicy.pays_off` of its whole
prompt, the hit most in loading's favour), storing them buys nothing: such a store takes one batch at most once per
``keep_alive_seconds`` (the rule's probe interval) and only while nothing is queued, so the tier keeps a few blocks
for the rule's probes, and none where the rule never probes. The writes of useless stores slow the engine's
forwards even when they hold none of its blocks: in the TTFT benchmark's QA on an H100 machine (Qwen3-0.6B shape,
disk-only G3 at about 1.2 GB/s, every hit recomputed by the rule) the rule's requests took 45.0 ms mean TTFT
against 38.8 ms without kvbm with a batch let through whenever nothing was queued (4.6-7.7 ms more in each of three
passes), and 33.9 / 34.1 ms against 34.1 / 33.5 ms with no such store at all (two runs).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["StoreBacklog"]

#: Weight of the newest store's rate in the running estimate.
RATE_WEIGHT = 0.25


@dataclass
class _Tier:
    pending: int = 0  #: blocks of stores started and not completed
    rate: float | None = None  #: blocks per second, once measured
    dropped: int = 0  #: blocks not stored since construction
    kept_alive: float | None = None  #: when the last store of blocks not worth loading was planned


class StoreBacklog:
    """Per tier: the blocks of engine stores in flight and the tier's learned write rate (see the module docstring)."""

    def __init__(self, max_seconds: float, batch_size: int, keep_alive_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``max_seconds``: the longest queue of writes a new store may join (0: no limit); ``batch_size``: blocks
        always let through while nothing is queued; ``keep_alive_seconds``: the shortest time between two stores of
        blocks not worth loading (0: none such)."""
        if not max_seconds >= 0:
            raise ValueError(f"max_seconds must be >= 0, got {max_seconds!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if not keep_alive_seconds >= 0:
            raise ValueError(f"keep_alive_seconds must be >= 0, got {keep_alive_seconds!r}")
        self.max_seconds = max_seconds
        self.batch_size = batch_size
        self.keep_alive_seconds = keep_alive_seconds
        self._clock = clock
        self._tiers: dict[str, _Tier] = {}
        self._moves: dict[int, tuple[str, int]] = {}  # store move id -> (tier, blocks)

    def _tier(self, name: str) -> _Tier:
        return self._tiers.setdefault(name, _Tier())

    @property
    def bounds(self) -> bool:
        """Whether stores are bounded at all (``max_seconds`` > 0)."""
        return self.max_seconds > 0

    def room(self, tier: str, *, worth_loading: bool = True) -> int | None:
        """Blocks a new store into ``tier`` may take now; None: no limit (the rule is off or the rate unmeasured).
        ``worth_loading`` False (the cost rule would not load the blocks back): one batch while nothing is queued
        and ``keep_alive_seconds`` have passed since the last such store was planned, else none."""
        t = self._tier(tier)
        if self.max_seconds == 0:
            return None
        if not worth_loading:
            due = self.keep_alive_seconds > 0 and (
                t.kept_alive is None or self._clock() - t.kept_alive >= self.keep_alive_seconds)
            return self.batch_size if due and not t.pending else 0
        if t.rate is None:
            return None
        room = max(0, int(t.rate * self.max_seconds) - t.pending)
        return room if t.pending else max(room, self.batch_size)

    def started(self, move_id: int, tier: str, num_blocks: int, *, worth_loading: bool = True) -> None:
        """A store of ``num_blocks`` blocks into ``tier`` was planned (``worth_loading`` as its `room` was asked)."""
        self._moves[move_id] = (tier, num_blocks)
        t = self._tier(tier)
        t.pending += num_blocks
        if not worth_loading:
            t.kept_alive = self._clock()

    def dropped(self, tier: str, num_blocks: int) -> None:
        """``num_blocks`` blocks were left unstored for want of room."""
        self._tier(tier).dropped += num_blocks

    def finished(self, move_id: int, seconds: float | None) -> None:
        """A store completed (whatever its blocks' outcome) in ``seconds`` of the tier's time (None: not timed)."""
        entry = self._moves.pop(move_id, None)
        if entry is None:
            return
        tier, blocks = entry
        t = self._tier(tier)
        t.pending -= blocks
        if seconds is not None and seconds > 0:
            rate = blocks / seconds
            t.rate = rate if t.rate is None else (1 - RATE_WEIGHT) * t.rate + RATE_WEIGHT * rate

    def rate(self, tier: str) -> float | None:
        """The learned write rate of ``tier`` in blocks per second (None before its first timed store)."""
        return self._tier(tier).rate

    def pending(self, tier: str) -> int:
        """Blocks of ``tier``'s stores in flight."""
        return self._tier(tier).pending

    def total_dropped(self, tier: str) -> int:
        """Blocks left unstored in ``tier`` since construction."""
        return self._tier(tier).dropped
