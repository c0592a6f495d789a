"""Disk admission filter: only blocks seen again go from the host tier (G2) down to disk (G3).

It protects the SSD from write traffic of blocks used once, with KVBM's frequency rule: a block's frequency is 1
when first seen, doubles on each hit, and drops by 1 at every decay step (every ``decay_seconds``, 600 s in KVBM);
an entry that reaches 0 is forgotten. A block is admitted to disk when its frequency is at least 2.

Use by the manager: when a block is registered in G2, ``admit(seq_hash)`` (this first sighting records frequency 1,
so a block seen once is not admitted); on every later prefix hit of that block, ``record_hit(seq_hash)`` and then
``admit(seq_hash)`` to decide whether to cascade it to G3. ``DiskAdmissionFilter(enabled=False)`` (from
``DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER``) admits everything and keeps no state.

Decay is applied lazily: each entry remembers the step at which it was last updated, and its frequency is
reduced by the steps elapsed when it is next read, so there is no background thread and every call is O(1).
At most ``max_entries`` entries are kept; beyond that the least recently seen one is dropped.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Callable

__all__ = ["DiskAdmissionFilter", "ADMIT_FREQUENCY"]

ADMIT_FREQUENCY = 2
# Doubling is capped so a very hot block's count stays a small int; decaying from the cap by 1 per 600 s step
# already takes longer than any process lives.
_MAX_FREQUENCY = 2**30


class DiskAdmissionFilter:
    """Frequency filter deciding which G2 blocks are worth writing to G3 (see module docstring)."""

    def __init__(
        self,
        decay_seconds: float = 600.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
        enabled: bool = True,
    ) -> None:
        """``clock`` returns seconds (injectable for tests); ``enabled=False`` admits every block."""
        if isinstance(decay_seconds, bool) or not isinstance(decay_seconds, (int, float)) \
                or not math.isfinite(decay_seconds) or decay_seconds <= 0:
            raise ValueError(f"decay_seconds must be a finite, positive number, got {decay_seconds!r}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries <= 0:
            raise ValueError(f"max_entries must be a positive integer, got {max_entries!r}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {type(clock).__name__}")
        self.enabled = bool(enabled)
        self.decay_seconds = float(decay_seconds)
        self.max_entries = max_entries
        self._clock = clock
        self._start = clock()
        # seq_hash -> (frequency, decay step of the last update), least recently seen first.
        self._entries: OrderedDict[int, tuple[int, int]] = OrderedDict()

    def __len__(self) -> int:
        """Entries kept, including ones whose frequency has decayed to 0 but were not read since."""
        return len(self._entries)

    def frequency(self, seq_hash: int) -> int:
        """Current (decayed) frequency of ``seq_hash``; 0 when unknown or decayed away. Does not count as a sighting."""
        return self._current(seq_hash, self._step())

    def admit(self, seq_hash: int) -> bool:
        """Whether ``seq_hash`` may be written to disk (frequency >= 2). A first sighting records frequency 1."""
        if not self.enabled:
            return True
        step = self._step()
        freq = self._current(seq_hash, step)
        self._store(seq_hash, freq or 1, step)
        return freq >= ADMIT_FREQUENCY

    def record_hit(self, seq_hash: int) -> None:
        """Count a hit on ``seq_hash``: its frequency doubles (an unknown block starts at 1)."""
        if not self.enabled:
            return
        step = self._step()
        freq = self._current(seq_hash, step)
        self._store(seq_hash, min(2 * freq, _MAX_FREQUENCY) if freq else 1, step)

    def _step(self) -> int:
        now = self._clock()
        return max(0, math.floor((now - self._start) / self.decay_seconds))

    def _current(self, seq_hash: int, step: int) -> int:
        """Frequency of an entry at decay step ``step``; an entry decayed to 0 is dropped."""
        entry = self._entries.get(seq_hash)
        if entry is None:
            return 0
        freq = entry[0] - max(0, step - entry[1])
        if freq <= 0:
            del self._entries[seq_hash]
            return 0
        return freq

    def _store(self, seq_hash: int, freq: int, step: int) -> None:
        """Write an entry as the most recently seen, dropping the least recently seen beyond ``max_entries``."""
        self._entries[seq_hash] = (freq, step)
        self._entries.move_to_end(seq_hash)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
