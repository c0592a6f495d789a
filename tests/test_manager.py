"""BlockManager standalone use on CPU: offload, lookup, onboard, byte-exact through G2 and through G3 (real files)."""
from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import urllib.request

import numpy as np
import pytest

from kvbm.config import KvbmConfig, KvbmConfigError
from kvbm.policies.admission import DiskAdmissionFilter
from kvbm.hashing import salt_hash, sequence_hashes
from kvbm.manager import BlockManager, BlockResult, Match
from kvbm.metrics import KvbmMetrics
from manager_testkit import GEOM, GEOM_PADDED, POISON, config, delay_completions, make_gpu, poison_block, read_block

OK, FAILED, SKIPPED = BlockResult.OK, BlockResult.FAILED, BlockResult.SKIPPED


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(abs(hash(request.node.name)) % (2**32))


def tokens(rng: np.random.Generator, n_blocks: int, extra: int = 0) -> list[int]:
    return rng.integers(0, 50_000, n_blocks * GEOM.block_size + extra).tolist()


def hist_count(metrics: KvbmMetrics, direction: str) -> float:
    return metrics.registry.get_sample_value("kvbm_transfer_seconds_count", {"direction": direction})


def test_round_trip_through_host_tier(rng):
    gpu = make_gpu(32, rng)
    with BlockManager(gpu, config(host=16)) as mgr:
        hashes = mgr.sequence_hashes(tokens(rng, 6))
        src_ids = [3, 7, 1, 12, 5, 9]
        want = [read_block(gpu, b) for b in src_ids]
        ticket = mgr.offload(hashes, src_ids)
        assert ticket in mgr.poll() and ticket.results == [OK] * 6
        mgr.check_invariants()
        # a full match does not report the last block: the engine computes at least one token
        assert mgr.lookup(hashes) == Match(5, 5, 0)
        dst_ids = [20, 21, 30, 22, 25, 24]
        for b in dst_ids:
            poison_block(gpu, b)
        ticket = mgr.onboard(hashes[:5], dst_ids[:5])
        mgr.wait(ticket)
        assert ticket.done and ticket.results == [OK] * 5
        for i in range(5):
            assert read_block(gpu, dst_ids[i]) == want[i]
        assert read_block(gpu, dst_ids[5]) == bytes([POISON]) * GEOM.block_bytes
        mgr.check_invariants()
        m = mgr.metrics
        assert m.value("kvbm_offload_blocks_d2h") == 6 and m.value("kvbm_onboard_blocks_h2d") == 5
        assert m.value("kvbm_transfer_bytes", "g1_to_g2") == 6 * GEOM.block_bytes
        assert m.value("kvbm_matched_tokens") == 5 * GEOM.block_size
        assert m.value("kvbm_host_cache_hit_rate") == pytest.approx(5 / 6)


@pytest.mark.parametrize("geometry", [GEOM, GEOM_PADDED], ids=["aligned", "padded"])
def test_round_trip_through_disk_tier(tmp_path, rng, geometry):
    gpu = make_gpu(32, rng, geometry)
    cfg = config(tmp_path, host=3, disk=16, disable_disk_offload_filter=True, max_transfer_batch_size=4)
    mgr = BlockManager(gpu, cfg)
    # the file has no name where the filesystem allows it (O_TMPFILE): its size is read through the descriptor
    assert os.path.getsize(mgr.store.cache("G3").file.path) == 16 * 4096  # slots padded to 4 KiB
    toks = rng.integers(0, 50_000, 10 * geometry.block_size).tolist()
    hashes = mgr.sequence_hashes(toks)
    want = {b: read_block(gpu, b) for b in range(10)}
    ticket = mgr.offload(hashes, list(range(10)))
    mgr.wait()
    assert ticket.results == [OK] * 10
    mgr.check_invariants()
    # G2 holds only the last 3 blocks; every block went down to G3 (filter disabled) before being evicted
    assert mgr.lookup(hashes) == Match(9, 0, 9)
    assert mgr.metrics.value("kvbm_offload_blocks_h2d") == 10
    dst = list(range(16, 26))
    for b in dst:
        poison_block(gpu, b)
    ticket = mgr.onboard(hashes, dst)
    mgr.wait(ticket)
    assert ticket.results == [OK] * 10
    for i in range(10):
        assert read_block(gpu, dst[i]) == want[i], f"block {i}"
    assert mgr.metrics.value("kvbm_onboard_blocks_d2d") == 7
    assert mgr.metrics.value("kvbm_onboard_blocks_h2d") == 3
    mgr.check_invariants()
    mgr.close()
    assert list(tmp_path.glob("kvbm-g3-*")) == []  # clean shutdown removes the disk file
    mgr.close()  # idempotent


