"""The compiled enqueue of staged transfers (`kvbm.kernels.staged_enqueue`) against a stand-in driver, on the CPU.

The stand-ins have the driver's prototypes and record every call: uploaded ids, launch parameters (read back
through the parameter array, as the driver does) and batched-copy pieces. The tests check the pieces and launches
of every chunk against the Python path's own functions (`chunk_starts`, `HostRuns`), and the stream order with a
happens-before model of CUDA streams and events: each chunk's copy after its gather (offload) or its scatter after
its copy (onboard), a staging slot reused only after the chunk that last used it, every launch after the id upload,
everything after the caller's work and before the completion point. The engine's Python enqueue, run against
stand-ins of its lane, launches, events and batched copies, makes the very same calls in the same order. Byte-exact
runs on the GPU are in test_transfer_engine.py.
"""
from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from kvbm.kernels import staged_enqueue as se
from kvbm.kernels.copy_2d import COPY_2D
from kvbm.kernels.stream_events import RECORD, WAIT
from kvbm.kernels.host_runs import HostRuns, chunk_starts

KERNEL, DMA, DMA2, READY, GATHERED, SECOND, LANDED = 100, 101, 102, 103, 104, 105, 106
CALLER, STAGING, SLOT_BYTES, RING_DEVICE = 77, 1 << 40, 1 << 24, 1 << 41
SLOT_EVENTS, RING_EVENTS = [900, 901, 902], [800, 801, 802, 803]
RING_IDS = 512
STAGE_IDS, ATTRS, ATTRS_INDEX = 5 << 30, 42, 43
HOST_BASE, BLOCK_BYTES = 1 << 36, 4096
HOST_STRIDE = 3 * BLOCK_BYTES  # the host cache is a layer view: runs of consecutive blocks are 2-D copies
HOST_MEMORY, DEVICE_MEMORY = 1, 2  # CUmemorytype


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
            entry(se.LAUNCH, "launch", self._launch), entry(se.BATCH, "batch", self._batch), False,
            entry(COPY_2D, "copy2d", self._copy_2d))

    @staticmethod
    def _copy_2d(desc, stream):
        """(stream, dst, dst pitch, dst type, src, src pitch, src type, width, rows) of a CUDA_MEMCPY2D."""
        f = _read(desc, 16).tolist()
        src = f[3] if f[2] == HOST_MEMORY else f[4]
        dst = f[10] if f[9] == HOST_MEMORY else f[11]
        assert f[0] == f[1] == f[5] == f[7] == f[8] == f[12] == 0  # no offsets, no arrays
        return stream, dst, f[13], f[9], src, f[6], f[2], f[14], f[15]

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


def _row(columns, **values) -> np.ndarray:
    """A row of `columns` (an IntEnum) with every column given by name."""
    assert set(values) == set(columns.__members__), set(values) ^ set(columns.__members__)
    row = np.zeros(len(columns), dtype=np.int64)
    for name, value in values.items():
        row[columns[name]] = value
    return row


def _tables(per_chunk: int, tiles: int, min_split: int, slot_bytes: int = SLOT_BYTES):
    lane = _row(se.Lane, KERNEL_STREAM=KERNEL, DMA_STREAM=DMA, SECOND_DMA_STREAM=DMA2, READY=READY, GATHERED=GATHERED,
                SECOND_LANDED=SECOND, LANDED=LANDED, STAGING=STAGING, SLOT_BYTES=slot_bytes, RING_DEVICE=RING_DEVICE,
                RING_SLOT_BYTES=8 * RING_IDS)
    rows = np.stack([_row(se.Launch, FUNCTION=7000 + slot, THREADS=128, SHARED=0, NUM_PARAMS=9, TILES_PER_PAIR=tiles,
                          SRC_BASE=11 + slot, DST_BASE=21 + slot, SRC_OFFSETS=31 + slot, DST_OFFSETS=41 + slot)
                     for slot in range(len(SLOT_EVENTS))])
    pair = _row(se.Pair, HOST_BASE=HOST_BASE, HOST_STRIDE=HOST_STRIDE, BLOCK_BYTES=BLOCK_BYTES, PER_CHUNK=per_chunk,
                STAGE_IDS=STAGE_IDS, ATTRS=ATTRS, ATTRS_INDEX=ATTRS_INDEX, MIN_PIECES_TO_SPLIT=min_split)
    return lane, rows, pair


