"""How a staged transfer is cut: its chunks (`chunk_starts`), the staging slot of each, and its DMA pieces, one per
run of consecutive host blocks, no run crossing a chunk (`HostRuns`); `schedule` gives all of it at once, as the one
plan that both the compiled enqueue (`staged_enqueue`) and the engine's Python enqueue execute.

A piece is (host address, staging address, width, rows): `rows` rows of `width` bytes, row k at ``host + k *
host_stride`` and ``staging + k * block_bytes``. In a block-major host cache (stride = block bytes) a run is one
dense row; in a layer view of one (`kvbm.layouts.select_layers`: each block a part of a longer stride) a run is one
row per block, moved by one 2-D copy (`copy_2d`) instead of one batched-DMA piece per block: a layer group of a
16k-token onboard is 1024 pieces, whose host cost was most of the time the layer-wise onboard kept exposed.

Found in compiled passes (numba), callable from the compiled enqueue too (`staged_enqueue`): the transfer's host side
is on the path to its first DMA, and the same work as a dozen numpy calls cost 20-30 us of host time per transfer on
the H200 machine (measured), a pass over the ids 4-7 us.
"""
from __future__ import annotations

import enum

import numba
import numpy as np


class Chunk(enum.IntEnum):
    """Columns of a schedule's chunk table: one row per chunk, in enqueue order."""

    START = 0  # position of the chunk's first block in the id lists
    COUNT = 1  # blocks in the chunk
    SLOT = 2  # the staging slot it goes through
    FIRST_PIECE = 3  # its DMA pieces: [FIRST_PIECE, END_PIECE) of the schedule's piece arrays
    END_PIECE = 4


CHUNK_COLUMNS = len(Chunk)
#: Most rows of one piece: a longer run of a layer view is cut (the driver documents no bound on a 2-D copy's
#: height; this keeps each copy's row count in the range the copy engines are routinely given).
MAX_ROWS = 1 << 15


