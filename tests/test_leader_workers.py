"""The scheduler side's view of its workers: registration waited for up to DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS,
and the prefill rate measured from the steps the workers time (which steps, one time per step over the ranks)."""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

from kvbm.config import KvbmConfig
from kvbm.connectors.forward_timer import ForwardTimer
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import RequestLoad, StepTiming, WorkerReport
from kvbm.connectors.prefill import KEEP_STEPS, PREFILL_SHARE, StepTimes, timed_tokens
from kvbm.connectors.registration import WorkerRegistry, WorkersMissingError
from kvbm.connectors.worker import ConnectorWorker
from kvbm.metrics import KvbmMetrics
from kvbm.tiers import kvbm_tiers
from manager_testkit import make_gpu


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- registration ----------------------------------------------------------------------------------------------

def test_registry_waits_until_the_timeout_then_names_the_missing_ranks(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    workers = WorkerRegistry(4, 30, clock=clock)
    assert workers.deadline == 130.0 and workers.missing == [0, 1, 2, 3]
    workers.register([0, 2])
    with caplog.at_level(logging.WARNING, logger="kvbm.connectors.registration"):
        assert not workers.ready()
        clock.now = 129.999
        assert not workers.ready()
    assert caplog.text.count("waiting for worker rank(s) 1, 3 of 4") == 1  # warned once
    clock.now = 130.0
    with pytest.raises(WorkersMissingError, match=r"worker rank\(s\) 1, 3 of 4 did not register with the scheduler "
                                                  r"side within DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS=30 s "
                                                  r"\(registered: 0, 2\)"):
        workers.ready()
    workers.register([5, 7])  # global ranks (data parallel): 5 % 4, 7 % 4
    assert workers.ready() and workers.missing == []
    clock.now = 1e6
    assert workers.ready()


def test_registry_ready_before_the_timeout_stays_ready() -> None:
    clock = Clock()
    workers = WorkerRegistry(1, 2, clock=clock)
    workers.register([0])
    clock.now += 10
    assert workers.ready()
    for bad in (dict(num_workers=0, timeout_s=1), dict(num_workers=1, timeout_s=0), dict(num_workers=True,
                                                                                          timeout_s=1)):
        with pytest.raises(ValueError):
            WorkerRegistry(**bad)
    with pytest.raises(ValueError, match="non-negative int"):
        workers.register([-1])


def test_leader_plans_nothing_until_every_rank_registered() -> None:
    """With a registry, no hit and no store before both ranks registered (their first reports); the store left out
    is planned at the next call; a registry past its timeout raises from take_step."""
    config = KvbmConfig(cpu_cache_override_num_blocks=8)
    leader = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4, num_workers=2, worker_init_timeout_s=60)
    clock = Clock()
    leader.workers = WorkerRegistry(2, 60, clock=clock)
    stored = leader.track("stored", salt=0)
    stored.block_ids = [10, 11]
    leader.plan_stores(stored, list(range(8)), 2)
    assert leader.take_step().stores == [] and stored.saved == 0
    leader.apply(WorkerReport(registered=frozenset({1})))
    leader.plan_stores(stored, list(range(8)), 2)
    assert leader.take_step().stores == []
    leader.apply(WorkerReport(registered=frozenset({0})))
    leader.plan_stores(stored, list(range(8)), 2)
    (store,) = leader.take_step().stores
    assert store.moves[0].src_ids == (10, 11)
    late = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4, num_workers=2, worker_init_timeout_s=60)
    late.workers = WorkerRegistry(2, 60, clock=clock)
    assert late.match(late.track("r", salt=0), list(range(9)), 0) == 0
    clock.now += 60
    with pytest.raises(WorkersMissingError, match=r"rank\(s\) 0, 1 of 2"):
        late.take_step()
    assert ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4).ready()  # no registry: workers are up