def test_disk_io_runs_on_the_disk_threads_and_poll_never_waits_for_it(tmp_path, rng):
    gpu = make_gpu(16, rng)
    with BlockManager(gpu, config(tmp_path, disk=8, max_transfer_batch_size=4)) as mgr:  # disk-only: G1 -> G3
        hashes = mgr.sequence_hashes(tokens(rng, 4))
        want = [read_block(gpu, b) for b in range(4)]
        threads: list[str] = []
        release = threading.Event()
        real_write, real_read = mgr.store.cache("G3").file.write_slots, mgr.store.cache("G3").file.read_slots

        def slow(real):
            def io(*args, **kwargs):
                threads.append(threading.current_thread().name)
                assert release.wait(10), "the test never released the disk"
                return real(*args, **kwargs)
            return io

        mgr.store.cache("G3").file.write_slots, mgr.store.cache("G3").file.read_slots = slow(real_write), slow(real_read)
        ticket = mgr.offload(hashes, range(4))
        assert mgr.poll() == [] and not ticket.done  # the write is blocked on the disk thread, poll returns
        assert mgr.lookup(hashes, num_tokens=99) == Match(0, 0, 0)  # G3 slots stay pending until it lands
        mgr.check_invariants()
        release.set()
        mgr.wait()
        assert ticket.results == [OK] * 4
        release.clear()
        for b in range(8, 12):
            poison_block(gpu, b)
        ticket = mgr.onboard(hashes, range(8, 12))
        assert mgr.poll() == [] and not ticket.done  # the read is blocked on the disk thread
        assert all(read_block(gpu, b) == bytes([POISON]) * GEOM.block_bytes for b in range(8, 12))
        release.set()
        mgr.wait(ticket)
        assert ticket.results == [OK] * 4 and [read_block(gpu, b) for b in range(8, 12)] == want
        assert threads and all(name.startswith("kvbm-disk") for name in threads), threads
        mgr.check_invariants()


def test_disk_only_mode_goes_straight_to_disk(tmp_path, rng):
    gpu = make_gpu(16, rng)
    with BlockManager(gpu, config(tmp_path, disk=8, max_transfer_batch_size=2)) as mgr:
        assert mgr.index.tier_names == ["G3"] and mgr.config.disk_only
        hashes = mgr.sequence_hashes(tokens(rng, 5, extra=1))
        want = [read_block(gpu, b) for b in range(5)]
        ticket = mgr.offload(hashes, range(5))
        mgr.wait()
        assert ticket.results == [OK] * 5
        assert mgr.metrics.value("kvbm_offload_blocks_d2d") == 5
        assert hist_count(mgr.metrics, "g1_to_g3") == 3  # batches of 2
        # the prompt goes past the full blocks, so all 5 are reported
        assert mgr.lookup(hashes, num_tokens=5 * GEOM.block_size + 1) == Match(5, 0, 5)
        for b in range(8, 13):
            poison_block(gpu, b)
        ticket = mgr.onboard(hashes, range(8, 13))
        mgr.wait(ticket)
        assert ticket.results == [OK] * 5
        assert [read_block(gpu, b) for b in range(8, 13)] == want
        mgr.check_invariants()


def test_lookup_takes_host_then_disk_and_stops_at_the_first_miss(tmp_path, rng):
    gpu = make_gpu(16, rng)
    with BlockManager(gpu, config(tmp_path, host=4, disk=8, disable_disk_offload_filter=True)) as mgr:
        hashes = mgr.sequence_hashes(tokens(rng, 8))
        mgr.offload(hashes[:6], range(6))
        mgr.wait()
        # G2 keeps blocks 2..5 (0 and 1 were evicted), G3 has all six
        assert not mgr.index.pool("G2").contains(hashes[0]) and mgr.index.pool("G2").contains(hashes[2])
        assert mgr.lookup(hashes) == Match(6, 0, 6)  # G2 misses block 0, so G3 serves from there
        assert mgr.lookup(hashes[2:]) == Match(4, 4, 0)  # G2 run, then G3 has nothing more
        assert mgr.lookup(hashes[2:6]) == Match(3, 3, 0)  # whole prompt matched: last block left out
        assert mgr.lookup(hashes[2:6], num_tokens=4 * GEOM.block_size + 3) == Match(4, 4, 0)
        assert mgr.lookup(hashes[6:]) == Match(0, 0, 0)
        assert mgr.lookup([]) == Match(0, 0, 0)
        m = mgr.metrics
        assert m.value("kvbm_disk_cache_hit_rate") == pytest.approx(6 / 24)  # 8 + 6 + 4 + 4 + 2 + 0 blocks asked
        assert m.value("kvbm_host_cache_hit_rate") == pytest.approx(11 / 24)


