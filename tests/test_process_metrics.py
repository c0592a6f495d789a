"""The connector sides' metrics in a process (`kvbm.connectors.process_metrics`): the process's metrics on
DYN_KVBM_METRICS_PORT, each worker rank's on DYN_KVBM_METRICS_PORT + 1 + rank, read back over HTTP; a port taken;
a single-rank engine's one port and unchanged names."""
from __future__ import annotations

import logging
import random
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvbm.config import KvbmConfig
from kvbm.connectors import process_metrics
from kvbm.metrics import DIRECTIONS, KVBM_BLOCK_COUNTERS


def free_ports(n: int) -> int:
    """A base port with ``n`` consecutive free ports from it (checked by binding each)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000)
        probes = []
        try:
            for port in range(base, base + n):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, read from the HTTP endpoint on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def served(port: int) -> bool:
    try:
        scrape(port)
        return True
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture
def config() -> Iterator[KvbmConfig]:
    yield KvbmConfig(metrics=True, metrics_port=free_ports(4), metrics_host="127.0.0.1")
    assert not process_metrics._entries, "a test left metrics acquired"


def test_scheduler_and_worker_ranks_on_their_own_ports(config: KvbmConfig) -> None:
    """The scheduler side on the base port, worker ranks 0 and 1 on the next two: each endpoint has exactly its
    side's series, the workers' labelled by rank, with the values recorded; the last release of each frees its
    port."""
    base = config.metrics_port
    rng = random.Random(7)
    scheduler = process_metrics.acquire(config, sides="scheduler")
    workers = [process_metrics.acquire(config, rank=r, sides="worker") for r in range(2)]
    try:
        assert process_metrics.port_of(config, None) == base and process_metrics.port_of(config, 1) == base + 2
        assert [w.server_address for w in workers] == [("127.0.0.1", base + 1), ("127.0.0.1", base + 2)]
        moved = [{d: [0, 0, 0] for d in DIRECTIONS} for _ in workers]  # blocks ok, failed, bytes
        for _ in range(120):
            r, d = rng.randrange(2), rng.choice(DIRECTIONS)
            ok, bad, size = rng.randrange(0, 17), rng.randrange(0, 3), rng.randrange(1, 1 << 16)
            workers[r].record_transfer(d, blocks_ok=ok, blocks_failed=bad, num_bytes=ok * size, seconds=0.001)
            moved[r][d][0] += ok
            moved[r][d][1] += bad
            moved[r][d][2] += ok * size
        scheduler.record_matched_tokens(48)
        scheduler.set_workers(2, 2)
        scheduler.record_worker_failed_blocks(1, 3)
        # A second side of rank 1 in this process shares its metrics and server.
        assert process_metrics.acquire(config, rank=1, sides="worker") is workers[1]
        process_metrics.release(1)

        got = scrape(base)
        assert got[("kvbm_matched_tokens", ())] == 48
        assert got[("kvbm_workers_expected", ())] == 2 == got[("kvbm_workers_registered", ())]
        assert got[("kvbm_worker_failed_blocks", (("rank", "1"),))] == 3
        assert got[("kvbm_worker_failed_blocks", (("rank", "0"),))] == 0
        assert not any(name.startswith(("kvbm_offload", "kvbm_onboard", "kvbm_transfer")) for name, _ in got)
        for r in range(2):
            got = scrape(base + 1 + r)
            assert not any(name.startswith(("kvbm_matched", "kvbm_host_cache", "kvbm_workers")) for name, _ in got)
            rank = ("rank", str(r))
            for d in DIRECTIONS:
                ok, bad, nbytes = moved[r][d]
                if d in KVBM_BLOCK_COUNTERS:
                    assert got[(KVBM_BLOCK_COUNTERS[d], (rank,))] == ok
                assert got[("kvbm_transfer_failed_blocks", (("direction", d), rank))] == bad
                assert got[("kvbm_transfer_bytes", (("direction", d), rank))] == nbytes
    finally:
        process_metrics.release()
        for r in range(2):
            process_metrics.release(r)
    assert not any(served(base + i) for i in range(3))


def test_a_rank_whose_port_is_taken_records_only(config: KvbmConfig, caplog: pytest.LogCaptureFixture) -> None:
    """Another process holds rank 1's port: rank 1 logs that and records only; rank 0 is served."""
    base = config.metrics_port
    taken = socket.socket()
    taken.bind(("127.0.0.1", base + 2))
    taken.listen()
    try:
        with caplog.at_level(logging.WARNING, logger=process_metrics.__name__):
            first = process_metrics.acquire(config, rank=0, sides="worker")
            second = process_metrics.acquire(config, rank=1, sides="worker")
        try:
            assert first.server_address == ("127.0.0.1", base + 1) and second.server_address is None
            assert re.search(rf"kvbm metrics of rank 1 \(DYN_KVBM_METRICS_PORT \+ 1 \+ 1\) not served from this "
                             rf"process .*cannot serve kvbm metrics on 127.0.0.1:{base + 2} ", caplog.text)
            second.record_transfer("g1_to_g2", blocks_ok=5, num_bytes=5 * 4096, seconds=0.001)
            assert second.value("kvbm_offload_blocks_d2h") == 5  # recorded, not served
            assert scrape(base + 1)[("kvbm_offload_blocks_d2h", (("rank", "0"),))] == 0
        finally:
            process_metrics.release(0)
            process_metrics.release(1)
    finally:
        taken.close()


def test_a_rank_past_the_last_port_records_only(caplog: pytest.LogCaptureFixture) -> None:
    config = KvbmConfig(metrics=True, metrics_port=65535, metrics_host="127.0.0.1")
    with caplog.at_level(logging.WARNING, logger=process_metrics.__name__):
        m = process_metrics.acquire(config, rank=0, sides="worker")
    try:
        assert m.server_address is None and "port must be an integer in 0..65535, got 65536" in caplog.text
    finally:
        process_metrics.release(0)


def test_single_process_engine_keeps_one_port_and_kvbm_names(config: KvbmConfig) -> None:
    """Scheduler and worker in one process share the process's metrics on the base port: KVBM's names without a
    rank label, nothing on the next port."""
    base = config.metrics_port
    scheduler = process_metrics.acquire(config)
    worker = process_metrics.build_with(config, lambda metrics: metrics)
    try:
        assert worker is scheduler and scheduler.sides == "both" and scheduler.rank is None
        worker.record_transfer("g1_to_g2", blocks_ok=3, num_bytes=3 * 4096, seconds=0.001)
        scheduler.record_matched_tokens(48)
        got = scrape(base)
        assert got[("kvbm_offload_blocks_d2h", ())] == 3 and got[("kvbm_matched_tokens", ())] == 48
        assert not any(dict(labels).get("rank") for _, labels in got)
        assert not served(base + 1)
        process_metrics.release()
        assert served(base)  # one side still open
    finally:
        process_metrics.release()
    assert not served(base)


def test_build_with_releases_on_failure_and_sides_must_agree(config: KvbmConfig) -> None:
    def failing(metrics):
        raise RuntimeError("no tiers")

    with pytest.raises(RuntimeError, match="no tiers"):
        process_metrics.build_with(config, failing, rank=0, sides="worker")
    assert not served(config.metrics_port + 1) and 0 not in process_metrics._entries
    process_metrics.acquire(config, sides="scheduler")
    try:
        with pytest.raises(ValueError, match=r"open with sides='scheduler'; asked for sides='both'"):
            process_metrics.acquire(config)
    finally:
        process_metrics.release()
