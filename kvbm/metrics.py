"""Prometheus metrics of the block manager, named as Dynamo KVBM names them (``kvbm_*``).

Each ``KvbmMetrics`` owns a private ``CollectorRegistry``, so several managers (or tests) can live in one
process. The manager calls:

- ``record_transfer(direction, blocks_ok=..., blocks_failed=..., num_bytes=..., seconds=...)`` once per finished
  batch; ``direction`` is a tier pair from ``DIRECTIONS`` (``"g1_to_g2"`` ...). Only blocks that arrived intact
  are counted as moved; failed blocks go to their own counter.
- ``record_request_lookup(num_blocks_requested, host_hits, disk_hits)`` once per request's prefix lookup; the hit
  rate gauges cover the last ``window`` (1000) requests.
- ``record_matched_tokens(num_tokens)`` with the tokens reported to the engine as already computed.
- from the cost-aware hit rule (`kvbm.policies.cost`): ``set_load_bandwidth(tier, bytes_per_second)`` and
  ``set_prefill_rate(tokens_per_second)`` with its current estimates, ``record_cost_dropped(tier, num_blocks)``
  with the hits it did not report.
- from an engine connector's scheduler side (`kvbm.connectors.leader`): ``set_workers(expected, registered)``
  and ``record_worker_failed_blocks(rank, num_blocks)`` with what each rank's reports said failed.

Sides. A block manager in one process records both sides into one ``KvbmMetrics`` (``sides="both"``, the
default). An engine whose worker ranks run in processes of their own (`kvbm.connectors.process_metrics`) keeps
one per side: the scheduler side's (``sides="scheduler"``) and one per worker rank (``sides="worker"`` with
``rank``), each exposing only its side's series (``WORKER_SERIES`` are the worker side's, the rest the
scheduler side's), so that no port serves a transfer counter stuck at 0. A ``KvbmMetrics`` built with ``rank``
adds the label ``rank`` to its worker-side series: a Prometheus server scraping every rank's port sums them or
splits them by rank. Recording a series of the side it does not hold raises (a wiring error).

``start_server(port)`` serves the exposition over HTTP (``DYN_KVBM_METRICS_PORT``, on ``DYN_KVBM_METRICS_HOST``,
127.0.0.1 by default) and ``render()`` returns it.
Exposed names:

- KVBM block counters, no ``_total`` suffix: ``kvbm_offload_blocks_d2h`` (G1->G2), ``kvbm_offload_blocks_h2d``
  (G2->G3), ``kvbm_offload_blocks_d2d`` (G1->G3), ``kvbm_onboard_blocks_h2d`` (G2->G1), ``kvbm_onboard_blocks_d2d``
  (G3->G1), ``kvbm_matched_tokens``;
- ``kvbm_host_cache_hit_rate``, ``kvbm_disk_cache_hit_rate`` (gauges, 0..1);
- per direction: ``kvbm_transfer_bytes``, ``kvbm_transfer_failed_blocks`` (totals, same convention) and the
  histogram ``kvbm_transfer_seconds`` (``_bucket`` / ``_sum`` / ``_count``) of the time per batch;
- ``kvbm_disk_file_renewals`` (total: disk tier files found deleted underneath and replaced);
- the cost-aware hit rule's gauges ``kvbm_load_bandwidth_bytes_per_second`` (per ``tier``) and
  ``kvbm_prefill_tokens_per_second``, and its total ``kvbm_cost_dropped_blocks`` (per ``tier``: blocks found but
  not reported, recomputing them being expected faster than loading them);
- ``kvbm_store_dropped_blocks`` (per ``tier``, total; ``record_store_dropped``): engine blocks left unstored
  because the first tier's queue of stores already held ``DYN_KVBM_MAX_STORE_BACKLOG_MS`` of writes
  (`kvbm.policies.store_backlog`);
- disaggregated prefill -> decode: direction ``g4_to_g1`` of the transfer series (a decode instance's loads from a
  prefill instance's G2 over NIXL), the gauge ``kvbm_remote_pinned_requests`` (a prefill instance's finished
  requests whose G2 blocks are kept for a decode instance) and the total ``kvbm_remote_pin_timeouts`` (such
  requests released because no reader came in ``DYN_KVBM_PD_PIN_TIMEOUT_SECS``);
- the shared G4 tier: the totals ``kvbm_g4_lookups`` and ``kvbm_g4_hit_blocks``, the histogram
  ``kvbm_g4_lookup_seconds`` (``record_g4_lookup``), and the gauges ``kvbm_g4_directory_in_sync`` (1 while the
  local copy of the directory follows etcd; 0: lookups report no G4 hits) and ``kvbm_g4_directory_entries``
  (``set_g4_directory``);
- an engine connector's worker ranks, on the scheduler side: the gauges ``kvbm_workers_expected`` and
  ``kvbm_workers_registered`` (exposed once set: a block manager without ranks has neither) and the total
  ``kvbm_worker_failed_blocks`` (per ``rank``: blocks of completed moves that failed on that rank; a block failing
  on any rank fails for all, so this says which rank fails).
"""
from __future__ import annotations

