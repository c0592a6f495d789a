"""TensorRT-LLM connector over several ranks (tensor and pipeline parallel), each rank's worker in its own process,
driven in TensorRT-LLM's call order (`trtllm_ranks`): every rank's bytes checked exactly, a load failing on one
rank failing on all, a missing rank named once the registration timeout has passed."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

import trtllm_ranks as ranks
import trtllm_standin as standin
from manager_testkit import config

SPLITS = [pytest.param(ranks.TENSOR_PARALLEL, id="tp2"), pytest.param(ranks.PIPELINE_PARALLEL, id="pp2")]


@dataclass
class Request:
    """The parts of LlmRequest the connector reads."""

    request_id: int
    prompt: list[int]
    generated: list[int] = field(default_factory=list)

    def get_tokens(self, beam: int) -> list[int]:
        return self.prompt + self.generated


def prompt(rng: np.random.Generator, n: int) -> list[int]:
    return [int(t) for t in rng.integers(0, 50_000, n)]


@pytest.fixture
def make_executor():
    made = []

    def make(split, cfg, **kw) -> ranks.RankedExecutor:
        ex = ranks.RankedExecutor(split, cfg, **kw)
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.close()


def step_until(ex: ranks.RankedExecutor, condition, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        _, _, errors = ex.step()
        assert not errors, errors
        if condition():
            return
        time.sleep(0.002)
    raise AssertionError(f"condition not reached in {max_steps} steps")


def serve(ex: ranks.RankedExecutor, req: Request) -> None:
    """Compute a request's prompt on every rank, finish it and wait until every rank stored its blocks."""
    assert ex.add(req) == (0, False)
    ex.step()
    ex.finish(req)
    step_until(ex, lambda: req.request_id not in ex.blocks)


def joined(ex: ranks.RankedExecutor) -> None:
    """Step until every rank registered and holds its tiers."""
    step_until(ex, lambda: ex.leader._leader is not None and ex.local.worker.worker is not None)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("use_callable", [True, False], ids=["forward_callable", "last_layer_save"])
def test_ranks_offload_then_onboard_byte_exact(make_executor, split, use_callable):
    """Request A's blocks are stored by every rank; B sharing its prefix has them loaded into other blocks on every
    rank, each rank's bytes (its own heads or layers) identical to what it computed."""
    ex = make_executor(split, config(host=64), use_callable=use_callable)
    assert ex.leader.get_num_new_matched_tokens(Request(9, list(range(1, 10))), 0) == (0, False)  # not joined yet
    joined(ex)
    assert ex.leader.leader.num_workers == 2 and not ex.leader.workers.missing
    rng = np.random.default_rng(1)
    shared = prompt(rng, 14)
    a = Request(1, shared + prompt(rng, 3))
    serve(ex, a)
    ex.settle()
    b = Request(2, shared + prompt(rng, 5))
    assert ex.add(b) == (12, True)
    for rank in range(2):
        assert ex.rank_block(rank, ex.blocks[2][0]) == bytes([ranks.POISON]) * len(ex.rank_block(rank, 0))
    step_until(ex, lambda: 2 in ex.running)
    for rank in range(2):
        for i in range(3):
            assert ex.rank_block(rank, ex.blocks[2][i]) == ranks.expected_block(split, rank, shared, i), (rank, i)
    ex.step()  # B computes the rest of its prompt on every rank
    for rank in range(2):
        assert ex.rank_block(rank, ex.blocks[2][3]) == ranks.expected_block(split, rank, b.prompt, 3)


@pytest.mark.parametrize("split", SPLITS)
def test_tiers_sized_over_the_ranks(make_executor, split):
    """DYN_KVBM_CPU_CACHE_GB counts a block's bytes summed over the ranks; each rank holds that many blocks."""
    total = sum(split.geometry(r).block_bytes for r in range(split.world_size))
    ex = make_executor(split, config(cpu_cache_gb=total * 10.5 / 1e9))
    joined(ex)
    assert ex.leader.leader.index.pool("G2").num_blocks == 10
    assert ex.local.g2_blocks() == ex.remotes[0].call("g2_blocks") == 10


