"""The compiled enqueue of staged transfers (`kvbm.kernels.staged_enqueue`) against a stand-in driver, on the CPU.

The stand-ins have the driver's prototypes and record every call: uploaded ids, launch parameters (read back
through the parameter array, as the driver does) and batched-copy pieces. The tests check the pieces and launches
of every chunk against the Python path's own functions (`chunk_starts`, `HostRuns`), and the stream order with a
happens-before model of CUDA streams and events: each chunk's copy after its gather (offload) or its scatter after
its copy (onboard), a staging slot reused only after the chunk that last used it, every launch after the id upload,
everything after the caller's work and before the completion point. Byte-exact runs on the GPU are in
test_transfer_engine.py.
"""
from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from kvbm.kernels import staged_enqueue as se
from kvbm.kernels.stream_events import RECORD, WAIT
from kvbm.kernels.host_runs import HostRuns, chunk_starts

KERNEL, DMA, DMA2, READY, GATHERED, SECOND, LANDED = 100, 101, 102, 103, 104, 105, 106
CALLER, STAGING, SLOT_BYTES, RING_DEVICE = 77, 1 << 40, 1 << 24, 1 << 41
SLOT_EVENTS, RING_EVENTS = [900, 901, 902], [800, 801, 802, 803]
RING_IDS = 512
STAGE_IDS, ATTRS, ATTRS_INDEX = 5 << 30, 42, 43
HOST_BASE, BLOCK_BYTES = 1 << 36, 4096