import logging
import math
import threading
from collections import deque
from typing import Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import metrics_host_from_env

__all__ = ["KvbmMetrics", "DIRECTIONS", "KVBM_BLOCK_COUNTERS", "COST_TIERS", "SIDES", "WORKER_SERIES"]

log = logging.getLogger(__name__)

#: Tiers whose cost-rule series are exposed from the start (others appear when first set).
COST_TIERS: tuple[str, ...] = ("G2", "G3")

#: Called as ``fn(direction, blocks_ok=..., blocks_failed=..., num_bytes=..., seconds=...)`` per finished batch.

# Tier pairs a batch can move blocks between. The direction label uses these rather than KVBM's d2h/h2d words,
# which are ambiguous ("h2d" is both G2->G3 offload and G2->G1 onboard in KVBM's counter names).
DIRECTIONS: tuple[str, ...] = ("g1_to_g2", "g2_to_g3", "g1_to_g3", "g2_to_g1", "g3_to_g1", "g3_to_g2", "g4_to_g1")

# Direction -> the KVBM counter of blocks moved that way (G3->G2 promotion has none in KVBM).
KVBM_BLOCK_COUNTERS: dict[str, str] = {
    "g1_to_g2": "kvbm_offload_blocks_d2h",
    "g2_to_g3": "kvbm_offload_blocks_h2d",
    "g1_to_g3": "kvbm_offload_blocks_d2d",
    "g2_to_g1": "kvbm_onboard_blocks_h2d",
    "g3_to_g1": "kvbm_onboard_blocks_d2d",
}
_BLOCK_COUNTER_DOCS = {
    "g1_to_g2": "Blocks offloaded from device (G1) to host (G2)",
    "g2_to_g3": "Blocks offloaded from host (G2) to disk (G3)",
    "g1_to_g3": "Blocks offloaded from device (G1) to disk (G3) directly",
    "g2_to_g1": "Blocks onboarded from host (G2) to device (G1)",
    "g3_to_g1": "Blocks onboarded from disk (G3) to device (G1)",
}

#: Which series a ``KvbmMetrics`` holds (see the module docstring).
SIDES: tuple[str, ...] = ("both", "scheduler", "worker")

#: The worker side's families (``record_transfer``, ``record_disk_file_renewals``); all others are the scheduler's.
WORKER_SERIES: tuple[str, ...] = (*KVBM_BLOCK_COUNTERS.values(), "kvbm_transfer_bytes", "kvbm_transfer_failed_blocks",
                                  "kvbm_transfer_seconds", "kvbm_disk_file_renewals")

# Per-batch transfer times run from tens of microseconds (a few host blocks) to seconds (a large disk batch).
_SECONDS_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


