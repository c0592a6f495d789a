"""kvbm_* metrics: exact exposed names, values read back from a real HTTP server, hit-rate window, dashboard."""
from __future__ import annotations

import json
import random
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvbm.metrics import DIRECTIONS, KVBM_BLOCK_COUNTERS, WORKER_SERIES, KvbmMetrics

KVBM_NAMES = [
    "kvbm_offload_blocks_d2h", "kvbm_offload_blocks_h2d", "kvbm_offload_blocks_d2d",
    "kvbm_onboard_blocks_h2d", "kvbm_onboard_blocks_d2d", "kvbm_matched_tokens",
    "kvbm_host_cache_hit_rate", "kvbm_disk_cache_hit_rate",
]
DASHBOARD = Path(__file__).resolve().parent.parent / "kvbm" / "grafana" / "kvbm_dashboard.json"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value of a text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def served():
    m = KvbmMetrics()
    port = m.start_server(0, addr="127.0.0.1")
    yield m, port
    m.stop_server()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_exact_names_over_http(served) -> None:
    m, port = served
    rng = random.Random(11)
    expected_blocks = {name: 0 for name in KVBM_BLOCK_COUNTERS.values()}
    expected_bytes = {d: 0 for d in DIRECTIONS}
    expected_failed = {d: 0 for d in DIRECTIONS}
    expected_count = {d: 0 for d in DIRECTIONS}
    for _ in range(200):
        d = rng.choice(DIRECTIONS)
        ok, failed = rng.randrange(0, 17), rng.randrange(0, 3)
        nbytes = ok * rng.randrange(1, 1 << 20)
        m.record_transfer(d, blocks_ok=ok, blocks_failed=failed, num_bytes=nbytes, seconds=rng.uniform(0, 0.05))
        if d in KVBM_BLOCK_COUNTERS:
            expected_blocks[KVBM_BLOCK_COUNTERS[d]] += ok
        expected_bytes[d] += nbytes
        expected_failed[d] += failed
        expected_count[d] += 1
    m.record_matched_tokens(4096)
    m.record_matched_tokens(17)
    m.record_request_lookup(10, 4, 1)

    text = scrape(port)
    got = samples(text)
    for name, value in expected_blocks.items():
        assert got[(name, ())] == value
        assert f"\n{name} " in text and f"{name}_total" not in text
    assert got[("kvbm_matched_tokens", ())] == 4113
    assert "kvbm_matched_tokens_total" not in text
    assert got[("kvbm_host_cache_hit_rate", ())] == pytest.approx(0.4)
    assert got[("kvbm_disk_cache_hit_rate", ())] == pytest.approx(0.1)
    for d in DIRECTIONS:
        assert got[("kvbm_transfer_bytes", (("direction", d),))] == expected_bytes[d]
        assert got[("kvbm_transfer_failed_blocks", (("direction", d),))] == expected_failed[d]
        assert got[("kvbm_transfer_seconds_count", (("direction", d),))] == expected_count[d]
        assert got[("kvbm_transfer_seconds_bucket", (("direction", d), ("le", "+Inf")))] == expected_count[d]
    # Every KVBM name is exposed as a sample with exactly that name.
    names = {name for name, _ in got}
    assert set(KVBM_NAMES) <= names
    assert m.render().decode().count("\nkvbm_offload_blocks_d2h ") == 1


def test_g4_lookups_hit_blocks_and_time() -> None:
    m = KvbmMetrics()
    m.record_g4_lookup(0, 0.004)
    m.record_g4_lookup(16, 0.0002)
    assert m.value("kvbm_g4_lookups") == 2 and m.value("kvbm_g4_hit_blocks") == 16
    got = samples(m.render().decode())
    assert got[("kvbm_g4_lookup_seconds_count", ())] == 2
    assert got[("kvbm_g4_lookup_seconds_bucket", (("le", "0.0003"),))] == 1


def test_failed_blocks_never_counted_as_moved() -> None:
    m = KvbmMetrics()
    m.record_transfer("g3_to_g1", blocks_ok=0, blocks_failed=5, num_bytes=0, seconds=0.01)
    m.record_transfer("g3_to_g1", blocks_ok=2, blocks_failed=1, num_bytes=8192, seconds=0.01)
    assert m.value("kvbm_onboard_blocks_d2d") == 2
    assert m.value("kvbm_transfer_failed_blocks", "g3_to_g1") == 6
    assert m.value("kvbm_transfer_bytes", "g3_to_g1") == 8192