def test_disk_admission_filter_cascades_blocks_seen_again(tmp_path, rng):
    gpu = make_gpu(16, rng)
    clock = [0.0]
    filt = DiskAdmissionFilter(clock=lambda: clock[0])
    with BlockManager(gpu, config(tmp_path, host=8, disk=8), disk_filter=filt) as mgr:
        hashes = mgr.sequence_hashes(tokens(rng, 4))
        mgr.offload(hashes, range(4))
        mgr.wait()
        assert not any(mgr.index.pool("G3").contains(h) for h in hashes)  # seen once: not worth the disk
        assert mgr.lookup(hashes[:2], num_tokens=99) == Match(2, 2, 0)  # a hit on blocks 0 and 1
        mgr.poll()  # starts the G2 -> G3 writes of blocks 0 and 1 on a disk thread
        assert [mgr.index.pool("G3").contains(h) for h in hashes] == [True, True, False, False]
        mgr.check_invariants()  # G2 slots held and G3 slots pending while the write runs, or committed after it
        assert mgr.lookup(hashes[:2], num_tokens=99) == Match(2, 2, 0)  # G2 still serves them meanwhile
        mgr.wait()
        assert mgr.metrics.value("kvbm_offload_blocks_h2d") == 2
        assert [mgr.index.pool("G3").lookup(h) is not None for h in hashes] == [True, True, False, False]
        mgr.check_invariants()


def test_a_ticket_finishes_once_even_when_its_own_batches_land_while_it_is_planned(rng):
    gpu = make_gpu(16, rng)
    with BlockManager(gpu, config(host=2, max_transfer_batch_size=2)) as mgr:
        hashes = mgr.sequence_hashes(tokens(rng, 8))
        ticket = mgr.offload(hashes, range(8))  # G2 is full after each batch: it must land to make room
        assert mgr.poll() == [ticket] and ticket.results == [OK] * 8 and ticket.ok_blocks == list(range(8))
        ticket = mgr.onboard(hashes, range(8, 16))
        assert mgr.poll() == [ticket] and ticket.failed_blocks == list(range(6))
        assert mgr.poll() == []


def test_offload_skips_stored_repeated_and_low_priority_blocks(rng):
    gpu = make_gpu(16, rng)
    with BlockManager(gpu, config(host=8, host_offload_prefix_min_priority=10)) as mgr:
        hashes = mgr.sequence_hashes(tokens(rng, 3))
        low = mgr.offload(hashes, [0, 1, 2], priority=5)
        assert low.done and low.results == [SKIPPED] * 3 and "PRIORITY" in low.reasons[0]
        first = mgr.offload(hashes[:2], [0, 1], priority=50)
        again = mgr.offload([hashes[0], hashes[2], hashes[2]], [5, 6, 7], priority=50)
        assert again.results[0] is SKIPPED and again.results[2] is SKIPPED and "already" in again.reasons[2]
        finished = mgr.wait()
        assert {id(t) for t in finished} >= {id(first), id(again), id(low)}
        assert again.results[1] is OK and first.results == [OK, OK]
        assert mgr.metrics.value("kvbm_offload_blocks_d2h") == 3


def test_eviction_takes_lowest_priority_then_least_recent(rng):
    gpu = make_gpu(16, rng)
    with BlockManager(gpu, config(host=4)) as mgr:
        hashes = mgr.sequence_hashes(tokens(rng, 6))
        mgr.offload(hashes[:2], [0, 1], priority=80)
        mgr.offload(hashes[2:4], [2, 3], priority=10)
        mgr.wait()
        mgr.onboard([hashes[2]], [10])  # block 2 is now more recently used than block 3
        mgr.wait()
        mgr.offload(hashes[4:5], [4], priority=50)
        mgr.wait()
        present = [mgr.index.pool("G2").contains(h) for h in hashes[:5]]
        assert present == [True, True, True, False, True]
        mgr.check_invariants()


class FakeEvent:
    """Completion reported only once ``fire`` is set, and never before the real CUDA event (GPU runs), if any."""

    def __init__(self, fire: list[bool], waits: list[int], real=None) -> None:
        self.fire, self.waits, self.real = fire, waits, real

    def query(self) -> bool:
        return self.fire[0] and (self.real is None or self.real.query())

    def synchronize(self) -> None:
        self.waits[0] += 1
        self.fire[0] = True
        if self.real is not None:
            self.real.synchronize()


