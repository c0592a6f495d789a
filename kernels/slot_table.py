"""The per-slot records that prove a disk cache's blocks right: each slot's checksum, tag and state, and whether a
truncation of the file lost it.

They live in memory of their own, or in a buffer laid out by `SlotTable.nbytes` that other processes map too: a
disk file shared by ranks holding identical KV is written by one rank and read by all, so its records must be the
writer's wherever it is read (a reader maps them read-only: it can check, never record).
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SlotTable"]

_RECORD_BYTES = 8 + 8 + 1 + 1 + 1  # checksum, tag, tagged, state, lost


class SlotTable:
    """The records of ``num_slots`` slots, zeroed in memory of their own, or in ``buffer`` (any buffer of at least
    `nbytes`, as it is: a reader's view of the writer's records). ``sums`` / ``tags`` (uint64), ``tagged`` (bool),
    ``state`` and ``lost`` (uint8) are numpy views of it, read-only where the buffer is."""

    def __init__(self, num_slots: int, buffer: Any = None) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, (int, np.integer)):
            raise TypeError(f"num_slots must be an int, got {type(num_slots).__name__} {num_slots!r}")
        if num_slots <= 0:
            raise ValueError(f"num_slots must be > 0, got {num_slots}")
        n = int(num_slots)
        size = self.nbytes(n)
        raw = np.zeros(size, dtype=np.uint8) if buffer is None else np.frombuffer(buffer, dtype=np.uint8)
        if raw.size < size:
            raise ValueError(f"the records of {n} slots need {size} bytes, the buffer holds {raw.size}")
        self.num_slots = n
        self.read_only = not raw.flags.writeable
        self.sums = raw[: 8 * n].view(np.uint64)
        self.tags = raw[8 * n: 16 * n].view(np.uint64)
        self.tagged = raw[16 * n: 17 * n].view(np.bool_)
        self.state = raw[17 * n: 18 * n]
        self.lost = raw[18 * n: 19 * n]

    @staticmethod
    def nbytes(num_slots: int) -> int:
        """The bytes of the records of ``num_slots`` slots."""
        return _RECORD_BYTES * int(num_slots)