def test_histogram_buckets() -> None:
    m = KvbmMetrics()
    for s in (0.00002, 0.002, 0.002, 2.0):
        m.record_transfer("g1_to_g2", blocks_ok=1, num_bytes=1, seconds=s)
    got = samples(m.render().decode())
    le = lambda v: got[("kvbm_transfer_seconds_bucket", (("direction", "g1_to_g2"), ("le", v)))]  # noqa: E731
    assert (le("1e-05"), le("3e-05"), le("0.003"), le("1.0"), le("3.0")) == (0, 1, 3, 3, 4)
    assert got[("kvbm_transfer_seconds_sum", (("direction", "g1_to_g2"),))] == pytest.approx(2.00402)


def test_hit_rate_sliding_window() -> None:
    m = KvbmMetrics(window=1000)
    rng = random.Random(3)
    history = []
    for step in range(2500):
        req = rng.randrange(0, 40)
        host = rng.randrange(0, req + 1)
        disk = rng.randrange(0, req - host + 1)
        m.record_request_lookup(req, host, disk)
        history.append((req, host, disk))
        if step % 23 and step < 2490:
            continue
        last = history[-1000:]
        total = sum(r for r, _, _ in last)
        assert m.value("kvbm_host_cache_hit_rate") == pytest.approx(sum(h for _, h, _ in last) / total)
        assert m.value("kvbm_disk_cache_hit_rate") == pytest.approx(sum(d for _, _, d in last) / total)
    got = samples(m.render().decode())
    assert got[("kvbm_host_cache_hit_rate", ())] == pytest.approx(m.value("kvbm_host_cache_hit_rate"))


def test_window_of_requests_not_blocks() -> None:
    m = KvbmMetrics(window=2)
    m.record_request_lookup(100, 100, 0)  # falls out of the window after two more requests
    m.record_request_lookup(10, 0, 5)
    m.record_request_lookup(10, 0, 5)
    assert m.value("kvbm_host_cache_hit_rate") == 0.0
    assert m.value("kvbm_disk_cache_hit_rate") == 0.5
    m.record_request_lookup(0, 0, 0)
    m.record_request_lookup(0, 0, 0)
    assert m.value("kvbm_disk_cache_hit_rate") == 0.0  # no blocks looked up in the window: 0, not a division error


def test_instances_are_independent() -> None:
    a, b = KvbmMetrics(), KvbmMetrics()
    a.record_matched_tokens(5)
    assert a.value("kvbm_matched_tokens") == 5 and b.value("kvbm_matched_tokens") == 0
    assert samples(b.render().decode())[("kvbm_matched_tokens", ())] == 0


@pytest.mark.parametrize("call, exc, match", [
    (lambda m: m.record_transfer("h2d", blocks_ok=1, num_bytes=1, seconds=0), ValueError, r"direction must be one of"),
    (lambda m: m.record_transfer("g1_to_g2", blocks_ok=-1, num_bytes=1, seconds=0), ValueError, r"blocks_ok .* got -1"),
    (lambda m: m.record_transfer("g1_to_g2", blocks_ok=1, num_bytes=1.5, seconds=0), TypeError, r"num_bytes"),
    (lambda m: m.record_transfer("g1_to_g2", blocks_ok=1, num_bytes=1, seconds=float("nan")), ValueError, r"seconds"),
    (lambda m: m.record_transfer("g1_to_g2", blocks_ok=1, num_bytes=1, seconds=-1), ValueError, r"seconds"),
    (lambda m: m.record_request_lookup(4, 3, 2), ValueError, r"host_hits \+ disk_hits \(3 \+ 2\) exceeds .* \(4\)"),
    (lambda m: m.record_request_lookup(4, -1, 2), ValueError, r"host_hits"),
    (lambda m: m.record_matched_tokens(True), TypeError, r"num_tokens"),
    (lambda m: m.record_g4_lookup(-1, 0.1), ValueError, r"hit_blocks"),
    (lambda m: m.record_g4_lookup(1, -0.1), ValueError, r"seconds"),
    (lambda m: m.value("kvbm_nope"), KeyError, r"kvbm_nope"),
    (lambda m: m.value("kvbm_transfer_bytes"), ValueError, r"needs a direction"),
    (lambda m: m.value("kvbm_matched_tokens", "g1_to_g2"), ValueError, r"no direction label"),
    (lambda m: m.start_server(70000), ValueError, r"port must be an integer in 0..65535"),
])
def test_bad_input(call, exc, match) -> None:
    m = KvbmMetrics()
    before = m.render()
    with pytest.raises(exc, match=match):
        call(m)
    after = m.render()
    # Nothing was recorded by a rejected call (the _created timestamps are the same too).
    assert after == before


def test_bad_window() -> None:
    with pytest.raises(ValueError, match="window must be a positive integer"):
        KvbmMetrics(window=0)