def test_batches_are_queued_beyond_the_concurrency_limit_and_never_block(rng, monkeypatch):
    gpu = make_gpu(32, rng)
    with BlockManager(gpu, config(host=32, max_transfer_batch_size=3, max_concurrent_transfers=2)) as mgr:
        hashes = mgr.sequence_hashes(tokens(rng, 10))
        fire, waits = [False], [0]
        delay_completions(monkeypatch, mgr, lambda: FakeEvent(fire, waits))
        ticket = mgr.offload(hashes, range(10))
        assert (mgr.store.num_running(), mgr.store.num_queued()) == (2, 2)  # 3 + 3 in flight, 3 + 1 queued
        assert mgr.poll() == [] and not ticket.done and waits == [0]
        assert mgr.lookup(hashes, num_tokens=99) == Match(0, 0, 0)  # nothing is visible before it lands
        mgr.check_invariants()
        fire[0] = True
        assert mgr.poll() == [ticket] and ticket.results == [OK] * 10
        assert waits == [0]  # completion came from polling alone
        assert hist_count(mgr.metrics, "g1_to_g2") == 4
        # an onboard queues the same way; wait() blocks on the oldest batch
        fire[0] = False
        ticket = mgr.onboard(hashes[:9], range(16, 25))
        assert (mgr.store.num_running(), mgr.store.num_queued()) == (2, 1)
        mgr.check_invariants()
        assert mgr.wait(ticket) == [ticket] and ticket.results == [OK] * 9 and waits[0] >= 1
        assert [read_block(gpu, b) for b in range(16, 25)] == [read_block(gpu, b) for b in range(9)]
        mgr.check_invariants()


def test_sequence_hashes_match_kvbm_hashing(rng):
    gpu = make_gpu(4, rng)
    with BlockManager(gpu, config(host=4)) as mgr:
        toks = tokens(rng, 3, extra=2)
        assert mgr.sequence_hashes(toks, "salt", "lora") == sequence_hashes(toks, 4, salt_hash("salt", "lora"))
        assert len(mgr.sequence_hashes(toks)) == 3
        assert mgr.sequence_hashes(toks, "a") != mgr.sequence_hashes(toks, "b")