def test_load_failing_on_one_rank_fails_on_every_rank(make_executor):
    """Rank 1's copies into its pool fail: both ranks raise KvbmLoadError in the same get_finished, naming the
    request, the block and rank 1; the stored blocks stay valid and a later request loads them byte-exact."""
    split = ranks.TENSOR_PARALLEL
    ex = make_executor(split, config(host=64))
    joined(ex)
    rng = np.random.default_rng(2)
    a = Request(1, prompt(rng, 9))
    serve(ex, a)
    ex.settle()
    ex.remotes[0].call("fail_loads", True)
    assert ex.add(Request(2, a.prompt[:8] + prompt(rng, 2))) == (8, True)
    for _ in range(500):
        saving, loading, errors = ex.step()
        assert 2 not in loading
        if errors:
            break
        time.sleep(0.002)
    assert sorted(errors) == [0, 1], errors
    for why in errors.values():
        assert why.startswith("KvbmLoadError: ") and "request 2: engine block" in why, why
        assert "on rank 1: transfer failed" in why and "injected on rank 1" in why and "on rank 0" not in why
    assert errors[0] == errors[1]
    ex.remotes[0].call("fail_loads", False)
    ex.settle()
    ex.leader.leader.index.check_invariants()
    c = Request(3, a.prompt[:8] + prompt(rng, 3))
    assert ex.add(c) == (8, True)
    step_until(ex, lambda: 3 in ex.running)
    for rank in range(2):
        for i in range(2):
            assert ex.rank_block(rank, ex.blocks[3][i]) == ranks.expected_block(split, rank, a.prompt, i)


def test_missing_rank_is_named_after_the_timeout():
    """Rank 1 never joins: the leader matches and stores nothing; once DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS has
    passed since the first metadata handed out the channel, the next scheduler call names rank 1."""
    from kvbm.connectors.registration import WorkersMissingError

    trt = ranks._import_connector()
    try:
        cfg = config(host=8, leader_worker_init_timeout_secs=1)
        standin.set_rank(0)
        leader = trt.DynamoKVBMConnectorLeader(ranks.llm_args(2), config=cfg)
        rank0 = ranks.RankWorker(trt, ranks.TENSOR_PARALLEL, 0, cfg, True)
        try:
            assert leader.workers is None  # the wait starts with the first metadata
            deadline = None
            for _ in range(3):
                meta = leader.build_connector_meta(standin.SchedulerOutput())
                deadline = leader.workers.deadline
                assert meta.plan.is_empty() and meta.channel is not None and meta.tiers == ()
                assert rank0.step(meta, [], [], []) == ([], [])
            assert leader.workers.missing == [1]
            assert leader.get_num_new_matched_tokens(Request(1, list(range(1, 10))), 0) == (0, False)
            time.sleep(max(deadline - time.monotonic(), 0) + 0.05)
            with pytest.raises(WorkersMissingError, match=r"worker rank\(s\) 1 of 2 did not register .*"
                                                          r"\(registered: 0\)"):
                leader.get_num_new_matched_tokens(Request(2, list(range(1, 10))), 0)
        finally:
            rank0.close()
    finally:
        standin.uninstall()


def test_rank_channel_takes_ranks_messages_and_drops_bad_ones():
    """Registrations and reports of ranks 1..N-1 arrive in order; a connection sending another rank's number or an
    unknown message is dropped (its later messages are not taken); an address nobody listens on is an error."""
    from kvbm.connectors.messages import WorkerReport
    from kvbm.leader.plans import MoveResult
    from kvbm.trtllm_integration.rank_channel import RankInbox, RankSender

    def until(condition) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.005)

    inbox = RankInbox(3)
    try:
        good, bad = RankSender(inbox.address, 2), RankSender(inbox.address, 3)
        bad.register(4, 1)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # (the inbox may have closed it already)
            bad._send("register", (4, 1))
        good.register(4, 4096)
        reports = [WorkerReport({7: MoveResult(7, {0: "x"})}), WorkerReport({8: MoveResult(8)})]
        for report in reports:
            good.report(report)
        got = []
        until(lambda: got.extend(inbox.drain()) or len(got) == 2)
        assert got == [(2, reports[0]), (2, reports[1])]
        assert inbox.geometries() == {2: (4, 4096)}
        with pytest.raises(RuntimeError, match="rank 1 cannot reach the leader's channel .* rank 0's host"):
            RankSender(b"\0kvbm-no-such-channel", 1)
        good.close()
        bad.close()
    finally:
        inbox.close()