@numba.njit(cache=True, nogil=True)
def _chunk_starts(n, per_chunk, d2h):  # pragma: no cover (compiled)
    short = max(1, per_chunk // 8)
    if n <= per_chunk:
        return np.zeros(1, np.int64)
    starts = np.concatenate((np.zeros(1, np.int64), np.arange(short, n, per_chunk)))
    if not d2h and n - starts[-1] > short:
        return np.append(starts, n - short)
    return starts


def chunk_starts(n: int, per_chunk: int, direction: str) -> list[int]:
    """Where the chunks of an `n`-block staged transfer start. A chunk fills one staging slot (`per_chunk` blocks),
    but a transfer of several chunks begins with a short one of `per_chunk // 8` blocks, and an onboard also ends
    with one: the work before the first DMA (an offload's first gather, and the host's first batched-copy call, whose
    cost grows with its pieces) and the GPU work after the last (an onboard's last scatter) are then an eighth as
    long."""
    if per_chunk < 1 or direction not in ("d2h", "h2d"):
        raise ValueError(f"chunk_starts needs per_chunk >= 1 and direction 'd2h' or 'h2d', got {per_chunk}, "
                         f"{direction!r}")
    return _chunk_starts(n, per_chunk, direction == "d2h").tolist()


@numba.njit(cache=True, nogil=True)
def _find_runs(ids, starts, host_base, host_stride, block_bytes):  # pragma: no cover (compiled)
    n = ids.shape[0]
    for c in range(starts.shape[0]):
        if starts[c] >= n or (starts[c] != 0 if c == 0 else starts[c] <= starts[c - 1]):
            return None
    return _runs(ids, starts, host_base, host_stride, block_bytes)


@numba.njit(cache=True, nogil=True)
def _runs(ids, starts, host_base, host_stride, block_bytes):  # pragma: no cover (compiled)
    n = ids.shape[0]
    host = np.empty(n, np.uint64)
    offset = np.empty(n, np.uint64)
    width = np.empty(n, np.uint64)
    rows = np.empty(n, np.uint64)
    bounds = np.empty(starts.shape[0] + 1, np.int64)
    dense = host_stride == block_bytes
    k = 0
    c = -1  # the chunk of position i
    for i in range(n):
        new_chunk = c + 1 < starts.shape[0] and i == starts[c + 1]
        if new_chunk:
            c += 1
            bounds[c] = k
        if new_chunk or ids[i] != ids[i - 1] + 1 or (not dense and rows[k - 1] == MAX_ROWS):
            host[k] = ids[i] * host_stride + host_base
            offset[k] = (i - starts[c]) * block_bytes
            width[k] = block_bytes
            rows[k] = 1
            k += 1
        elif dense:
            width[k - 1] += block_bytes
        else:
            rows[k - 1] += 1
    bounds[starts.shape[0]] = k
    return host[:k], offset[:k], width[:k], rows[:k], bounds


@numba.njit(cache=True, nogil=True)
def _schedule(host_ids, per_chunk, d2h, host_base, host_stride, block_bytes, staging, slot_bytes, state,
              slots):  # pragma: no cover (compiled)
    n = host_ids.shape[0]
    starts = _chunk_starts(n, per_chunk, d2h)
    host, stage, width, rows, bounds = _runs(host_ids, starts, host_base, host_stride, block_bytes)
    count = starts.shape[0]
    chunks = np.empty((count, CHUNK_COLUMNS), np.int64)
    first_slot = state[0]
    for c in range(count):
        slot = (first_slot + c) % slots
        chunks[c, Chunk.START] = starts[c]
        chunks[c, Chunk.COUNT] = (starts[c + 1] if c + 1 < count else n) - starts[c]
        chunks[c, Chunk.SLOT] = slot
        chunks[c, Chunk.FIRST_PIECE] = bounds[c]
        chunks[c, Chunk.END_PIECE] = bounds[c + 1]
        slot_address = staging + slot * slot_bytes
        for i in range(bounds[c], bounds[c + 1]):
            stage[i] += slot_address  # the offset inside the slot becomes the address
    state[0] = (first_slot + count) % slots
    return chunks, host, stage, width, rows


def schedule(host_ids: np.ndarray, per_chunk: int, direction: str, host_base: int, host_stride: int,
             block_bytes: int, staging: int, slot_bytes: int, state: np.ndarray, slots: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The plan of a staged transfer of the (validated, int64, non-empty) `host_ids`: (chunk table of `Chunk`
    columns, and the uint64 host addresses, staging addresses, widths and rows of every DMA piece, chunk by chunk).

    Chunks as `chunk_starts` cuts them, each through the next staging slot in rotation (`state[0]`, advanced past
    them; slot k at `staging + k * slot_bytes`), with one piece per run of consecutive host blocks inside the chunk
    (host block i at `host_base + i * host_stride`; a run is one row when that stride is `block_bytes`, else one
    row per block, see the module docstring). The compiled enqueue calls the same compiled function."""
    if per_chunk < 1 or direction not in ("d2h", "h2d") or host_ids.size == 0:
        raise ValueError(f"schedule needs ids, per_chunk >= 1 and direction 'd2h' or 'h2d', got {host_ids.size} ids, "
                         f"{per_chunk}, {direction!r}")
    return _schedule(host_ids, per_chunk, direction == "d2h", host_base, host_stride, block_bytes, staging,
                     slot_bytes, state, slots)


class HostRuns:
    """The runs of `host_ids` (int64, validated) cut at the chunk starts `chunk_starts` (increasing, the first 0), as
    uint64 arrays of host addresses, byte offsets inside a chunk's staging slot, widths and rows (see the module
    docstring); `chunk(i, slot_address)` gives chunk i's."""

    def __init__(self, host_ids: np.ndarray, chunk_starts: list[int], host_base: int, host_stride: int,
                 block_bytes: int):
        found = len(chunk_starts) and _find_runs(host_ids, np.asarray(chunk_starts, dtype=np.int64), host_base,
                                                 host_stride, block_bytes)
        if not found:
            raise ValueError(f"chunk_starts must increase from 0 and stay below {host_ids.size}, got {chunk_starts}")
        self.host, self.offset, self.width, self.rows, bounds = found
        self.bounds = bounds.tolist()

    def chunk(self, index: int, slot_address: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(host addresses, staging addresses, widths, rows) of chunk `index` staged in the slot at `slot_address`."""
        a, b = self.bounds[index], self.bounds[index + 1]
        return self.host[a:b], self.offset[a:b] + np.uint64(slot_address), self.width[a:b], self.rows[a:b]


def warm_up() -> None:
    """Compile (or load from numba's cache) the passes, so a first transfer does not pay for it."""
    HostRuns(np.arange(2, dtype=np.int64), chunk_starts(2, 1, "d2h"), 0, 1, 1)
    schedule(np.arange(2, dtype=np.int64), 1, "d2h", 0, 1, 1, 0, 1, np.zeros(2, dtype=np.int64), 2)
