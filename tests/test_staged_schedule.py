"""The plan of a staged transfer (`host_runs.schedule`), on the CPU: the chunks of `chunk_starts`, the staging slots in
rotation and the DMA pieces of `HostRuns`, in one table that both enqueues execute (test_staged_enqueue.py)."""
from __future__ import annotations

import numpy as np
import pytest

from kvbm.kernels.host_runs import Chunk, HostRuns, chunk_starts, schedule


@pytest.mark.parametrize("direction", ["d2h", "h2d"])
@pytest.mark.parametrize("n,per_chunk", [(1, 4), (5, 4), (17, 4), (40, 8), (3, 1)])
def test_schedule_is_chunk_starts_slots_in_rotation_and_host_runs(direction, n, per_chunk):
    rng = np.random.default_rng(n * per_chunk)
    ids = np.sort(rng.choice(3 * n, n, replace=False)).astype(np.int64)
    state = np.array([2, 5], dtype=np.int64)
    table, *pieces = schedule(ids, per_chunk, direction, 1 << 30, 96, 32, 1 << 40, 1 << 20, state, 3)
    starts = chunk_starts(n, per_chunk, direction)
    assert table[:, Chunk.START].tolist() == starts
    assert table[:, Chunk.COUNT].tolist() == np.diff(starts + [n]).tolist()
    assert table[:, Chunk.SLOT].tolist() == [(2 + c) % 3 for c in range(len(starts))]
    assert state.tolist() == [(2 + len(starts)) % 3, 5]
    runs = HostRuns(ids, starts, 1 << 30, 96, 32)
    for c, row in enumerate(table.tolist()):
        want = runs.chunk(c, (1 << 40) + row[Chunk.SLOT] * (1 << 20))
        got = [a[row[Chunk.FIRST_PIECE]:row[Chunk.END_PIECE]] for a in pieces]
        assert [w.tolist() for w in want] == [g.tolist() for g in got]


@pytest.mark.parametrize("args", [(0, "d2h"), (4, "up")])
def test_schedule_refuses_bad_arguments(args):
    with pytest.raises(ValueError, match="schedule needs"):
        schedule(np.arange(3, dtype=np.int64), *args, 0, 1, 1, 0, 1, np.zeros(2, dtype=np.int64), 2)
    with pytest.raises(ValueError, match="schedule needs"):
        schedule(np.zeros(0, dtype=np.int64), 4, "d2h", 0, 1, 1, 0, 1, np.zeros(2, dtype=np.int64), 2)