def test_port_in_use_and_restart() -> None:
    a = KvbmMetrics()
    port = a.start_server(0, addr="127.0.0.1")
    try:
        with pytest.raises(RuntimeError, match="already running"):
            a.start_server(0, addr="127.0.0.1")
        b = KvbmMetrics()
        with pytest.raises(OSError, match=rf"cannot serve kvbm metrics on 127.0.0.1:{port}.*DYN_KVBM_METRICS_PORT"):
            b.start_server(port, addr="127.0.0.1")
    finally:
        a.stop_server()
    # The port is free again after stop_server.
    b = KvbmMetrics()
    assert b.start_server(port, addr="127.0.0.1") == port
    try:
        assert "kvbm_matched_tokens 0.0" in scrape(port)
    finally:
        b.stop_server()


def test_dashboard_covers_every_metric() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    referenced = {name for e in exprs for name in re.findall(r"\bkvbm_[a-z0-9_]+", e)}
    metrics = KvbmMetrics()
    metrics.set_load_bandwidth("G2", 1.0)  # a family labelled by tier is exposed once a tier has a value
    metrics.set_workers(2, 1)  # the worker ranks' series are exposed once an engine connector's leader sets them
    exposed = {name for name, _ in samples(metrics.render().decode())}
    # Every name the dashboard queries is exposed (no typos), and every exposed family is on a panel.
    assert referenced <= exposed, referenced - exposed
    families = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in exposed}
    covered = {re.sub(r"_(bucket|sum|count)$", "", n) for n in referenced}
    assert families == covered, families ^ covered
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_server_listens_on_localhost_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYN_KVBM_METRICS_HOST", raising=False)
    m = KvbmMetrics()
    port = m.start_server(0)
    try:
        assert m.server_address == ("127.0.0.1", port)
        assert "kvbm_matched_tokens" in scrape(port)
    finally:
        m.stop_server()
    assert m.server_address is None


def test_server_host_from_env_or_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_METRICS_HOST", "0.0.0.0")
    m = KvbmMetrics()
    m.start_server(0)
    try:
        assert m.server_address[0] == "0.0.0.0"
    finally:
        m.stop_server()
    m.start_server(0, host="127.0.0.1")  # an explicit host wins over the environment
    try:
        assert m.server_address[0] == "127.0.0.1"
    finally:
        m.stop_server()
    with pytest.raises(ValueError, match=r"disagree"):
        m.start_server(0, "127.0.0.1", host="0.0.0.0")
    monkeypatch.setenv("DYN_KVBM_METRICS_HOST", "no such host!")
    from kvbm.config import KvbmConfigError
    with pytest.raises(KvbmConfigError, match=r"DYN_KVBM_METRICS_HOST='no such host!' is invalid"):
        m.start_server(0)


# --------------------------------------------------------------------------------------------------
# Sides and ranks: an engine whose worker ranks run apart from its scheduler
# --------------------------------------------------------------------------------------------------


def families(m: KvbmMetrics) -> set[str]:
    """The metric families a ``KvbmMetrics`` exposes (with at least one sample)."""
    return {f.name for f in text_string_to_metric_families(m.render().decode())
            if f.samples and not f.name.endswith("_created")}


def test_sides_split_the_series_and_a_rank_labels_the_workers() -> None:
    """One side's series plus the other's are exactly both sides' series; a worker rank's carry ``rank`` and no
    scheduler-side series, the scheduler's none of the worker's; the unranked names stay as KVBM names them."""
    both, scheduler, worker = KvbmMetrics(), KvbmMetrics(sides="scheduler"), KvbmMetrics(sides="worker", rank=3)
    for m in (both, scheduler):
        m.set_workers(2, 2)
    assert families(worker) == set(WORKER_SERIES)
    assert not families(scheduler) & set(WORKER_SERIES)
    assert families(scheduler) | families(worker) == families(both)
    text = worker.render().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                assert sample.labels.get("rank") == "3", sample
    text = both.render().decode()
    ranked = {f.name for f in text_string_to_metric_families(text) for s in f.samples if "rank" in s.labels}
    assert ranked == {"kvbm_worker_failed_blocks"}  # the scheduler side's count per rank; no worker series ranked
    assert "\nkvbm_offload_blocks_d2h 0.0" in text