def test_leader_publishes_the_ranks_registered_and_counts_failed_blocks_per_rank() -> None:
    """kvbm_workers_expected / _registered follow the registrations; the blocks each rank's report says failed there
    are counted under that rank, summed over merged reports (vLLM merges the ranks' reports of a step)."""
    config = KvbmConfig(cpu_cache_override_num_blocks=8)
    metrics = KvbmMetrics(sides="scheduler")
    leader = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4, num_workers=3, metrics=metrics,
                             worker_init_timeout_s=60)

    def registered() -> tuple[float, float]:
        return metrics.value("kvbm_workers_expected"), metrics.value("kvbm_workers_registered")

    assert registered() == (3, 0)
    leader.apply(WorkerReport(registered=frozenset({2})).merged(WorkerReport(registered=frozenset({0}))))
    assert registered() == (3, 2)
    leader.apply(WorkerReport(registered=frozenset({1})))
    assert registered() == (3, 3)
    rng = np.random.default_rng(4)
    expected = [0, 0, 0]
    for _ in range(20):
        reports = [WorkerReport(failed_blocks={r: int(n)} if n else {}) for r, n in enumerate(rng.integers(0, 4, 3))]
        for r, report in enumerate(reports):
            expected[r] += report.failed_blocks.get(r, 0)
        leader.apply(reports[0].merged(reports[1]).merged(reports[2]))
    assert sum(expected) > 0
    assert [metrics.value("kvbm_worker_failed_blocks", rank=r) for r in range(3)] == expected
    up = KvbmMetrics(sides="scheduler")
    ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4, num_workers=2, metrics=up)  # no registry
    assert (up.value("kvbm_workers_expected"), up.value("kvbm_workers_registered")) == (2, 2)


# -- which steps are timed ---------------------------------------------------------------------------------------

def test_only_prefill_dominated_steps_without_layerwise_loads_are_timed() -> None:
    assert PREFILL_SHARE == 0.75
    assert timed_tokens(96, 128) == 128  # 3/4 prompt: all the step's tokens
    assert timed_tokens(95, 128) == 0
    assert timed_tokens(0, 64) == 0 and timed_tokens(0, 0) == 0  # decode only / no forward
    assert timed_tokens(200, 200) == 200
    assert timed_tokens(200, 200, [RequestLoad("r", (), layerwise=False)]) == 200
    assert timed_tokens(200, 200, [RequestLoad("r", (), layerwise=True)]) == 0  # its forward waits for loads
    with pytest.raises(ValueError, match="prompt_tokens <= step_tokens"):
        timed_tokens(5, 4)


def test_take_step_numbers_plans_and_marks_timed_steps_only_with_a_cost_rule() -> None:
    config = KvbmConfig(cpu_cache_override_num_blocks=8)
    leader = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4, block_bytes=4096)
    plans = [leader.take_step(prompt_tokens=p, step_tokens=n) for p, n in ((100, 110), (10, 110), (0, 0))]
    assert [(p.step, p.timed_tokens) for p in plans] == [(1, 110), (2, 0), (3, 0)]
    no_rule = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4)
    assert no_rule.cost is None and no_rule.take_step(prompt_tokens=100, step_tokens=100).timed_tokens == 0


# -- one time per step over the ranks ----------------------------------------------------------------------------