def test_sizes_and_metrics_come_from_the_environment(tmp_path, rng, caplog):
    gpu = make_gpu(4, rng)
    with socket.socket() as probe:  # a free port for the metrics server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"DYN_KVBM_CPU_CACHE_GB": str(5 * GEOM.block_bytes / 1e9),
           "DYN_KVBM_DISK_CACHE_GB": str(7 * GEOM.block_bytes / 1e9),
           "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_DISK_DISABLE_O_DIRECT": "1",
           "DYN_KVBM_METRICS": "true", "DYN_KVBM_METRICS_PORT": str(port)}
    caplog.set_level(logging.INFO, logger="kvbm.manager")
    with BlockManager(gpu, KvbmConfig.from_env(env)) as mgr:
        assert mgr.index.pool("G2").num_blocks == 5 and mgr.index.pool("G3").num_blocks == 7
        assert not mgr.store.cache("G3").file.o_direct
        assert "G3 file" in caplog.text and "O_DIRECT off" in caplog.text
        hashes = mgr.sequence_hashes(tokens(rng, 2))
        mgr.offload(hashes, [0, 1])
        mgr.wait()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert "kvbm_offload_blocks_d2h 2.0" in reply.read().decode()
    with pytest.raises(OSError):  # the server stopped with the manager
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_zerofill_fallback_flag_reaches_the_disk_file(tmp_path, rng, monkeypatch):
    def no_fallocate(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
    gpu = make_gpu(4, rng)
    with pytest.raises(OSError, match="DYN_KVBM_DISK_ZEROFILL_FALLBACK"):
        BlockManager(gpu, config(tmp_path, host=2, disk=4))
    assert list(tmp_path.glob("kvbm-g3-*")) == []
    with BlockManager(gpu, config(tmp_path, host=2, disk=4, disk_zerofill_fallback=True)) as mgr:
        assert mgr.store.cache("G3").file.preallocated_by == "zerofill"


def test_bad_input_raises_clear_errors(tmp_path, rng):
    gpu = make_gpu(8, rng)
    with pytest.raises(KvbmConfigError, match="no offload tier"):
        BlockManager(gpu, KvbmConfig())
    with pytest.raises(TypeError, match="PagedKVCache"):
        BlockManager(gpu.tensors[0], config(host=2))
    with pytest.raises(KvbmConfigError, match="not an existing directory"):
        BlockManager(gpu, config(tmp_path / "missing", disk=4))
    mgr = BlockManager(gpu, config(host=4))
    with pytest.raises(ValueError, match="same length"):
        mgr.offload([1, 2], [0])
    with pytest.raises(IndexError, match="out of range"):
        mgr.offload([1], [8])
    with pytest.raises(ValueError, match="distinct"):
        mgr.onboard([1, 2], [3, 3])
    with pytest.raises(ValueError, match=r"\[0, 2\*\*64\)"):
        mgr.lookup([-1])
    with pytest.raises(TypeError, match="priority"):
        mgr.offload([1], [0], priority=1.5)
    missing = mgr.onboard([123], [0])
    assert missing.results == [FAILED] and "no tier" in missing.reasons[0]
    mgr.check_invariants()
    mgr.close()
    with pytest.raises(ValueError, match="closed"):
        mgr.lookup([1])


def test_offload_of_a_block_an_onboard_is_still_writing_is_skipped(rng, monkeypatch):
    gpu = make_gpu(16, rng)
    with BlockManager(gpu, config(host=8, max_transfer_batch_size=2)) as mgr:
        hashes = mgr.sequence_hashes(tokens(rng, 3))
        mgr.offload(hashes[:2], [0, 1])
        mgr.wait()
        fire, waits = [False], [0]
        delay_completions(monkeypatch, mgr, lambda: FakeEvent(fire, waits))
        load = mgr.onboard(hashes[:2], [8, 9])
        ticket = mgr.offload([hashes[2], 123456], [9, 10])  # block 9 holds no block yet: an onboard writes it
        assert ticket.results[0] is SKIPPED and "being written by an onboard" in ticket.reasons[0]
        fire[0] = True
        mgr.wait(load)
        mgr.wait()
        assert load.results == [OK, OK] and ticket.results[1] is OK
        again = mgr.offload([hashes[2]], [9])  # the onboard is done: the block may be offloaded now
        mgr.wait()
        assert again.results == [OK]
        mgr.check_invariants()


def test_onboarding_one_disk_block_twice_in_one_call_reads_it_once_for_both(tmp_path, rng):
    gpu = make_gpu(16, rng)
    with BlockManager(gpu, config(tmp_path, disk=8, max_transfer_batch_size=4)) as mgr:
        hashes = mgr.sequence_hashes(tokens(rng, 2))
        mgr.offload(hashes, [0, 1])
        mgr.wait()
        for b in (4, 5, 6):
            poison_block(gpu, b)
        ticket = mgr.onboard([hashes[1], hashes[0], hashes[1]], [4, 5, 6])
        mgr.wait(ticket)
        assert ticket.results == [OK] * 3
        assert [read_block(gpu, b) for b in (4, 5, 6)] == [read_block(gpu, b) for b in (1, 0, 1)]
        assert mgr.lookup(hashes, num_tokens=99).num_blocks == 2  # still stored
        mgr.check_invariants()


def test_bad_calls_name_what_is_wrong(rng):
    import torch

    from kvbm.layouts import block_major

    gpu = make_gpu(8, rng)
    with BlockManager(gpu, config(host=4)) as mgr:
        with pytest.raises(ValueError, match="num_tokens must be a non-negative int, got -3"):
            mgr.lookup([1, 2], num_tokens=-3)
        with pytest.raises(TypeError, match="bool"):
            mgr.offload([True], [0])
        with pytest.raises(TypeError, match="bool"):
            mgr.onboard([5], [False])
    meta = block_major(torch.empty(4, 2, 2, 4, 2, 64, dtype=torch.bfloat16, device="meta"))
    with pytest.raises(ValueError, match="cannot tell the medium"):
        BlockManager(meta, config(host=4))


def test_the_cost_rule_learns_a_tier_bandwidth_from_the_loads_it_runs(rng):
    """Each finished load into G1 feeds the cost rule its bytes and its share of the time loads ran: the G2
    estimate leaves its configured value and is published as a gauge."""
    gpu = make_gpu(32, rng)
    with BlockManager(gpu, config(host=16)) as mgr:
        configured = mgr.cost.bandwidth("G2")
        hashes = mgr.sequence_hashes(tokens(rng, 9))
        mgr.wait(mgr.offload(hashes, list(range(9))))
        assert mgr.cost.bandwidth("G2") == configured  # stores teach it nothing
        mgr.wait(mgr.onboard(hashes[:8], list(range(16, 24))))
        learned = mgr.cost.bandwidth("G2")
        assert learned != configured and learned > 0
        assert mgr.metrics.value("kvbm_load_bandwidth_bytes_per_second", tier="G2") == pytest.approx(learned)