def test_ranked_worker_series_over_http() -> None:
    """A worker rank's transfers read back from its HTTP endpoint under its rank label, values exact."""
    rng = random.Random(23)
    m = KvbmMetrics(sides="worker", rank=1)
    port = m.start_server(0, host="127.0.0.1")
    try:
        blocks = {name: 0 for name in KVBM_BLOCK_COUNTERS.values()}
        nbytes = {d: 0 for d in DIRECTIONS}
        failed = {d: 0 for d in DIRECTIONS}
        for _ in range(150):
            d = rng.choice(DIRECTIONS)
            ok, bad, size = rng.randrange(0, 17), rng.randrange(0, 3), rng.randrange(1, 1 << 16)
            m.record_transfer(d, blocks_ok=ok, blocks_failed=bad, num_bytes=ok * size, seconds=rng.uniform(0, 0.01))
            if d in KVBM_BLOCK_COUNTERS:
                blocks[KVBM_BLOCK_COUNTERS[d]] += ok
            nbytes[d] += ok * size
            failed[d] += bad
        m.record_disk_file_renewals(2)
        got = samples(scrape(port))
    finally:
        m.stop_server()
    for name, value in blocks.items():
        assert got[(name, (("rank", "1"),))] == value == m.value(name)
    for d in DIRECTIONS:
        assert got[("kvbm_transfer_bytes", (("direction", d), ("rank", "1")))] == nbytes[d]
        assert got[("kvbm_transfer_failed_blocks", (("direction", d), ("rank", "1")))] == failed[d]
        assert m.value("kvbm_transfer_failed_blocks", d) == failed[d]
    assert got[("kvbm_disk_file_renewals", (("rank", "1"),))] == 2
    assert sum(got[("kvbm_transfer_seconds_count", (("direction", d), ("rank", "1")))] for d in DIRECTIONS) == 150


@pytest.mark.parametrize("sides, call", [
    ("worker", lambda m: m.record_matched_tokens(3)),
    ("worker", lambda m: m.record_request_lookup(4, 1, 1)),
    ("worker", lambda m: m.set_workers(2, 1)),
    ("worker", lambda m: m.set_load_bandwidth("G2", 1.0)),
    ("scheduler", lambda m: m.record_transfer("g1_to_g2", blocks_ok=1, num_bytes=1, seconds=0)),
    ("scheduler", lambda m: m.record_disk_file_renewals(1)),
])
def test_recording_the_other_side_raises(sides: str, call) -> None:
    m = KvbmMetrics(sides=sides, rank=0 if sides == "worker" else None)
    before = m.render()
    with pytest.raises(RuntimeError, match=rf"holds the {sides} side's only"):
        call(m)
    assert m.render() == before


def test_workers_expected_registered_and_failed_blocks_per_rank() -> None:
    """Absent until an engine connector's leader sets them; then every expected rank's failed blocks from 0."""
    m = KvbmMetrics(sides="scheduler")
    assert not families(m) & {"kvbm_workers_expected", "kvbm_workers_registered", "kvbm_worker_failed_blocks"}
    m.set_workers(4, 1)
    m.set_workers(4, 3)
    rng = random.Random(5)
    expected = [0] * 4
    for _ in range(50):
        rank, n = rng.randrange(4), rng.randrange(0, 9)
        m.record_worker_failed_blocks(rank, n)
        expected[rank] += n
    got = samples(m.render().decode())
    assert got[("kvbm_workers_expected", ())] == 4 and got[("kvbm_workers_registered", ())] == 3
    assert m.value("kvbm_workers_expected") == 4 and m.value("kvbm_workers_registered") == 3
    for rank in range(4):
        assert got[("kvbm_worker_failed_blocks", (("rank", str(rank)),))] == expected[rank]
        assert m.value("kvbm_worker_failed_blocks", rank=rank) == expected[rank]


@pytest.mark.parametrize("call, exc, match", [
    (lambda m: m.set_workers(2, 3), ValueError, r"registered \(3\) exceeds expected \(2\)"),
    (lambda m: m.set_workers(-1, 0), ValueError, r"expected"),
    (lambda m: m.record_worker_failed_blocks(-1, 1), ValueError, r"rank"),
    (lambda m: m.record_worker_failed_blocks(0, 1.0), TypeError, r"num_blocks"),
    (lambda m: m.value("kvbm_worker_failed_blocks"), ValueError, r"needs a rank"),
    (lambda m: m.value("kvbm_matched_tokens", rank=0), ValueError, r"no rank label"),
    (lambda m: m.value("kvbm_offload_blocks_d2h"), KeyError, r"scheduler side's series"),
])
def test_bad_scheduler_side_input(call, exc, match) -> None:
    m = KvbmMetrics(sides="scheduler")
    before = m.render()
    with pytest.raises(exc, match=match):
        call(m)
    assert m.render() == before


@pytest.mark.parametrize("kwargs, match", [
    ({"sides": "leader"}, r"sides must be one of both, scheduler, worker"),
    ({"sides": "worker", "rank": -1}, r"rank must be a non-negative int"),
    ({"sides": "worker", "rank": True}, r"rank must be a non-negative int"),
    ({"sides": "scheduler", "rank": 0}, r"not per rank"),
])
def test_bad_sides_or_rank(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        KvbmMetrics(**kwargs)


def test_module_docstring_names_every_exposed_family() -> None:
    import kvbm.metrics

    m = KvbmMetrics()
    m.set_workers(2, 1)
    m.set_load_bandwidth("G2", 1.0)
    missing = sorted(name for name in families(m) if f"``{name}``" not in kvbm.metrics.__doc__)
    assert not missing, f"kvbm/metrics.py's docstring does not name {missing}"