def test_step_time_is_the_slowest_rank_of_each_stage_summed() -> None:
    times = StepTimes(4)  # tp 2 x pp 2: ranks 0, 1 in stage 0, ranks 2, 3 in stage 1
    parts = [StepTiming(7, 300, s, rank, rank // 2) for rank, s in enumerate((0.010, 0.013, 0.006, 0.004))]
    assert [times.add(t) for t in parts[:3]] == [None, None, None]
    assert times.add(parts[3]) == (300, pytest.approx(0.013 + 0.006))
    assert StepTimes(1).add(StepTiming(1, 64, 0.5, 0)) == (64, 0.5)


def test_a_step_some_rank_never_times_is_forgotten(caplog: pytest.LogCaptureFixture) -> None:
    times = StepTimes(2)
    assert times.add(StepTiming(1, 50, 0.1, 0)) is None  # rank 1's timing of step 1 never comes
    for step in range(2, 2 + KEEP_STEPS):
        times.add(StepTiming(step, 50, 0.1, 0))
        times.add(StepTiming(step, 50, 0.2, 1))
    assert times.add(StepTiming(1, 50, 0.1, 1)) is None  # forgotten: counted as a new, incomplete step
    with caplog.at_level(logging.WARNING, logger="kvbm.connectors.prefill"):
        times.add(StepTiming(900, 50, 0.1, 0))
        assert times.add(StepTiming(900, 51, 0.1, 1)) is None
    assert "rank 1 timed 51 tokens, rank 0 50" in caplog.text


def test_leader_feeds_the_cost_rule_once_every_rank_timed_a_step() -> None:
    config = KvbmConfig(cpu_cache_override_num_blocks=8, prefill_tokens_per_s=50.0)
    leader = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4, num_workers=2, block_bytes=4096)
    assert leader.cost.prefill_rate == 50
    leader.apply(WorkerReport(timings=(StepTiming(3, 1000, 0.05, 0),)))
    assert leader.cost.prefill_rate == 50
    leader.apply(WorkerReport(timings=(StepTiming(3, 1000, 0.1, 1),)))
    assert leader.cost.prefill_rate == pytest.approx(1000 / 0.1)
    merged = WorkerReport(timings=(StepTiming(4, 8, 1.0, 0),), registered=frozenset({0})).merged(
        WorkerReport(timings=(StepTiming(4, 8, 2.0, 1),), registered=frozenset({1})))
    assert merged.registered == {0, 1} and [t.rank for t in merged.timings] == [0, 1]


# -- the worker's timer and reports ------------------------------------------------------------------------------

def test_cpu_timer_measures_wall_time_of_started_and_stopped_steps() -> None:
    timer = ForwardTimer(torch.device("cpu"), rank=3, stage=1)
    timer.stop()  # nothing running: nothing happens
    timer.start(5, 128)
    time.sleep(0.02)
    timer.stop()
    timer.stop()
    timer.start(6, 64)  # never stopped: dropped when the next starts
    timer.start(7, 32)
    timer.stop()
    five, seven = timer.take()
    assert (five.step, five.tokens, five.rank, five.stage) == (5, 128, 3, 1) and 0.02 <= five.seconds < 1
    assert seven.step == 7 and timer.take() == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a GPU")
def test_cuda_timer_reads_device_time_without_waiting() -> None:
    timer = ForwardTimer(torch.device("cuda"), rank=0)
    a = torch.randn(4096, 4096, device="cuda")
    timer.start(1, 100)
    for _ in range(20):
        a = a @ a / 64
    timer.stop()
    pending = timer.take()  # taken while the matmuls may still run: nothing or the completed step
    torch.cuda.synchronize()
    done = pending or timer.take()
    assert len(done) == 1 and done[0].step == 1 and done[0].seconds > 0


def test_worker_names_its_rank_in_its_first_report_and_reports_timings() -> None:
    config = KvbmConfig(cpu_cache_override_num_blocks=4)
    gpu = make_gpu(8, np.random.default_rng(1))
    worker = ConnectorWorker(gpu, kvbm_tiers(config, gpu.geometry.block_bytes), config, rank=2, stage=1)
    try:
        first = worker.take_report()
        assert first is not None and first.registered == {2} and not first.results and not first.timings
        assert worker.take_report() is None
        worker.timer.start(9, 40)
        worker.timer.stop()
        if gpu.device.type == "cuda":
            torch.cuda.synchronize()  # (the timing is reported once its end event completed)
        (timing,) = worker.take_report().timings
        assert (timing.step, timing.tokens, timing.rank, timing.stage) == (9, 40, 2, 1)
        assert worker.take_report() is None
    finally:
        worker.close()