def _run(driver, d2h: bool, gpu_ids, host_ids, per_chunk=8, tiles=3, min_split=4, max_ctas=-1, state=(1, 2),
         slot_bytes=SLOT_BYTES):
    fake, enqueue = driver
    fake.log.clear()
    lane, rows, pair = _tables(per_chunk, tiles, min_split, slot_bytes)
    state = np.array(state, dtype=np.int64)
    ring_host = np.zeros((len(RING_EVENTS), RING_IDS), dtype=np.int64)
    result = enqueue(d2h, gpu_ids, host_ids, CALLER, lane, np.array(SLOT_EVENTS, dtype=np.int64),
                     np.array(RING_EVENTS, dtype=np.int64), ring_host, state, rows, pair[None, :],
                     np.zeros(1, dtype=np.int64), max_ctas)
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
        elif kind in ("htod", "launch", "batch", "copy2d"):
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

    runs_found = HostRuns(host_ids, starts, HOST_BASE, HOST_STRIDE, BLOCK_BYTES)
    copies = [c for c in log if c[0] in ("batch", "copy2d")]
    got = iter(copies)
    per_chunk_copies = []
    for k, slot in enumerate(slots):
        hosts, stage, widths, rows = runs_found.chunk(k, STAGING + slot * SLOT_BYTES)
        one = rows == 1
        singles = int(one.sum())
        want = (hosts[one], stage[one]) if d2h else (stage[one], hosts[one])
        count, pieces = 0, []
        while count < singles:
            b = next(got)
            assert b[0] == "batch" and b[5:] == (ATTRS, ATTRS_INDEX, 1)
            pieces.append(b)
            count += b[2].size
        assert [p[1] for p in pieces] == ([DMA, DMA2] if singles >= 4 else [DMA] if singles else [])
        for i, want_array in enumerate((*want, widths[one])):
            got_array = np.concatenate([p[2 + i] for p in pieces]) if pieces else np.zeros(0)
            assert got_array.astype(np.uint64).tolist() == want_array.tolist()
        two = singles >= 4 or (~one).sum() > 1
        queued = [int(widths[one][:(singles + 1) // 2].sum()), int(widths[one][(singles + 1) // 2:].sum())] \
            if singles >= 4 else [int(widths[one].sum()), 0]
        for h, st, w, r in zip(hosts[~one].tolist(), stage[~one].tolist(), widths[~one].tolist(), rows[~one].tolist()):
            c = next(got)
            host_side, stage_side = (h, HOST_STRIDE, HOST_MEMORY), (st, BLOCK_BYTES, DEVICE_MEMORY)
            k2 = 1 if two and queued[1] < queued[0] else 0  # the stream with fewer bytes queued
            assert c == ("copy2d", (DMA, DMA2)[k2], *((host_side + stage_side) if d2h else (stage_side + host_side)),
                         w, r)
            assert w == BLOCK_BYTES and r > 1
            queued[k2] += w * r
        per_chunk_copies.append(len(pieces) + int((~one).sum()))

    ops, past = _happens_before(log)
    upload_index = log.index(uploads[0])
    for index, call, before in ops:
        assert -1 in before, f"{call[0]} not ordered after the caller's work"
        if call[0] == "launch":
            assert upload_index in before
    launch_at = [i for i, c, _ in ops if c[0] == "launch"]
    batch_ops = [(i, b) for i, c, b in ops if c[0] in ("batch", "copy2d")]
    chunk_batches, it = [], iter(batch_ops)
    for k in range(len(starts)):
        chunk_batches.append([next(it) for _ in range(per_chunk_copies[k])])
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


@pytest.mark.parametrize("runs", [False, True])
@pytest.mark.parametrize("d2h", [True, False])
def test_a_failed_driver_call_stops_the_enqueue_and_names_its_step(driver, d2h, runs):
    fake, _ = driver
    gpu_ids, host_ids = _ids(np.random.default_rng(9), 30, runs)
    _, full, _, _ = _run(driver, d2h, gpu_ids, host_ids)
    assert any(c[0] == "copy2d" for c in full) == runs
    step_of = {"record": 0, "wait": 1, "sync": 2, "htod": 3, "launch": 4, "batch": 5, "copy2d": 6}
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
    assert row.tolist() == _row(se.Launch, FUNCTION=1234, THREADS=128, SHARED=0, NUM_PARAMS=len(sizes), TILES_PER_PAIR=6,
                                SRC_BASE=1, DST_BASE=2, SRC_OFFSETS=3, DST_OFFSETS=4).tolist()


def _normalized(log: list[tuple], tiles: int) -> list[tuple]:
    """A compiled enqueue's log as the Python path's stand-ins write theirs: the id-ring waits left out (the Python
    ring waits on its torch events), a launch as (stream, staging slot, src ids, dst ids, blocks)."""
    out = []
    for call in log:
        if call[0] == "record":
            out.append(("record", call[1], call[2]))
        elif call[0] == "wait":
            out.append(("wait", call[1], call[2]))
        elif call[0] == "htod":
            out.append(("htod", call[1], call[2], call[3].tolist()))
        elif call[0] == "launch":
            _, stream, function, grid, _, _, values, _ = call
            out.append(("launch", stream, function - 7000, values[4], values[5], values[6] // tiles))
        elif call[0] == "batch":
            out.append(("batch", call[1], *(a.astype(np.uint64).tolist() for a in call[2:5])))
        elif call[0] == "copy2d":
            out.append(tuple(call))
    return out


def _python_path(monkeypatch, d2h: bool, gpu_ids, host_ids, per_chunk: int, state) -> tuple[list[tuple], np.ndarray]:
    """The engine's Python enqueue (`TransferEngine._staged`) of the same transfer as `_run`, against stand-ins of
    its lane, kernel launches, events and batched copies: (log, lane state after)."""
    import torch

    from kvbm.kernels import transfer
    from kvbm.kernels.device_pointer import DevicePointer
    from kvbm.layouts import KVGeometry, allocate

    log: list[tuple] = []
    monkeypatch.setattr(transfer, "MIN_PIECES_TO_SPLIT", 4)
    monkeypatch.setattr(transfer.events, "record", lambda event, stream: log.append(("record", event, stream)))
    monkeypatch.setattr(transfer.events, "wait", lambda stream, event: log.append(("wait", stream, event)))
    monkeypatch.setattr(transfer, "build_plan", lambda a, b: (a, b))

    def launch(plan, src_ids, dst_ids, num_blocks, max_ctas, stream):
        slot = next(side for side in plan if isinstance(side, int))  # the staging stand-in is its slot
        log.append(("launch", stream, slot, src_ids.data_ptr(), dst_ids.data_ptr(), num_blocks))

    monkeypatch.setattr(transfer, "_triton_copy", lambda: SimpleNamespace(launch=launch))

    class Ring:
        def upload(self, ids, stream):
            k = int(lane.state[1])
            lane.state[1] = (k + 1) % len(RING_EVENTS)
            address = RING_DEVICE + k * 8 * RING_IDS
            log.append(("htod", stream, address, ids.tolist()))
            log.append(("record", RING_EVENTS[k], stream))
            return DevicePointer(address, torch.int64)

    lane = SimpleNamespace(
        kernel_stream=KERNEL, kernel_handle=KERNEL, dma_handles=(DMA, DMA2), dma_streams=(DMA, DMA2), ready=READY,
        gathered=GATHERED, second_landed=SECOND, landed=LANDED, slot_done=np.array(SLOT_EVENTS, dtype=np.int64),
        staging_address=STAGING, slot_bytes=per_chunk * BLOCK_BYTES, state=np.array(state, dtype=np.int64),
        ids=Ring(), stage_ids=lambda n: DevicePointer(STAGE_IDS, torch.int64),
        staging_cache=lambda host, slot: slot)
    engine = object.__new__(transfer.TransferEngine)  # no GPU: only the methods of the enqueue
    engine._dma_pieces = lambda dsts, srcs, sizes, stream, direction: log.append(
        ("batch", stream, *(np.asarray(a, dtype=np.uint64).tolist() for a in (dsts, srcs, sizes))))
    engine._finish = lambda stream: ("done", stream)
    monkeypatch.setattr(transfer, "memcpy_2d_async", lambda *args: log.append(("copy2d", args[-1], *args[:-1])))

    g = KVGeometry(num_layers=2, num_kv=2, block_size=4, num_heads=8, head_dim=16, itemsize=2)
    assert g.block_bytes == BLOCK_BYTES
    host = SimpleNamespace(first_piece_address=lambda: HOST_BASE, geometry=g,
                           layout=SimpleNamespace(stride={"block": HOST_STRIDE // g.itemsize}))
    gpu = allocate("vllm_flash_attn_nhd", g, 1, dtype=torch.float16)
    events_record = transfer.events.record
    events_record(READY, CALLER)  # as `_begin` does before the staged enqueue
    src, dst, s, d = (gpu, host, gpu_ids, host_ids) if d2h else (host, gpu, host_ids, gpu_ids)
    steps = engine._staged(src, dst, s, d, lane, "d2h" if d2h else "h2d")
    with pytest.raises(StopIteration) as finished:
        while True:
            next(steps)
    assert finished.value.value == ("done", DMA if d2h else KERNEL)
    return log, lane.state


@pytest.mark.parametrize("d2h", [True, False])
@pytest.mark.parametrize("n,runs", [(1, False), (7, True), (9, True), (30, False), (45, True)])
def test_python_and_compiled_enqueues_execute_the_same_schedule(driver, monkeypatch, d2h, n, runs):
    """The Python enqueue and the compiled one make the same calls in the same order: the same chunks through the
    same staging slots, the same DMA pieces, id uploads, launches, streams and events."""
    gpu_ids, host_ids = _ids(np.random.default_rng(n + 7 * d2h), n, runs)
    result, log, _, state = _run(driver, d2h, gpu_ids, host_ids, per_chunk=8, tiles=3, state=(2, 1),
                                 slot_bytes=8 * BLOCK_BYTES)
    assert result == (0, -1)
    python_log, python_state = _python_path(monkeypatch, d2h, gpu_ids, host_ids, 8, (2, 1))
    assert python_log == _normalized(log, 3)
    assert any(c[0] == "copy2d" for c in python_log) == runs  # runs of the layer view go as 2-D copies
    assert python_state.tolist() == state.tolist()


@pytest.mark.parametrize("d2h", [False, True])
@pytest.mark.parametrize("runs", [False, True])
def test_groups_are_the_single_transfers_in_order_with_one_upload_and_an_event_each(driver, d2h, runs):
    """Several transfers of the same ids (a layer-wise load's layer groups: each group its own host view, kernels
    and chunking) in one call: each group's chunks, pieces and launches are those of that group enqueued alone, in
    order; the caller's stream is recorded and the ids uploaded once; group g's event is recorded after all of
    group g's operations (and the earlier groups'), and before any of the next group's."""
    fake, enqueue = driver
    gpu_ids, host_ids = _ids(np.random.default_rng(11 + runs), 21, runs)
    groups = [(8, 3, 0), (4, 5, 1 << 20), (2, 2, 2 << 20)]  # (blocks per chunk, tiles per block, host offset)
    lane = None
    rows, pairs = [], []
    for g, (per_chunk, tiles, offset) in enumerate(groups):
        lane, group_rows, pair = _tables(per_chunk, tiles, 4)
        group_rows[:, se.Launch.FUNCTION] += 100 * g
        pair[se.Pair.HOST_BASE] += offset
        rows.append(group_rows)
        pairs.append(pair)
    marks = np.array([600, 601, 602], dtype=np.int64)
    state = np.array((1, 2), dtype=np.int64)
    ring_host = np.zeros((len(RING_EVENTS), RING_IDS), dtype=np.int64)
    fake.log.clear()
    result = enqueue(d2h, gpu_ids, host_ids, CALLER, lane, np.array(SLOT_EVENTS, dtype=np.int64),
                     np.array(RING_EVENTS, dtype=np.int64), ring_host, state, np.concatenate(rows), np.stack(pairs),
                     marks, -1)
    assert tuple(result) == (0, -1)
    log = list(fake.log)
    assert [c for c in log if c[0] == "record" and c[2] == CALLER] == [("record", READY, CALLER)]
    uploads = [c for c in log if c[0] == "htod"]
    assert len(uploads) == 1 and uploads[0][3].tolist() == gpu_ids.tolist()

    # each group as the single-transfer enqueue of its tables makes it, from the state the earlier groups left
    expected_state, expected_ops = (1, 2), []
    for g, (per_chunk, tiles, offset) in enumerate(groups):
        alone_lane, alone_rows, alone_pair = _tables(per_chunk, tiles, 4)
        alone_rows[:, se.Launch.FUNCTION] += 100 * g
        alone_pair[se.Pair.HOST_BASE] += offset
        fake.log.clear()
        alone_state = np.array(expected_state, dtype=np.int64)
        enqueue(d2h, gpu_ids, host_ids, CALLER, alone_lane, np.array(SLOT_EVENTS, dtype=np.int64),
                np.array(RING_EVENTS, dtype=np.int64), np.zeros_like(ring_host), alone_state, alone_rows,
                alone_pair[None, :], np.zeros(1, dtype=np.int64), -1)
        ops = [c for c in fake.log if c[0] in ("launch", "batch", "copy2d")]
        expected_ops.append([_comparable(c, uploads[0][2], ids_address=_upload_address(fake.log)) for c in ops])
        expected_state = (int(alone_state[0]), 2)
    assert int(state[0]) == expected_state[0] and int(state[1]) == 3  # one id-ring slot taken
    ops = [(i, c) for i, c in enumerate(log) if c[0] in ("launch", "batch", "copy2d")]
    got = [_comparable(c, uploads[0][2]) for _, c in ops]
    assert got == [op for group in expected_ops for op in group]

    # group events: recorded in order on the completion stream, after their group's operations
    mark_records = [i for i, c in enumerate(log) if c[0] == "record" and c[1] in marks.tolist()]
    assert [log[i][1:] for i in mark_records] == [(m, DMA if d2h else KERNEL) for m in marks.tolist()]
    recorded_past = _record_pasts(log)
    counts = [len(group) for group in expected_ops]
    assert all(counts)
    bounds = np.cumsum([0] + counts)
    for g, at in enumerate(mark_records):
        mine = [i for i, _ in ops[bounds[g]:bounds[g + 1]]]
        earlier = [i for i, _ in ops[:bounds[g]]]
        assert set(mine + earlier) <= recorded_past[at], f"group {g}'s event before its work"
        assert all(i > at for i, _ in ops[bounds[g + 1]:]), f"group {g + 1} enqueued before group {g}'s event"


def _upload_address(log: list[tuple]) -> int:
    return next(c[2] for c in log if c[0] == "htod")


def _comparable(call: tuple, upload_address: int, ids_address: int | None = None) -> tuple:
    """A launch, batch or 2-D copy with the uploaded ids' address made relative (each enqueue uploads to its own
    ring slot)."""
    if call[0] == "launch":
        _, stream, function, grid, block, shared, values, extra = call
        base = upload_address if ids_address is None else ids_address
        values = [v - base if k in (4, 5) and v != STAGE_IDS else v for k, v in enumerate(values)]
        return ("launch", stream, function, grid, block, shared, tuple(values))
    if call[0] == "batch":
        return ("batch", call[1], *(a.tolist() for a in call[2:5]), *call[5:])
    return tuple(call)


def _record_pasts(log: list[tuple]) -> dict[int, set[int]]:
    """For each record call (by log index), the operations its event captured (`_happens_before`'s model)."""
    past: dict[int, set[int]] = {CALLER: {-1}}
    recorded: dict[int, set[int]] = {}
    captured: dict[int, set[int]] = {}
    for index, call in enumerate(log):
        if call[0] == "record":
            recorded[call[1]] = captured[index] = set(past.get(call[2], set()))
        elif call[0] == "wait":
            past.setdefault(call[1], set()).update(recorded.get(call[2], set()))
        elif call[0] in ("htod", "launch", "batch", "copy2d"):
            past.setdefault(call[1], set()).add(index)
    return captured
