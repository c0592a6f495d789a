"""Cost-aware hits: the rule on constructed numbers, learning, probes, the off switch, its DYN_KVBM_* variables and
metrics, the connector leader's lookup, and a BlockManager on CPU whose disk turns slow."""
from __future__ import annotations

import logging
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import pytest

from kvbm.config import GB, KvbmConfig, KvbmConfigError
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import WorkerReport
from kvbm.kernels.block_transfer import BlockTransfer
from kvbm.kernels.medium import Medium
from kvbm.leader import MoveResult
from kvbm.leader.plans import Move, MoveKind
from kvbm.manager import BlockManager, BlockResult, Match
from kvbm.metrics import KvbmMetrics
from kvbm.policies.cost import LoadCostPolicy
from kvbm.policies.step_fit import KEEP, MIN_PAIRS, WINDOW, StepFit
from kvbm.tiers import TierSpec
from kvbm.worker.store import BlockStore
from manager_testkit import GEOM, config, make_gpu

MIB = 2**20
BLOCK = 2 * MIB  # an 8B model's 16-token block (128 KiB of KV per token)


def policy(g3_bw: float = 2e9, *, g2_bw: float = 20e9, g3_latency: float = 0.2e-3, prefill: float = 10_000.0,
           **kw) -> LoadCostPolicy:
    """16-token blocks of 2 MiB: recompute 1.6 ms per block at 10k tokens/s."""
    return LoadCostPolicy(["G2", "G3"], block_bytes=BLOCK, block_tokens=16, bandwidth={"G2": g2_bw, "G3": g3_bw},
                          latency={"G2": 0.05e-3, "G3": g3_latency}, prefill_rate=prefill, **kw)


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the rule ------------------------------------------------------------------------------------------------------

def test_g3_slower_than_recompute_is_dropped_and_g2_kept():
    p = policy(g3_bw=1e9)  # 2.1 ms per G3 block against 1.6 ms of recompute
    d = p.decide((4, 8))
    assert (d.num_blocks, d.hits, d.dropped, d.probe) == (4, (4, 0), (0, 8), False)
    assert d.load_seconds < d.recompute_seconds
    assert p.decide((0, 8)).num_blocks == 0  # a G3-only match: nothing worth loading
    # the full match would still be cheaper in total, but only because of G2: its G3 part is never reported
    d = p.decide((100, 2))
    assert p.load_seconds((100, 2)) < p.recompute_seconds(102) and d.hits == (100, 0)


def test_g3_prefix_worth_loading_is_kept():
    p = policy(g3_bw=2e9)  # 1.05 ms per G3 block
    assert p.decide((4, 8)).hits == (4, 8)
    assert p.decide((0, 8)).hits == (0, 8)
    # the fixed latency must be paid back: 2 blocks save 1.1 ms, less than a 5 ms latency; 20 blocks save 11 ms
    slow_start = policy(g3_bw=2e9, g3_latency=5e-3)
    assert slow_start.decide((0, 2)).num_blocks == 0
    assert slow_start.decide((3, 2)).hits == (3, 0)
    assert slow_start.decide((0, 20)).hits == (0, 20)