class FakeDriver:
    """Stand-ins for the driver entry points that log each call; call number `fail_at` returns error 700."""

    def __init__(self):
        self.log: list[tuple] = []
        self.fail_at: int | None = None

        def entry(proto, name, read=None):
            def call(*args):
                if self.fail_at is not None and len(self.log) == self.fail_at:
                    self.log.append(("failed", name))
                    return 700
                self.log.append((name, *(read(*args) if read else args)))
                return 0
            return proto(call)

        self.calls = se.DriverCalls(
            entry(RECORD, "record"), entry(WAIT, "wait"), entry(se.SYNC, "sync"),
            entry(se.HTOD, "htod", lambda dst, src, n, stream: (stream, dst, _read(src, n // 8))),
            entry(se.LAUNCH, "launch", self._launch), entry(se.BATCH, "batch", self._batch), False)

    @staticmethod
    def _launch(function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        pointers = _read(params, se._RUNTIME_PARAMS + 2)
        values = [int(_read(int(p), 1)[0]) for p in pointers]
        values[6] &= 0xFFFFFFFF  # the int32 tile count: the low half of its slot
        return stream, function, (gx, gy, gz), (bx, by, bz), shared, values, extra

    @staticmethod
    def _batch(dsts, srcs, sizes, count, attrs, attrs_index, num_attrs, stream):
        return stream, _read(dsts, count), _read(srcs, count), _read(sizes, count), attrs, attrs_index, num_attrs


def _read(address: int, count: int) -> np.ndarray:
    return np.frombuffer(ctypes.string_at(address, 8 * count), dtype=np.int64).copy()


@pytest.fixture(scope="module")
def driver() -> tuple[FakeDriver, object]:
    fake = FakeDriver()
    enqueue = se.build(fake.calls)
    enqueue.compile(se.SIGNATURE)
    return fake, enqueue


def _tables(per_chunk: int, tiles: int, min_split: int):
    lane = np.zeros(se.LANE_LEN, dtype=np.int64)
    lane[[se.KERNEL_STREAM, se.DMA_STREAM, se.SECOND_DMA_STREAM, se.READY, se.GATHERED, se.SECOND_LANDED,
          se.LANDED, se.STAGING, se.SLOT_BYTES, se.RING_DEVICE, se.RING_SLOT_BYTES]] = (
        KERNEL, DMA, DMA2, READY, GATHERED, SECOND, LANDED, STAGING, SLOT_BYTES, RING_DEVICE, 8 * RING_IDS)
    rows = np.zeros((len(SLOT_EVENTS), se.ROW_LEN), dtype=np.int64)
    for slot in range(len(SLOT_EVENTS)):
        rows[slot] = (7000 + slot, 128, 0, 9, tiles, 11 + slot, 21 + slot, 31 + slot, 41 + slot)
    pair = np.array([HOST_BASE, 3 * BLOCK_BYTES, BLOCK_BYTES, per_chunk, STAGE_IDS, ATTRS, ATTRS_INDEX, min_split],
                    dtype=np.int64)
    return lane, rows, pair


def _run(driver, d2h: bool, gpu_ids, host_ids, per_chunk=8, tiles=3, min_split=4, max_ctas=-1, state=(1, 2)):
    fake, enqueue = driver
    fake.log.clear()
    lane, rows, pair = _tables(per_chunk, tiles, min_split)
    state = np.array(state, dtype=np.int64)
    ring_host = np.zeros((len(RING_EVENTS), RING_IDS), dtype=np.int64)
    result = enqueue(d2h, gpu_ids, host_ids, CALLER, lane, np.array(SLOT_EVENTS, dtype=np.int64),
                     np.array(RING_EVENTS, dtype=np.int64), ring_host, state, rows, pair, max_ctas)
    return tuple(result), list(fake.log), rows, state


def _ids(rng, n: int, runs: bool) -> tuple[np.ndarray, np.ndarray]:
    gpu = rng.choice(4 * n + 8, n, replace=False).astype(np.int64)
    host = np.arange(n, dtype=np.int64) + 5 if runs else rng.choice(4 * n + 8, n, replace=False).astype(np.int64)
    if runs:  # runs of consecutive host blocks, cut in a few places
        for cut in rng.choice(n, min(n, 4), replace=False):
            host[cut:] += 3
    return gpu, host


def _happens_before(log: list[tuple]) -> tuple[list[tuple[int, tuple, set[int]]], dict[int, set[int]]]:
    """(index, call, indices of the calls it is ordered after) for every enqueued GPU operation, and each stream's
    past at the end, from stream and event semantics: an operation follows everything before it on its stream; a
    record captures its stream's past; a wait adds the captured past to its stream. Index -1 stands for the caller's
    work before the transfer."""
    past: dict[int, set[int]] = {CALLER: {-1}}
    recorded: dict[int, set[int]] = {}
    ops = []
    for index, call in enumerate(log):
        kind = call[0]
        if kind == "record":
            recorded[call[1]] = set(past.get(call[2], set()))
        elif kind == "wait":
            past.setdefault(call[1], set()).update(recorded.get(call[2], set()))
        elif kind in ("htod", "launch", "batch"):
            stream = call[1]
            ops.append((index, call, set(past.get(stream, set()))))
            past.setdefault(stream, set()).add(index)
    return ops, past


@pytest.mark.parametrize("d2h", [True, False])
@pytest.mark.parametrize("n,runs", [(1, False), (7, True), (8, False), (9, True), (30, False), (45, True)])
def test_enqueue_pieces_launches_and_order_match_the_python_path(driver, d2h, n, runs):
    rng = np.random.default_rng(n + 100 * d2h)
    gpu_ids, host_ids = _ids(rng, n, runs)
    per_chunk, tiles = 8, 3
    result, log, rows, state = _run(driver, d2h, gpu_ids, host_ids, per_chunk=per_chunk, tiles=tiles)
    assert result == (0, -1)
    starts = chunk_starts(n, per_chunk, "d2h" if d2h else "h2d")
    ends = starts[1:] + [n]
    slots = [(1 + k) % len(SLOT_EVENTS) for k in range(len(starts))]
    assert state.tolist() == [(1 + len(starts)) % len(SLOT_EVENTS), 3]

    uploads = [c for c in log if c[0] == "htod"]
    assert len(uploads) == 1 and uploads[0][1] == KERNEL and uploads[0][2] == RING_DEVICE + 2 * 8 * RING_IDS
    assert uploads[0][3].tolist() == gpu_ids.tolist()
    ids_device = uploads[0][2]
    assert ("sync", RING_EVENTS[2]) in log[:log.index(uploads[0])]

    launches = [c for c in log if c[0] == "launch"]
    assert len(launches) == len(starts)
    for (_, stream, function, grid, block, shared, values, extra), start, end, slot in zip(
            launches, starts, ends, slots):
        m = end - start
        gpu_side, staging_side = ids_device + 8 * start, STAGE_IDS
        assert stream == KERNEL and function == 7000 + slot and grid == (m * tiles, 1, 1) and block == (128, 1, 1)
        assert values == [11 + slot, 21 + slot, 31 + slot, 41 + slot,
                          *((gpu_side, staging_side) if d2h else (staging_side, gpu_side)), m * tiles, 0, 0]

    runs_found = HostRuns(host_ids, starts, HOST_BASE, 3 * BLOCK_BYTES, BLOCK_BYTES)
    batches = [c for c in log if c[0] == "batch"]
    got = iter(batches)
    for k, slot in enumerate(slots):
        hosts, stage, sizes = runs_found.chunk(k, STAGING + slot * SLOT_BYTES)
        want = (hosts, stage) if d2h else (stage, hosts)
        count, pieces = 0, []
        while count < hosts.size:
            b = next(got)
            assert b[5:] == (ATTRS, ATTRS_INDEX, 1)
            pieces.append(b)
            count += b[2].size
        assert [p[1] for p in pieces] == ([DMA, DMA2] if hosts.size >= 4 else [DMA])
        for i, want_array in enumerate((*want, sizes)):
            assert np.concatenate([p[2 + i] for p in pieces]).astype(np.uint64).tolist() == want_array.tolist()

    ops, past = _happens_before(log)
    upload_index = log.index(uploads[0])
    for index, call, before in ops:
        assert -1 in before, f"{call[0]} not ordered after the caller's work"
        if call[0] == "launch":
            assert upload_index in before
    launch_at = [i for i, c, _ in ops if c[0] == "launch"]
    batch_ops = [(i, b) for i, c, b in ops if c[0] == "batch"]
    chunk_batches, it = [], iter(batch_ops)
    for k in range(len(starts)):
        pieces = runs_found.chunk(k, 0)[0].size
        chunk_batches.append([next(it) for _ in range(2 if pieces >= 4 else 1)])
    for k in range(len(starts)):
        if d2h:  # the chunk's copies after its gather
            assert all(launch_at[k] in b for _, b in chunk_batches[k])
        else:  # its scatter after its copies
            launch_before = next(b for i, c, b in ops if i == launch_at[k])
            assert all(i in launch_before for i, _ in chunk_batches[k])
        previous = [j for j in range(k) if slots[j] == slots[k]]
        if previous:  # the slot's earlier user is done with it
            j = previous[-1]
            first_use = launch_at[k] if d2h else chunk_batches[k][0][0]
            first_before = next(b for i, c, b in ops if i == first_use)
            last_uses = [i for i, _ in chunk_batches[j]] if d2h else [launch_at[j]]
            assert all(i in first_before for i in last_uses)
    completion = past[DMA if d2h else KERNEL]
    assert all(i in completion for i, _, _ in ops), "an operation is not ordered before the completion point"


def test_enqueue_caps_the_grid_at_max_ctas(driver):
    gpu_ids, host_ids = _ids(np.random.default_rng(3), 20, False)
    _, log, _, _ = _run(driver, True, gpu_ids, host_ids, per_chunk=8, tiles=5, max_ctas=7)
    grids = [c[3][0] for c in log if c[0] == "launch"]
    sizes = np.diff(chunk_starts(20, 8, "d2h") + [20])
    assert grids == [min(7, m * 5) for m in sizes]


@pytest.mark.parametrize("d2h", [True, False])
def test_a_failed_driver_call_stops_the_enqueue_and_names_its_step(driver, d2h):
    fake, _ = driver
    gpu_ids, host_ids = _ids(np.random.default_rng(9), 30, False)
    _, full, _, _ = _run(driver, d2h, gpu_ids, host_ids)
    step_of = {"record": 0, "wait": 1, "sync": 2, "htod": 3, "launch": 4, "batch": 5}
    try:
        for fail_at in range(len(full)):
            fake.fail_at = fail_at
            result, log, _, _ = _run(driver, d2h, gpu_ids, host_ids)
            assert result == (700, step_of[full[fail_at][0]])
            assert repr(log[:-1]) == repr(full[:fail_at]) and log[-1] == ("failed", full[fail_at][0])
    finally:
        fake.fail_at = None
    with pytest.raises(se.CudaError, match="cuLaunchKernel"):
        se.raise_failure(700, 4)


class _FakeKernel:
    def __init__(self, **meta):
        self.metadata = SimpleNamespace(**{"num_ctas": 1, "num_warps": 4, "shared": 0, **meta})
        self.function = None

    @property
    def run(self):
        self.function = 1234
        return None


@pytest.mark.parametrize("sizes,meta,accepted", [
    ([8] * 6 + [4] + [8, 8], {}, True),
    ([8] * 6 + [4], {}, True),
    ([8] * 6 + [8] + [8, 8], {}, False),  # a 64-bit tile count
    ([8] * 6 + [4] + [8, 8, 8], {}, False),  # a parameter more than the scratch pointers
    ([8] * 5 + [4], {}, False),
    ([8] * 6 + [4] + [8, 8], {"num_ctas": 2}, False),
    ([8] * 6 + [4] + [8, 8], {"global_scratch_size": 64}, False),
    ([8] * 6 + [4] + [8, 8], {"launch_pdl": True}, False),
])
def test_launch_row_takes_only_kernels_whose_parameters_it_knows(monkeypatch, sizes, meta, accepted):
    def info(function, index, offset, size):
        if function != 1234 or index >= len(sizes):
            return 1
        size._obj.value = sizes[index]
        return 0

    monkeypatch.setattr(se, "_param_info", lambda: info)
    row = se.launch_row(_FakeKernel(**meta), 6, (1, 2, 3, 4))
    if not accepted:
        assert row is None
        return
    assert row.tolist() == [1234, 128, 0, len(sizes), 6, 1, 2, 3, 4]