class _Totals(Collector):
    """Monotonically increasing totals exposed under their exact names.

    Why not prometheus_client's Counter: its exposition always appends ``_total`` to a counter's sample name
    (``kvbm_offload_blocks_d2h_total``), while Dynamo KVBM exposes ``kvbm_offload_blocks_d2h``; dashboards and
    alerts written against KVBM query the bare name. So these totals are exposed with the gauge type, whose sample
    name is written as given; the values only ever grow, and PromQL's ``rate()``/``increase()`` work on them
    exactly as on counters (PromQL does not look at the declared type; a process restart still reads as a reset).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._docs: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._values: dict[str, dict[tuple[str, ...], int]] = {}

    def add(self, name: str, documentation: str, labelnames: tuple[str, ...] = (),
            label_values: Iterable[tuple[str, ...]] = ((),)) -> None:
        """Declare a total, with every label combination that should be exposed from the start (at 0)."""
        self._docs[name] = (documentation, labelnames)
        self._values[name] = {tuple(v): 0 for v in label_values}

    def declare(self, name: str, label_values: Iterable[tuple[str, ...]]) -> None:
        """Expose more label combinations of a declared total (at 0 where they have no value yet)."""
        with self._lock:
            series = self._values[name]
            for labels in label_values:
                series.setdefault(tuple(labels), 0)

    def inc(self, name: str, amount: int, labels: tuple[str, ...] = ()) -> None:
        """Add ``amount`` (>= 0, checked by the caller) to one series."""
        with self._lock:
            series = self._values[name]
            series[labels] = series.get(labels, 0) + amount

    def get(self, name: str, labels: tuple[str, ...] = ()) -> int:
        """The current value of one series."""
        with self._lock:
            return self._values[name].get(labels, 0)

    def labelnames(self, name: str) -> tuple[str, ...]:
        """The label names of a declared total; KeyError for an unknown name."""
        return self._docs[name][1]

    def collect(self) -> Iterator[Metric]:
        """Yield one gauge-typed family per total (see the class docstring for why gauge)."""
        with self._lock:
            snapshot = {name: dict(series) for name, series in self._values.items()}
        for name, series in snapshot.items():
            documentation, labelnames = self._docs[name]
            family = GaugeMetricFamily(name, documentation, labels=list(labelnames))
            for labels, value in sorted(series.items()):
                family.add_metric(list(labels), value)
            yield family


class _LateGauges(Collector):
    """Gauges without labels, exposed from their first value on (series that only some set-ups have)."""

    def __init__(self, docs: dict[str, str]) -> None:
        self._docs = dict(docs)
        self._values: dict[str, float] = {}

    def set(self, name: str, value: float) -> None:
        """Set one gauge (a name given at construction)."""
        if name not in self._docs:
            raise KeyError(name)
        self._values[name] = value

    def collect(self) -> Iterator[Metric]:
        """Yield the gauges set so far."""
        for name, value in list(self._values.items()):
            yield GaugeMetricFamily(name, self._docs[name], value=value)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a non-negative integer, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}")
    return value


# Gauge families the scheduler side holds -> the label ``value`` takes for them (None: no label).
_SCHEDULER_GAUGES: dict[str, str | None] = {
    "kvbm_host_cache_hit_rate": None, "kvbm_disk_cache_hit_rate": None,
    "kvbm_load_bandwidth_bytes_per_second": "tier", "kvbm_prefill_tokens_per_second": None,
    "kvbm_g4_directory_in_sync": None, "kvbm_g4_directory_entries": None,
    "kvbm_workers_expected": None, "kvbm_workers_registered": None,
}


class KvbmMetrics:
    """The kvbm_* metrics of one block manager, or of one side of an engine connector, on a private registry (see
    the module docstring)."""

    def __init__(self, window: int = 1000, *, sides: str = "both", rank: int | None = None) -> None:
        """``window``: number of most recent requests the hit-rate gauges are computed over; ``sides``: the series
        held, one of ``SIDES``; ``rank``: the worker rank whose series these are (adds the ``rank`` label to the
        worker-side series; not with ``sides="scheduler"``)."""
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ValueError(f"window must be a positive integer number of requests, got {window!r}")
        if sides not in SIDES:
            raise ValueError(f"sides must be one of {', '.join(SIDES)}; got {sides!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank must be a non-negative int or None, got {rank!r}")
        if rank is not None and sides == "scheduler":
            raise ValueError("the scheduler side's series are not per rank: rank needs sides 'worker' or 'both'")
        self.sides = sides
        self.rank = rank
        self._rank_label: tuple[str, ...] = (str(rank),) if rank is not None else ()  # of the worker-side series
        self.registry = CollectorRegistry(auto_describe=True)
        self._totals = _Totals()
        self._gauge_values: dict[tuple[str, str], float] = {}
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        if sides != "scheduler":
            self._add_worker_series()
        if sides != "worker":
            self._add_scheduler_series(window)
        self.registry.register(self._totals)

    def _add_worker_series(self) -> None:
        ranked = ("rank",) if self.rank is not None else ()
        one = [self._rank_label]
        for direction, name in KVBM_BLOCK_COUNTERS.items():
            self._totals.add(name, _BLOCK_COUNTER_DOCS[direction] + " (total)", ranked, one)
        self._totals.add("kvbm_disk_file_renewals", "Disk tier files found deleted underneath and replaced by a new "
                         "one, their blocks lost (total)", ranked, one)
        by_direction = [(d, *self._rank_label) for d in DIRECTIONS]
        self._totals.add("kvbm_transfer_bytes", "Bytes of blocks moved intact, per direction (total)",
                         ("direction", *ranked), by_direction)
        self._totals.add("kvbm_transfer_failed_blocks", "Blocks whose transfer failed, per direction (total)",
                         ("direction", *ranked), by_direction)
        self._seconds = Histogram("kvbm_transfer_seconds", "Time from submit to completion of one transfer batch",
                                  ["direction", *ranked], buckets=_SECONDS_BUCKETS, registry=self.registry)
        for labels in by_direction:
            self._seconds.labels(*labels)

    def _add_scheduler_series(self, window: int) -> None:
        self._totals.add("kvbm_matched_tokens", "Tokens reported to the engine as found in the offload tiers (total)")
        self._totals.add("kvbm_remote_pin_timeouts", "Finished requests whose blocks were kept for a decode instance "
                         "and released unread after the timeout (total)")
        self._totals.add("kvbm_g4_lookups", "Lookups of the shared G4 tier's hash directory (etcd), each for the "
                         "blocks after a request's local run (total)")
        self._totals.add("kvbm_g4_hit_blocks", "Blocks those lookups found held by another instance (total)")
        self._totals.add("kvbm_store_dropped_blocks", "Engine blocks not stored because the first tier's queue of "
                         "stores held DYN_KVBM_MAX_STORE_BACKLOG_MS of writes, per tier (total)",
                         ("tier",), [(t,) for t in COST_TIERS])
        self._totals.add("kvbm_cost_dropped_blocks", "Blocks found in a tier but not reported to the engine, "
                         "recomputing them being expected faster than loading them, per tier (total)",
                         ("tier",), [(t,) for t in COST_TIERS])
        self._totals.add("kvbm_worker_failed_blocks", "Blocks of completed moves that failed on this worker rank, "
                         "as its reports told the scheduler side; a block failing on any rank fails for all (total)",
                         ("rank",), [])
        self._late = _LateGauges({
            "kvbm_workers_expected": "Worker ranks the scheduler side waits for (the engine's tensor x pipeline "
                                     "parallel ranks)",
            "kvbm_workers_registered": "Worker ranks registered with the scheduler side; until all are, nothing is "
                                       "matched or stored"})
        self.registry.register(self._late)
        self._host_rate = Gauge("kvbm_host_cache_hit_rate",
                                f"Share of looked-up blocks found in the host tier (G2), last {window} requests",
                                registry=self.registry)
        self._disk_rate = Gauge("kvbm_disk_cache_hit_rate",
                                f"Share of looked-up blocks found in the disk tier (G3), last {window} requests",
                                registry=self.registry)
        self._g4_seconds = Histogram("kvbm_g4_lookup_seconds", "Time of one lookup of the shared G4 tier's hash "
                                     "directory, on the scheduler's thread", buckets=_SECONDS_BUCKETS,
                                     registry=self.registry)
        self._bandwidth = Gauge("kvbm_load_bandwidth_bytes_per_second",
                                "Estimated load bandwidth into the engine's cache, per source tier (measured, else "
                                "configured)", ["tier"], registry=self.registry)
        self._pinned = Gauge("kvbm_remote_pinned_requests", "Finished requests whose G2 blocks are kept for a decode "
                             "instance to read", registry=self.registry)
        self._g4_in_sync = Gauge("kvbm_g4_directory_in_sync", "1 while the local copy of the shared G4 tier's "
                                 "directory follows etcd, 0 while it does not (G4 lookups then report no hits)",
                                 registry=self.registry)
        self._g4_entries = Gauge("kvbm_g4_directory_entries", "Other instances' block entries in the local copy of "
                                 "the shared G4 tier's directory", registry=self.registry)
        self._prefill = Gauge("kvbm_prefill_tokens_per_second",
                              "Estimated prefill rate of the engine (measured, else configured)",
                              registry=self.registry)
        self._window: deque[tuple[int, int, int]] = deque()
        self._window_len = window
        self._sums = [0, 0, 0]  # requested, host hits, disk hits over the window
        self._window_lock = threading.Lock()

    def _side(self, side: str, call: str) -> None:
        """Raise unless this object holds ``side``'s series (``call`` names the recording method)."""
        if self.sides != "both" and self.sides != side:
            raise RuntimeError(f"KvbmMetrics.{call} records a {side}-side series; this KvbmMetrics holds the "
                               f"{self.sides} side's only")

    def record_transfer(self, direction: str, *, blocks_ok: int, blocks_failed: int = 0, num_bytes: int,
                        seconds: float) -> None:
        """Account one finished batch: ``blocks_ok`` blocks and ``num_bytes`` bytes arrived intact,
        ``blocks_failed`` did not (never counted as moved), and the batch took ``seconds``."""
        self._side("worker", "record_transfer")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
        _check_count("blocks_ok", blocks_ok)
        _check_count("blocks_failed", blocks_failed)
        _check_count("num_bytes", num_bytes)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds < 0:
            raise ValueError(f"seconds must be a finite, non-negative number, got {seconds!r}")
        counter = KVBM_BLOCK_COUNTERS.get(direction)
        if counter is not None and blocks_ok:
            self._totals.inc(counter, blocks_ok, self._rank_label)
        labels = (direction, *self._rank_label)
        if num_bytes:
            self._totals.inc("kvbm_transfer_bytes", num_bytes, labels)
        if blocks_failed:
            self._totals.inc("kvbm_transfer_failed_blocks", blocks_failed, labels)
        self._seconds.labels(*labels).observe(seconds)

    def set_load_bandwidth(self, tier: str, bytes_per_second: float) -> None:
        """Publish the current load bandwidth estimate of ``tier`` (bytes/s)."""
        self._side("scheduler", "set_load_bandwidth")
        self._gauge_values[("kvbm_load_bandwidth_bytes_per_second", tier)] = self._check_rate(
            "bytes_per_second", bytes_per_second)
        self._bandwidth.labels(tier).set(bytes_per_second)

    def set_prefill_rate(self, tokens_per_second: float) -> None:
        """Publish the current prefill rate estimate (tokens/s)."""
        self._side("scheduler", "set_prefill_rate")
        self._gauge_values[("kvbm_prefill_tokens_per_second", "")] = self._check_rate(
            "tokens_per_second", tokens_per_second)
        self._prefill.set(tokens_per_second)

    def record_cost_dropped(self, tier: str, num_blocks: int) -> None:
        """Add ``num_blocks`` hits of ``tier`` that were not reported because recomputing them was cheaper."""
        self._side("scheduler", "record_cost_dropped")
        n = _check_count("num_blocks", num_blocks)
        if n:
            self._totals.inc("kvbm_cost_dropped_blocks", n, (tier,))

    def record_store_dropped(self, tier: str, num_blocks: int) -> None:
        """Add ``num_blocks`` engine blocks left unstored in ``tier`` because its queue of stores was full."""
        self._side("scheduler", "record_store_dropped")
        n = _check_count("num_blocks", num_blocks)
        if n:
            self._totals.inc("kvbm_store_dropped_blocks", n, (tier,))

    @staticmethod
    def _check_rate(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite, non-negative number, got {value!r}")
        return float(value)

    def set_remote_pins(self, num_requests: int) -> None:
        """Publish how many finished requests' blocks are kept for decode instances now."""
        self._side("scheduler", "set_remote_pins")
        self._pinned.set(_check_count("num_requests", num_requests))

    def record_remote_pin_timeouts(self, count: int) -> None:
        """Add ``count`` kept requests released unread after the timeout."""
        self._side("scheduler", "record_remote_pin_timeouts")
        self._totals.inc("kvbm_remote_pin_timeouts", _check_count("count", count))

    def record_g4_lookup(self, hit_blocks: int, seconds: float) -> None:
        """One lookup of the shared G4 tier's directory: ``hit_blocks`` found at another instance, in ``seconds``."""
        self._side("scheduler", "record_g4_lookup")
        n = _check_count("hit_blocks", hit_blocks)
        t = self._check_rate("seconds", seconds)
        self._totals.inc("kvbm_g4_lookups", 1)
        if n:
            self._totals.inc("kvbm_g4_hit_blocks", n)
        self._g4_seconds.observe(t)

    def set_g4_directory(self, in_sync: bool, entries: int) -> None:
        """Publish the state of the local copy of the shared G4 tier's directory: whether it follows etcd, and how
        many block entries of other instances it holds."""
        self._side("scheduler", "set_g4_directory")
        n = _check_count("entries", entries)
        self._gauge_values[("kvbm_g4_directory_in_sync", "")] = 1.0 if in_sync else 0.0
        self._gauge_values[("kvbm_g4_directory_entries", "")] = float(n)
        self._g4_in_sync.set(1 if in_sync else 0)
        self._g4_entries.set(n)

    def set_workers(self, expected: int, registered: int) -> None:
        """Publish how many worker ranks the scheduler side waits for and how many registered; every expected rank's
        ``kvbm_worker_failed_blocks`` is exposed from now on (at 0 until a block fails there)."""
        self._side("scheduler", "set_workers")
        n = _check_count("expected", expected)
        r = _check_count("registered", registered)
        if r > n:
            raise ValueError(f"registered ({r}) exceeds expected ({n}) worker ranks")
        self._totals.declare("kvbm_worker_failed_blocks", [(str(rank),) for rank in range(n)])
        for name, value in (("kvbm_workers_expected", n), ("kvbm_workers_registered", r)):
            self._gauge_values[(name, "")] = float(value)
            self._late.set(name, value)

    def record_worker_failed_blocks(self, rank: int, num_blocks: int) -> None:
        """Add ``num_blocks`` blocks whose move failed on worker ``rank``, as that rank reported."""
        self._side("scheduler", "record_worker_failed_blocks")
        _check_count("rank", rank)
        n = _check_count("num_blocks", num_blocks)
        if n:
            self._totals.inc("kvbm_worker_failed_blocks", n, (str(rank),))

    def record_disk_file_renewals(self, count: int) -> None:
        """Add ``count`` disk tier files found deleted and replaced."""
        self._side("worker", "record_disk_file_renewals")
        self._totals.inc("kvbm_disk_file_renewals", _check_count("count", count), self._rank_label)

    def record_matched_tokens(self, num_tokens: int) -> None:
        """Add the tokens of one lookup that the engine was told are available from the offload tiers."""
        self._side("scheduler", "record_matched_tokens")
        self._totals.inc("kvbm_matched_tokens", _check_count("num_tokens", num_tokens))

    def record_request_lookup(self, num_blocks_requested: int, host_hits: int, disk_hits: int) -> None:
        """Add one request's prefix lookup to the hit-rate window: of ``num_blocks_requested`` full blocks,
        ``host_hits`` were found in G2 and ``disk_hits`` in G3."""
        self._side("scheduler", "record_request_lookup")
        req = _check_count("num_blocks_requested", num_blocks_requested)
        host = _check_count("host_hits", host_hits)
        disk = _check_count("disk_hits", disk_hits)
        if host + disk > req:
            raise ValueError(f"host_hits + disk_hits ({host} + {disk}) exceeds num_blocks_requested ({req})")
        with self._window_lock:
            self._window.append((req, host, disk))
            self._sums[0] += req
            self._sums[1] += host
            self._sums[2] += disk
            if len(self._window) > self._window_len:
                old = self._window.popleft()
                for i in range(3):
                    self._sums[i] -= old[i]
            total, host_sum, disk_sum = self._sums
            rates = (host_sum / total, disk_sum / total) if total else (0.0, 0.0)
            self._gauge_values[("kvbm_host_cache_hit_rate", "")] = rates[0]
            self._gauge_values[("kvbm_disk_cache_hit_rate", "")] = rates[1]
            self._host_rate.set(rates[0])
            self._disk_rate.set(rates[1])

    def value(self, name: str, direction: str | None = None, *, tier: str | None = None,
              rank: int | None = None) -> float:
        """Current value of a kvbm_* total or gauge this object holds, by its exposed name, with the labels it has
        (``direction``, ``tier``, or ``rank`` for ``kvbm_worker_failed_blocks``; the ``rank`` of a ranked
        object's own series is implied); for reports such as the replay's."""
        given = {label: value for label, value in (("direction", direction), ("tier", tier), ("rank", rank))
                 if value is not None}
        if name in _SCHEDULER_GAUGES and self.sides != "worker":
            needed: tuple[str, ...] = (_SCHEDULER_GAUGES[name],) if _SCHEDULER_GAUGES[name] else ()
        else:
            try:
                needed = self._totals.labelnames(name)
            except KeyError:
                raise KeyError(f"no kvbm total or gauge named {name!r} among the {self.sides} side's series"
                               ) from None
            if name in WORKER_SERIES and self.rank is not None:
                needed = needed[:-1]  # this object's own rank
        for label in needed:
            if label not in given:
                example = {"direction": "direction='g1_to_g2'", "tier": "tier='G3'", "rank": "rank=0"}[label]
                raise ValueError(f"{name} needs a {label}, e.g. {example}")
        for label, value in given.items():
            if label not in needed:
                raise ValueError(f"{name} has no {label} label; got {label}={value!r}")
        if "direction" in given and direction not in DIRECTIONS:
            raise ValueError(f"{name} needs a direction, one of {', '.join(DIRECTIONS)}; got {direction!r}")
        if name in _SCHEDULER_GAUGES and self.sides != "worker":
            return self._gauge_values.get((name, tier or ""), 0.0)
        labels = tuple(str(given[label]) for label in needed)
        if name in WORKER_SERIES:
            labels += self._rank_label
        return float(self._totals.get(name, labels))

    def render(self) -> bytes:
        """The Prometheus text exposition of all metrics, as served over HTTP."""
        return generate_latest(self.registry)

    def start_server(self, port: int, addr: str | None = None, *, host: str | None = None) -> int:
        """Serve the metrics over HTTP on ``host:port`` from a daemon thread; port 0 picks a free port.

        ``host`` (``addr`` is the older name) defaults to ``DYN_KVBM_METRICS_HOST``, itself 127.0.0.1: only this
        machine can scrape unless it is set to 0.0.0.0 or the pod IP. Returns the bound port."""
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
        if host is not None and addr is not None and host != addr:
            raise ValueError(f"host={host!r} and addr={addr!r} disagree; pass one")
        host = host if host is not None else addr if addr is not None else metrics_host_from_env()
        if self._server is not None:
            raise RuntimeError(f"metrics server already running on port {self._server.server_address[1]}")
        try:
            self._server, self._server_thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve kvbm metrics on {host}:{port} ({exc.strerror}); "
                                     "set DYN_KVBM_METRICS_PORT to a free port or DYN_KVBM_METRICS_HOST to an "
                                     "address of this machine") from exc
        return self._server.server_address[1]

    @property
    def server_address(self) -> tuple[str, int] | None:
        """(host, port) the metrics server listens on, or None when it is not running."""
        return None if self._server is None else self._server.server_address[:2]

    def stop_server(self) -> None:
        """Stop the HTTP server started by ``start_server`` and free its port (no-op when none runs)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._server_thread is not None:
            self._server_thread.join(timeout=5)
        self._server = self._server_thread = None