def test_pays_off_is_the_rules_comparison_for_one_tier_without_probes():
    """`pays_off` answers whether loading n blocks of a tier beats recomputing them, as `decide` would for a hit of
    that tier alone, never consuming a probe; True while the rule is disabled; bad input raises."""
    clock = Clock()
    p = policy(g3_bw=1e9, g3_latency=5e-3, clock=clock, probe_seconds=1.0)  # 2.1 ms a block against 1.6 ms
    clock.now += 10.0  # a probe is due
    assert not p.pays_off("G3", 1000) and p.decide((0, 1000)).probe  # the probe is still there for `decide`
    fast = policy(g3_bw=2e9, g3_latency=5e-3)  # 1.05 ms a block: 20 blocks pay back the latency, 2 do not
    assert fast.pays_off("G3", 20) and not fast.pays_off("G3", 2)
    assert all(fast.pays_off("G3", n) == bool(fast.decide((0, n)).num_blocks) for n in (1, 2, 5, 9, 10, 20, 200))
    off = policy(g3_bw=1e6, enabled=False)
    assert off.pays_off("G3", 1)
    with pytest.raises(ValueError, match="no tier"):
        p.pays_off("G4", 1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_blocks"):
            p.pays_off("G3", bad)


def test_g2_is_dropped_only_when_it_cannot_pay_its_latency():
    p = LoadCostPolicy(["G2", "G3"], block_bytes=BLOCK, block_tokens=16, bandwidth={"G2": 20e9, "G3": 2e9},
                       latency={"G2": 2e-3, "G3": 0.2e-3}, prefill_rate=10_000.0)
    assert p.decide((1, 0)).num_blocks == 0  # 2.1 ms of load against 1.6 ms of recompute
    assert p.decide((1, 10)).hits == (1, 10)  # the G3 run after it pays for both
    assert p.decide((2, 0)).hits == (2, 0)


def test_whole_tier_parts_and_more_tiers():
    p = LoadCostPolicy(["G2", "G3", "G4"], block_bytes=BLOCK, block_tokens=16,
                       bandwidth={"G2": 20e9, "G3": 2e9, "G4": 0.5e9}, latency={"G2": 0, "G3": 0, "G4": 0},
                       prefill_rate=10_000.0)
    assert p.decide((2, 3, 4)).hits == (2, 3, 0)
    assert p.decide((0, 0, 0)).num_blocks == 0
    with pytest.raises(ValueError, match="3 non-negative ints"):
        p.decide((1, 2))


def g4_policy(g4_bw: float, *, g4_latency: float = 1.5e-3, **kw) -> LoadCostPolicy:
    """G2 and G3 as `policy`, then the shared G4 tier (another instance's G2)."""
    return LoadCostPolicy(["G2", "G3", "G4"], block_bytes=BLOCK, block_tokens=16,
                          bandwidth={"G2": 20e9, "G3": 2e9, "G4": g4_bw}, latency={"G2": 0.05e-3, "G3": 0.2e-3,
                                                                                "G4": g4_latency},
                          prefill_rate=10_000.0, **kw)


def test_g4_hits_slower_than_recompute_are_dropped_and_faster_ones_kept():
    metrics = KvbmMetrics()
    slow = g4_policy(1e9, metrics=metrics)  # 2.1 ms per G4 block against 1.6 ms of recompute
    d = slow.decide((2, 3, 10))
    assert (d.hits, d.dropped, d.probe) == ((2, 3, 0), (0, 0, 10), False)
    assert slow.decide((0, 0, 10)).num_blocks == 0
    assert metrics.value("kvbm_cost_dropped_blocks", tier="G4") == 20
    fast = g4_policy(2.5e9)  # 0.84 ms per block after 1.5 ms per load: 10 blocks save 6.1 ms
    assert fast.decide((2, 3, 10)).hits == (2, 3, 10)
    assert fast.decide((0, 0, 10)).hits == (0, 0, 10)
    assert fast.decide((0, 0, 1)).num_blocks == 0  # one block cannot pay the latency back
    slow_start = g4_policy(2.5e9, g4_latency=20e-3)  # a far holder: 20 ms per load
    assert slow_start.decide((0, 0, 20)).num_blocks == 0 and slow_start.decide((0, 0, 40)).hits == (0, 0, 40)


def test_g4_run_is_reported_only_after_the_whole_local_run():
    """G4 blocks follow the local ones: a G3 part slower than its recompute is loaded when the G4 run after it
    pays for both (recomputing the G3 part would recompute everything after it), and dropped with it otherwise."""
    p = LoadCostPolicy(["G2", "G3", "G4"], block_bytes=BLOCK, block_tokens=16,
                       bandwidth={"G2": 20e9, "G3": 1e9, "G4": 5e9}, latency={"G2": 0, "G3": 0, "G4": 0},
                       prefill_rate=10_000.0)  # G3 2.1 ms a block (0.5 ms lost each), G4 0.42 ms (1.18 ms saved)
    assert p.decide((2, 3, 10)).hits == (2, 3, 10)
    assert p.decide((2, 10, 1)).hits == (2, 0, 0)
    clock = Clock()
    probing = g4_policy(1e9, probe_seconds=60.0, probe_blocks=4, clock=clock)
    clock.now += 60
    d = probing.decide((2, 3, 10))  # a probe of the dropped G4 tier: its first batch, after the local run
    assert d.probe and d.hits == (2, 3, 4) and d.dropped == (0, 0, 6)


def test_g4_estimates_learned_from_completed_loads():
    p = g4_policy(2.5e9, g4_latency=1e-3)
    assert p.decide((0, 0, 10)).hits == (0, 0, 10)
    p.observe_load("G4", num_bytes=10 * BLOCK, seconds=1e-3 + 10 * BLOCK / 0.5e9)  # 0.5 GB/s: 4.2 ms a block
    assert p.bandwidth("G4") == pytest.approx(0.5e9)
    assert p.decide((0, 0, 10)).num_blocks == 0
    for _ in range(30):  # the holder's network recovers: 4 GB/s
        p.observe_load("G4", num_bytes=10 * BLOCK, seconds=1e-3 + 10 * BLOCK / 4e9)
    assert p.bandwidth("G4") == pytest.approx(4e9, rel=0.02)
    assert p.decide((0, 0, 10)).hits == (0, 0, 10)
    p.observe_load("G4", num_bytes=0, seconds=0.5)  # a load whose every block failed (stale entries): time lost
    assert p.bandwidth("G4") < 4e9 and p.bandwidth("G2") == 20e9 and p.bandwidth("G3") == 2e9


def test_off_switch_reports_every_hit():
    cfg = KvbmConfig.from_env({"DYN_KVBM_DISABLE_COST_AWARE_HITS": "true", "DYN_KVBM_DISK_LOAD_GB_PER_S": "0.001"})
    p = LoadCostPolicy.from_config(cfg, ["G2", "G3"], block_bytes=BLOCK, block_tokens=16)
    assert not p.enabled
    d = p.decide((4, 8))
    assert d.hits == (4, 8) and d.dropped == (0, 0)
    on = LoadCostPolicy.from_config(KvbmConfig(disk_load_gb_per_s=0.001), ["G2", "G3"], block_bytes=BLOCK,
                                    block_tokens=16)
    assert on.enabled and on.decide((4, 8)).hits == (4, 0)


# -- learning --------------------------------------------------------------------------------------------------

def test_bandwidth_learned_from_loads_converges():
    p = policy(g3_bw=2e9, alpha=0.2)
    assert p.decide((4, 8)).hits == (4, 8)
    for _ in range(40):  # 16 blocks in 0.2 ms of latency + 0.32 s: 100 MB/s
        p.observe_load("G3", num_bytes=16 * BLOCK, seconds=0.2e-3 + 16 * BLOCK / 1e8)
    assert p.bandwidth("G3") == pytest.approx(1e8, rel=1e-6)
    assert p.decide((4, 8)).hits == (4, 0)
    for _ in range(60):  # the disk recovers: 3 GB/s
        p.observe_load("G3", num_bytes=16 * BLOCK, seconds=0.2e-3 + 16 * BLOCK / 3e9)
    assert p.bandwidth("G3") == pytest.approx(3e9, rel=0.01)
    assert p.decide((4, 8)).hits == (4, 8)
    assert p.bandwidth("G2") == 20e9  # not measured: still the configured value


def test_first_measurement_replaces_the_default_and_failed_blocks_cost_time():
    p = policy(g3_bw=2e9, g3_latency=0.0)
    p.observe_load("G3", num_bytes=0, seconds=1.0)  # every block failed after a second
    assert p.bandwidth("G3") == 0.0
    d = p.decide((4, 8))
    assert d.hits == (4, 0) and p.load_seconds((4, 8)) == float("inf")


def test_prefill_rate_learned_from_steps():
    p = policy(g3_bw=1e9)  # G3 loses at 10k tokens/s ...
    assert p.decide((4, 8)).hits == (4, 0)
    for _ in range(30):
        p.observe_prefill(4096, 4096 / 5000)  # ... and wins at 5k tokens/s (3.2 ms per block)
    assert p.prefill_rate == pytest.approx(5000)
    assert p.decide((4, 8)).hits == (4, 8)
    with pytest.raises(ValueError, match="seconds"):
        p.observe_prefill(10, 0.0)


# An H100 step of a Llama-3.1-8B-shaped model, modelled: 12 ms of fixed cost, then 38k tokens/s at the margin.
FIXED_S, MARGINAL = 12e-3, 38_000.0


def step_seconds(tokens: int, rng: np.random.Generator, noise: float = 0.03) -> float:
    return (FIXED_S + tokens / MARGINAL) * float(rng.uniform(1 - noise, 1 + noise))


def test_prefill_rate_is_the_marginal_rate_and_flips_a_decision(rng):
    """Mostly short steps: their average rate (13.7k tokens/s for 256 tokens, 31k for 2048) overrates recomputing.
    G3 loads a block in 0.47 ms: faster than recomputing it at any step's average rate (0.51 ms at the fastest),
    slower than at the marginal rate (0.42 ms), so the G3 part is dropped; G2 (0.1 ms a block) is kept."""
    p = policy(g3_bw=4.5e9, g3_latency=0.0)
    averages = []
    for i in range(40):
        tokens = 2048 if i % 4 == 3 else 256
        seconds = step_seconds(tokens, rng)
        averages.append(tokens / seconds)
        p.observe_prefill(tokens, seconds)
    d = p.decide((4, 8))
    assert (d.hits, d.dropped) == ((4, 0), (0, 8)) and d.load_seconds < d.recompute_seconds
    assert p.prefill_rate == pytest.approx(MARGINAL, rel=0.04)
    assert max(averages) < 0.85 * MARGINAL
    assert 16 / MARGINAL < p.load_seconds((0, 1)) < 16 / max(averages)


def test_steps_of_one_size_keep_the_average_rate(rng):
    """No slope to fit: steps all of 1024 tokens, then sizes within 20% of each other, give the average rate."""
    p = policy()
    for _ in range(40):
        p.observe_prefill(1024, step_seconds(1024, rng, noise=0.0))
    assert p.prefill_rate == pytest.approx(1024 / (FIXED_S + 1024 / MARGINAL))
    q = policy()
    tokens = [int(t) for t in rng.integers(1000, 1200, size=40)]
    for n in tokens:
        q.observe_prefill(n, step_seconds(n, rng, noise=0.0))
    assert q.prefill_rate == pytest.approx(1100 / (FIXED_S + 1100 / MARGINAL), rel=0.02)
    assert q.prefill_rate < 0.75 * MARGINAL


def test_the_fit_needs_enough_pairs_of_steps_of_different_sizes(rng):
    """Pairs count only where sizes differ by a quarter or more; the fit starts at MIN_PAIRS of them, and only the
    last WINDOW steps count: once they are all of one size again, the average rate is back."""
    fit = StepFit()
    fit.add(1000, step_seconds(1000, rng))
    for _ in range(WINDOW - 1):
        fit.add(1240, step_seconds(1240, rng))  # within a quarter of 1000: no pair counts
    assert fit.per_token is None
    fit = StepFit()
    fit.add(1000, step_seconds(1000, rng))
    for k in range(1, MIN_PAIRS + 1):  # k steps of 2000 tokens: k pairs with the one of 1000
        assert fit.per_token is None
        fit.add(2000, step_seconds(2000, rng))
    assert fit.per_token == pytest.approx(1 / MARGINAL, rel=0.15)
    for _ in range(WINDOW):
        fit.add(2000, step_seconds(2000, rng))
    assert fit.per_token is None
    for _ in range(MIN_PAIRS):
        fit.add(4000, 1e-3)  # bigger steps timed faster: no positive slope
    assert fit.per_token is None


def test_a_few_outlying_steps_do_not_move_the_marginal_rate(rng):
    """Steps of 128-4096 tokens; among the last 32, three short ones were held up (0.3 s) and one long one timed
    short (5 ms). A least-squares line through them slopes down; the fit stays within 10% of the marginal rate."""
    p = policy()
    steps = [(n, step_seconds(n, rng)) for n in (int(t) for t in rng.integers(128, 4097, size=40))]
    steps[20], steps[27], steps[33] = (128, 0.3), (130, 0.3), (140, 0.3)
    steps[38] = (4096, 5e-3)
    for n, seconds in steps:
        p.observe_prefill(n, seconds)
    window = np.array(steps[-32:], dtype=np.float64)
    assert np.polyfit(window[:, 0], window[:, 1], 1)[0] < 0
    assert p.prefill_rate == pytest.approx(MARGINAL, rel=0.1)


def test_a_host_bound_engines_noisy_short_steps_do_not_make_a_slow_disk_worth_loading(rng):
    """Steps as an H100 showed them for Qwen3-0.6B, whose prefill is host-bound at these sizes: short steps of 32-48
    tokens in 19-22 ms, 256-token steps in 20-37 ms (host noise), a 2304-token step in 20.8 ms. Their slopes are
    noise, and the fit's median is far too steep; the recompute time of a 2048-token prefix still stays at most
    the 2304-token step's time, so a G3 prefix read at 1.8 GB/s (235 MB, 130 ms) is dropped, and G2 (20 GB/s) kept."""
    block = 1_835_008  # Qwen3-0.6B: 28 layers x 2 x 8 KV heads x 128 x 16 tokens x 2 bytes
    p = LoadCostPolicy(["G2", "G3"], block_bytes=block, block_tokens=16, bandwidth={"G2": 20e9, "G3": 1.8e9},
                       latency={"G2": 0.05e-3, "G3": 0.2e-3}, prefill_rate=100_000.0)
    steps = [(32, 0.019), (48, 0.021), (32, 0.020), (48, 0.022), (2304, 0.0208)]
    steps += [(256, float(rng.uniform(0.020, 0.037))) for _ in range(12)]
    steps += [(32, float(rng.uniform(0.019, 0.022))) for _ in range(4)]
    steps[-1] = (48, 0.019)
    for n, seconds in steps:
        p.observe_prefill(n, seconds)
    assert p.prefill_rate < 30_000  # the fit: 128 blocks' tokens would take over 68 ms at this rate
    assert p.recompute_seconds(128) <= 0.0208
    assert p.load_seconds((0, 128)) > 0.13
    d = p.decide((0, 128))
    assert (d.num_blocks, d.dropped) == (0, (0, 128))
    d = p.decide((128, 0))
    assert d.hits == (128, 0) and d.load_seconds < d.recompute_seconds


def test_the_marginal_bound_is_the_least_any_kept_step_allows(rng):
    """``marginal_bound(n)``: the least of ``s * max(1, n / t)`` over the last KEEP steps of each size class (token
    counts within a power of two); never below the true marginal cost of steps that follow ``fixed + per_token *
    t``; None before a step of at least one token."""
    fit = StepFit()
    assert fit.marginal_bound(100) is None
    fit.add(0, 0.01)
    assert fit.marginal_bound(100) is None
    steps = [(int(n), step_seconds(int(n), rng, noise=0.0)) for n in rng.integers(1, 1 << 16, size=10 * WINDOW)]
    for n, seconds in steps:
        fit.add(n, seconds)
    kept: dict[int, list[tuple[int, float]]] = {}
    for n, seconds in steps:
        kept.setdefault(n.bit_length(), []).append((n, seconds))
    kept_steps = [step for group in kept.values() for step in group[-KEEP:]]
    for tokens in (1, 100, 2048, 8191, 65536, 1 << 20):
        expected = min(s * max(1.0, tokens / t) for t, s in kept_steps)
        assert fit.marginal_bound(tokens) == pytest.approx(expected, rel=1e-12)
        assert fit.marginal_bound(tokens) >= tokens / MARGINAL


def test_a_long_step_bounds_a_prefix_after_a_window_of_short_ones():
    """As in the TTFT bench on an H100 (Qwen3-0.6B): ten 2304-token steps in 38.5 ms, then 40 steps of 256 tokens
    in 34 ms (a host-bound forward): the window holds only the short ones, whose average rate (7.5k tokens/s) would
    put a 2048-token prefix at 272 ms, above a G3 read of it at 1.04 GB/s (226 ms); the long steps, kept past the
    window, bound it to 38.5 ms, so G3 is dropped."""
    block = 1_835_008
    p = LoadCostPolicy(["G3"], block_bytes=block, block_tokens=16, bandwidth={"G3": 1.04e9}, latency={"G3": 0.2e-3},
                       prefill_rate=100_000.0)
    for _ in range(10):
        p.observe_prefill(2304, 0.0385)
    for _ in range(40):
        p.observe_prefill(256, 0.034)
    assert p.prefill_rate == pytest.approx(256 / 0.034, rel=1e-2)
    assert p.recompute_seconds(128) == pytest.approx(0.0385)
    assert p.decide((128,)).num_blocks == 0


def test_marginal_rate_is_exported_and_logged(rng, caplog):
    metrics = KvbmMetrics()
    p = policy(prefill=5000.0, metrics=metrics)
    caplog.set_level(logging.INFO, logger="kvbm.policies.cost")
    for i in range(12):
        tokens = 128 * (1 + i % 8)
        p.observe_prefill(tokens, step_seconds(tokens, rng))
    assert p.prefill_rate == pytest.approx(MARGINAL, rel=0.05)
    assert metrics.value("kvbm_prefill_tokens_per_second") == p.prefill_rate
    logged = [float(r.getMessage().split(" now ")[1].split()[0]) for r in caplog.records
              if r.levelno == logging.INFO and "prefill rate now" in r.getMessage()]
    assert logged[-1] == pytest.approx(p.prefill_rate, rel=0.2)  # logged when the fit took over from the average
    assert max(logged[:-1]) < 0.5 * MARGINAL


def test_a_dropped_tier_is_probed_with_one_batch_per_interval():
    clock = Clock()
    p = policy(g3_bw=1e9, probe_seconds=60.0, probe_blocks=4, clock=clock)
    assert p.decide((2, 10)).hits == (2, 0)
    clock.now += 60
    d = p.decide((2, 10))
    assert d.probe and d.hits == (2, 4) and d.dropped == (0, 6)
    assert p.decide((2, 10)).hits == (2, 0)  # once per interval
    clock.now += 30
    p.observe_load("G3", num_bytes=4 * BLOCK, seconds=4 * BLOCK / 1e9)  # a measurement restarts the interval
    clock.now += 59
    assert not p.decide((2, 10)).probe
    never = policy(g3_bw=1e9, probe_seconds=0.0, clock=clock)
    clock.now += 1e6
    assert never.decide((2, 10)).hits == (2, 0)



class _HostCache:
    """A stand-in cache the store can address (only its medium is read)."""
    medium = Medium.HOST


class _HeldTransfers:
    """Transfers that finish only when the test says so: one future per submit."""

    def __init__(self) -> None:
        self.futures: list[Future] = []

    def submit(self, src, dst, src_ids, dst_ids, **kw) -> BlockTransfer:
        future = Future()
        self.futures.append(future)

        def steps():
            while not future.done():
                yield future
            return {}
        return BlockTransfer(len(src_ids), "held", steps())

    def close(self) -> None:
        pass


def test_overlapping_loads_are_charged_shares_of_their_wall_time():
    """Four loads of one path started together and finishing one after another (a disk serving them in turn) took
    4 s of wall time for 4 moves' bytes: their seconds add up to 4 (not 1 + 2 + 3 + 4), so the rule learns the
    path's bandwidth, not a quarter of it; a move of another path is charged only its own time."""
    clock = Clock()
    transfers = _HeldTransfers()
    store = BlockStore({"G1": _HostCache(), "G3": _HostCache(), "G2": _HostCache()}, transfers, max_in_flight=8,
                       clock=clock)
    moves = [Move(k, MoveKind.LOAD, "G3", "G1", (k,), (k,), (100 + k,)) for k in range(4)]
    moves.append(Move(9, MoveKind.LOAD, "G2", "G1", (0,), (9,), (109,)))
    store.execute(moves)
    seconds = {}
    for k in (0, 1, 2, 3):
        clock.now += 1.0
        transfers.futures[k].set_result(None)
        if k == 1:
            transfers.futures[4].set_result(None)
        seconds |= {r.move_id: r.seconds for r in store.poll()}
    assert seconds[0] == pytest.approx(0.25) and seconds[3] == pytest.approx(0.25 + 1 / 3 + 0.5 + 1)
    assert sum(seconds[k] for k in range(4)) == pytest.approx(4.0)
    assert seconds[9] == pytest.approx(2.0)
    p = policy(g3_latency=0.0)
    for k in range(4):
        p.observe_load("G3", num_bytes=BLOCK, seconds=seconds[k])
    assert 0.7 * BLOCK < p.bandwidth("G3") < 1.5 * BLOCK  # about one block/s (wall times: 0.36)


def test_a_synchronous_move_reports_its_own_time_not_the_time_until_a_poll():
    """A copy done inside its submit (a CPU copy) took 0.01 s; the poll that collects it comes 2 s later: its
    seconds are 0.01, and it takes no share of the time an asynchronous move of its direction runs."""
    clock = Clock()
    held = _HeldTransfers()

    class Synchronous:
        def submit(self, src, dst, src_ids, dst_ids, **kw) -> BlockTransfer:
            if src_ids[0] == 7:
                return held.submit(src, dst, src_ids, dst_ids)
            clock.now += 0.01
            return BlockTransfer.completed(len(src_ids), "sync")

        def close(self) -> None:
            pass

    store = BlockStore({"G1": _HostCache(), "G2": _HostCache()}, Synchronous(), clock=clock)
    store.execute([Move(1, MoveKind.LOAD, "G2", "G1", (7,), (0,), (107,)),
                   Move(2, MoveKind.LOAD, "G2", "G1", (3,), (1,), (103,))])
    clock.now += 2.0
    held.futures[0].set_result(None)
    seconds = {r.move_id: r.seconds for r in store.poll()}
    assert seconds[2] == pytest.approx(0.01)
    assert seconds[1] == pytest.approx(2.01)  # the held move ran alone: the synchronous one took no share


# -- configuration ---------------------------------------------------------------------------------------------

def test_config_defaults_and_variables():
    cfg = KvbmConfig.from_env({})
    assert (cfg.disable_cost_aware_hits, cfg.host_load_gb_per_s, cfg.disk_load_gb_per_s, cfg.host_load_latency_ms,
            cfg.disk_load_latency_ms, cfg.g4_load_gb_per_s, cfg.g4_load_latency_ms, cfg.prefill_tokens_per_s,
            cfg.cost_probe_secs) == (False, 20.0, 1.5, 0.05, 0.2, 2.5, 1.5, 10_000.0, 60.0)
    cfg = KvbmConfig.from_env({"DYN_KVBM_HOST_LOAD_GB_PER_S": "40", "DYN_KVBM_DISK_LOAD_GB_PER_S": " 2.5 ",
                               "DYN_KVBM_HOST_LOAD_LATENCY_MS": "0", "DYN_KVBM_DISK_LOAD_LATENCY_MS": "1",
                               "DYN_KVBM_G4_LOAD_GB_PER_S": "0.8", "DYN_KVBM_G4_LOAD_LATENCY_MS": "4",
                               "DYN_KVBM_PREFILL_TOKENS_PER_S": "25000", "DYN_KVBM_COST_PROBE_SECS": "0",
                               "DYN_KVBM_DISABLE_COST_AWARE_HITS": "yes"})
    p = LoadCostPolicy.from_config(cfg, ["G2", "G3"], block_bytes=BLOCK, block_tokens=16)
    assert p.bandwidth("G2") == 40 * GB and p.bandwidth("G3") == 2.5 * GB
    assert p.latency("G2") == 0 and p.latency("G3") == pytest.approx(1e-3)
    assert p.prefill_rate == 25_000 and p.probe_seconds == 0 and not p.enabled
    shared = LoadCostPolicy.from_config(cfg, ["G2", "G3", "G4"], block_bytes=BLOCK, block_tokens=16)
    assert shared.bandwidth("G4") == 0.8 * GB and shared.latency("G4") == pytest.approx(4e-3)
    assert shared.bandwidth("G3") == 2.5 * GB
    only_disk = LoadCostPolicy.from_config(cfg, ["G3"], block_bytes=BLOCK, block_tokens=16)
    assert only_disk.bandwidth("G3") == 2.5 * GB and only_disk.probe_blocks == cfg.max_transfer_batch_size


@pytest.mark.parametrize("key, value", [
    ("DYN_KVBM_HOST_LOAD_GB_PER_S", "0"),
    ("DYN_KVBM_HOST_LOAD_GB_PER_S", "fast"),
    ("DYN_KVBM_DISK_LOAD_GB_PER_S", "-1"),
    ("DYN_KVBM_DISK_LOAD_GB_PER_S", "inf"),
    ("DYN_KVBM_DISK_LOAD_GB_PER_S", "1e5"),
    ("DYN_KVBM_HOST_LOAD_LATENCY_MS", "-0.1"),
    ("DYN_KVBM_DISK_LOAD_LATENCY_MS", "nan"),
    ("DYN_KVBM_G4_LOAD_GB_PER_S", "0"),
    ("DYN_KVBM_G4_LOAD_GB_PER_S", "2 GB/s"),
    ("DYN_KVBM_G4_LOAD_LATENCY_MS", "-1"),
    ("DYN_KVBM_G4_LOAD_LATENCY_MS", "1e7"),
    ("DYN_KVBM_PREFILL_TOKENS_PER_S", "0"),
    ("DYN_KVBM_PREFILL_TOKENS_PER_S", "10k"),
    ("DYN_KVBM_COST_PROBE_SECS", "-5"),
    ("DYN_KVBM_DISABLE_COST_AWARE_HITS", "maybe"),
])
def test_bad_values_name_the_variable(key, value):
    with pytest.raises(KvbmConfigError, match=rf"^{key}=.* is invalid: expected"):
        KvbmConfig.from_env({key: value})


def test_direct_construction_is_checked():
    with pytest.raises(KvbmConfigError, match="DYN_KVBM_DISK_LOAD_GB_PER_S"):
        KvbmConfig(disk_load_gb_per_s=0)
    with pytest.raises(KvbmConfigError, match="DYN_KVBM_PREFILL_TOKENS_PER_S"):
        KvbmConfig(prefill_tokens_per_s="10000")
    with pytest.raises(KvbmConfigError, match="DYN_KVBM_DISABLE_COST_AWARE_HITS"):
        KvbmConfig(disable_cost_aware_hits=1)
    assert KvbmConfig(host_load_latency_ms=0).host_load_latency_ms == 0.0


# -- metrics and logs ------------------------------------------------------------------------------------------

def test_estimates_and_dropped_blocks_are_exported():
    metrics = KvbmMetrics()
    p = policy(g3_bw=1e9, metrics=metrics)
    text = metrics.render().decode()
    assert 'kvbm_load_bandwidth_bytes_per_second{tier="G2"} 2e+10' in text
    assert 'kvbm_load_bandwidth_bytes_per_second{tier="G3"} 1e+09' in text
    assert "kvbm_prefill_tokens_per_second 10000.0" in text
    assert 'kvbm_cost_dropped_blocks{tier="G3"} 0.0' in text
    p.decide((4, 8))
    p.decide((0, 5))
    assert metrics.value("kvbm_cost_dropped_blocks", tier="G3") == 13
    assert metrics.value("kvbm_cost_dropped_blocks", tier="G2") == 0
    assert 'kvbm_cost_dropped_blocks{tier="G3"} 13.0' in metrics.render().decode()
    p.observe_prefill(100, 1.0)
    assert metrics.value("kvbm_prefill_tokens_per_second") == 100
    with pytest.raises(ValueError, match="needs a tier"):
        metrics.value("kvbm_cost_dropped_blocks")


def test_decisions_at_debug_and_estimate_changes_at_info(caplog):
    caplog.set_level(logging.DEBUG, logger="kvbm.policies.cost")
    p = policy(g3_bw=1e9, g3_latency=0.0)
    caplog.clear()
    p.decide((4, 8))
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "found 4 G2 + 8 G3, report 4 G2 + 0 G3" in caplog.records[0].getMessage()
    caplog.clear()
    p.observe_load("G3", num_bytes=100, seconds=100 / 1.1e9)  # +10%: not logged
    p.observe_load("G3", num_bytes=100, seconds=100 / 0.5e9)  # well below: logged once
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "G3 load bandwidth now" in infos[0]


# -- connector leader ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TimedResult:
    """A worker's result carrying the load's seconds, as `MoveResult` will."""

    move_id: int
    failed: dict = field(default_factory=dict)
    lost: frozenset = frozenset()
    reports: int = 1
    seconds: float | None = None


def _settle(leader: ConnectorLeader, moves, seconds: float | None = None) -> None:
    leader.apply(WorkerReport({m.move_id: (MoveResult(m.move_id) if seconds is None
                                            else TimedResult(m.move_id, seconds=seconds)) for m in moves}))


def test_connector_leader_lookup_reports_only_hits_worth_loading():
    cfg = KvbmConfig(disable_disk_offload_filter=True, cost_probe_secs=0)
    tiers = [TierSpec("G2", Medium.HOST, 4), TierSpec("G3", Medium.DISK, 16)]
    metrics = KvbmMetrics()
    cost = LoadCostPolicy.from_config(cfg, [t.name for t in tiers], block_bytes=BLOCK, block_tokens=16,
                                      metrics=metrics)
    leader = ConnectorLeader(tiers, cfg, 16, metrics=metrics, cost=cost)
    hashes = list(range(1, 9))
    for start in (0, 4):  # 8 blocks through a G2 of 4: all in G3, the last 4 in G2
        plan = leader.index.plan_store(hashes[start:start + 4], list(range(start, start + 4)))
        _settle(leader, plan.moves)
        _settle(leader, leader.take_step().cascades)
    assert leader.lookup(hashes, whole_prompt=False) == (8, 0)
    load = leader.plan_load("r", hashes[:4], [0, 1, 2, 3])
    _settle(leader, load.moves, seconds=4 * BLOCK / 1e7)  # a slow disk: 10 MB/s
    assert cost.bandwidth("G3") == pytest.approx(1e7, rel=0.05)
    assert leader.lookup(hashes, whole_prompt=False) == (0, 0)
    assert metrics.value("kvbm_cost_dropped_blocks", tier="G3") == 8
    no_rule = ConnectorLeader(tiers, cfg, 16)
    assert no_rule.cost is None


def test_step_seconds_from_the_fit_else_the_average_else_the_configured_rate(rng):
    """A whole step's expected time: configured rate first, the average rate while steps give no slope, then the
    fit's fixed part plus its per-token part (within 5% of the model the steps were drawn from)."""
    p = policy(prefill=8000.0)
    assert p.step_seconds(256) == pytest.approx(256 / 8000.0)
    for _ in range(4):
        p.observe_prefill(1024, step_seconds(1024, rng, noise=0.0))
    assert p.step_seconds(256) == pytest.approx(256 / (1024 / (FIXED_S + 1024 / MARGINAL)))
    for n in (int(t) for t in rng.integers(128, 4097, size=40)):
        p.observe_prefill(n, step_seconds(n, rng))
    for n in (0, 256, 2048):
        assert p.step_seconds(n) == pytest.approx(FIXED_S + n / MARGINAL, rel=0.05)
    with pytest.raises(ValueError, match="tokens must be"):
        p.step_seconds(-1)


def _reference_fit(steps: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Theil-Sen in plain numpy over the last WINDOW ``(tokens, seconds)`` steps: the upper median of the slopes
    between pairs whose sizes differ by a fifth of the larger, at least MIN_PAIRS of them and positive; and the
    median of what it leaves of each step (at least 0)."""
    x, y = (np.array(v, dtype=np.float64) for v in zip(*steps[-WINDOW:]))
    i, j = np.triu_indices(len(x), 1)
    dx = x[j] - x[i]
    keep = (dx != 0) & (np.abs(dx) >= 0.2 * np.maximum(x[i], x[j]))
    slopes = np.sort((y[j] - y[i])[keep] / dx[keep])
    if len(slopes) < MIN_PAIRS or not slopes[len(slopes) // 2] > 0:
        return None
    slope = slopes[len(slopes) // 2]
    return slope, max(float(np.median(y - slope * x)), 0.0)


def test_the_incremental_fit_matches_a_plain_numpy_theil_sen(rng):
    """After every step of random runs (step sizes from one size to a wide spread, noisy and outlying timings,
    more steps than the window, so the ring's slopes are overwritten), the fit equals the reference's exactly, or
    both have none."""
    for case in range(40):
        fit, steps = StepFit(), []
        low = int(rng.integers(1, 2048))
        high = low + int(rng.integers(0, 4096)) if case % 4 else low + 1
        for _ in range(int(rng.integers(1, 3 * WINDOW))):
            n = int(rng.integers(low, high + 1))
            seconds = float(rng.choice([step_seconds(n, rng), rng.uniform(1e-4, 0.5)], p=[0.8, 0.2]))
            steps.append((n, seconds))
            fit.add(n, seconds)
            expected = _reference_fit(steps)
            if expected is None:
                assert fit.per_token is None and fit.fixed is None
            else:
                assert (fit.per_token, fit.fixed) == expected


def test_the_fit_keeps_the_steps_fixed_part(rng):
    fit = StepFit()
    assert fit.seconds(100) is None and fit.fixed is None
    for n in (int(t) for t in rng.integers(128, 4097, size=WINDOW)):
        fit.add(n, FIXED_S + n / MARGINAL)
    assert fit.fixed == pytest.approx(FIXED_S, rel=1e-6) and fit.seconds(1000) == pytest.approx(
        FIXED_S + 1000 / MARGINAL, rel=1e-6)
    for _ in range(WINDOW):
        fit.add(2000, 0.5)  # one size again: no slope, no fixed part
    assert fit.fixed is None and fit.seconds(1000) is None


def test_the_step_plan_carries_the_forward_over_the_layerwise_transfer():
    """``layer_ratio``: the step's expected forward time over its layer-wise loads' expected transfer time; 0 for a
    step without layer-wise loads or tokens, without a rule, or with DYN_KVBM_DISABLE_COST_LAYER_GROUPS."""
    tiers = [TierSpec("G2", Medium.HOST, 64)]
    hashes = list(range(1, 33))

    def leader_with_blocks(cfg: KvbmConfig, **kw) -> ConnectorLeader:
        leader = ConnectorLeader(tiers, cfg, 16, **kw)
        _settle(leader, leader.index.plan_store(hashes, list(range(32))).moves)
        return leader

    cfg = KvbmConfig(prefill_tokens_per_s=20_000.0, host_load_gb_per_s=40.0, host_load_latency_ms=0.0)
    leader = leader_with_blocks(cfg, block_bytes=BLOCK)
    leader.plan_load("r", hashes, list(range(100, 132)), layerwise=True)
    transfer = 32 * BLOCK / 40e9
    assert leader.take_step(step_tokens=512).layer_ratio == pytest.approx(512 / 20_000.0 / transfer)
    leader.plan_load("r", hashes[:8], list(range(100, 108)))
    assert leader.take_step(step_tokens=512).layer_ratio == 0.0  # no layer-wise load
    leader.plan_load("r", hashes[:8], list(range(100, 108)), layerwise=True)
    assert leader.take_step().layer_ratio == 0.0  # no tokens named
    for off in (leader_with_blocks(cfg), leader_with_blocks(KvbmConfig(disable_cost_layer_groups=True),
                                                            block_bytes=BLOCK)):
        off.plan_load("r", hashes, list(range(100, 132)), layerwise=True)
        assert off.take_step(step_tokens=512).layer_ratio == 0.0


# -- end to end: BlockManager on CPU with a slow disk ----------------------------------------------------------

def test_manager_stops_reporting_g3_hits_once_the_disk_is_slow(tmp_path):
    rng = np.random.default_rng(7)
    gpu = make_gpu(32, rng)
    # 4-token blocks at 100 tokens/s: 40 ms of recompute per block; the slow disk takes 0.6 s per 4-block read
    cfg = config(tmp_path, host=8, disk=32, max_transfer_batch_size=4, disable_disk_offload_filter=True,
                 disable_cost_aware_hits=False,
                 prefill_tokens_per_s=100.0, cost_probe_secs=0)
    with BlockManager(gpu, cfg) as mgr:
        hashes = mgr.sequence_hashes(rng.integers(0, 50_000, 8 * GEOM.block_size).tolist())
        num_tokens = 8 * GEOM.block_size + 1
        mgr.offload(hashes[:4], range(4), priority=50)
        mgr.offload(hashes[4:], range(4, 8))
        mgr.wait()
        other = mgr.sequence_hashes(rng.integers(0, 50_000, 4 * GEOM.block_size).tolist())
        mgr.offload(other, range(8, 12), priority=50)  # evicts hashes[4:] (priority 0) from G2; G3 keeps them
        mgr.wait()
        assert mgr.lookup(hashes, num_tokens=num_tokens) == Match(8, 4, 4)
        t = mgr.onboard(hashes, range(16, 24))
        mgr.wait(t)
        assert t.results == [BlockResult.OK] * 8
        assert mgr.lookup(hashes, num_tokens=num_tokens) == Match(8, 4, 4)  # a fast disk is worth reading

        disk = mgr.store.cache("G3").file
        real_read = disk.read_slots

        def slow_read(*args, **kwargs):
            time.sleep(0.6)
            return real_read(*args, **kwargs)

        disk.read_slots = slow_read
        t = mgr.onboard(hashes, range(16, 24))
        mgr.wait(t)
        assert t.results == [BlockResult.OK] * 8
        assert mgr.cost.bandwidth("G3") < GEOM.block_bytes / 0.040  # slower than recompute per block
        assert mgr.lookup(hashes, num_tokens=num_tokens) == Match(4, 4, 0)  # G2 still reported, G3 not
        assert mgr.metrics.value("kvbm_cost_dropped_blocks", tier="G3") == 4
        assert mgr.metrics.value("kvbm_disk_cache_hit_rate") < mgr.metrics.value("kvbm_host_cache_hit_rate")
        assert mgr.cost.bandwidth("G2") > GEOM.block_bytes / 0.040


def test_manager_off_switch_reports_slow_disk_hits(tmp_path):
    rng = np.random.default_rng(8)
    gpu = make_gpu(16, rng)
    cfg = config(tmp_path, disk=16, max_transfer_batch_size=4, disk_load_gb_per_s=1e-9,
                 disable_cost_aware_hits=True)
    with BlockManager(gpu, cfg) as mgr:  # disk-only, at 1 byte/s
        hashes = mgr.sequence_hashes(rng.integers(0, 50_000, 4 * GEOM.block_size).tolist())
        mgr.offload(hashes, range(4))
        mgr.wait()
        assert mgr.lookup(hashes, num_tokens=99) == Match(4, 0, 4)
    cfg = config(tmp_path, disk=16, max_transfer_batch_size=4, disk_load_gb_per_s=1e-9, disable_cost_aware_hits=False)
    with BlockManager(gpu, cfg) as mgr:
        mgr.offload(hashes, range(4))
        mgr.wait()
        assert mgr.lookup(hashes, num_tokens=99) == Match(0, 0, 0)
