"""DynamoConnector against vLLM 0.33's real scheduler, with the worker side driven in the V1 and V2 runner orders.

Every test runs the harness of ``vllm_harness``: the KV the emulated attention reads is checked byte-exactly
against the deterministic model wherever a request is (re)admitted, i.e. exactly where onboarded KV is consumed,
and freshly allocated blocks are poisoned first, so a load that writes wrong bytes, or none, fails the test unless
the connector reported the block through ``get_block_ids_with_load_errors``.

Needs vLLM 0.33 light (``bash tests/install_vllm_light.sh``); imported plainly so a missing install fails loudly.
On CPU the host copies complete synchronously; tests that need a transfer in flight gate it (``Gate``).
"""
from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import vllm_harness as H  # first: imports vLLM for the CPU platform, clear of the repo's kernels/ folder

from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec
from vllm.v1.request import RequestStatus

from kvbm.config import KvbmConfig
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import RequestLoad, StepPlan
from kvbm.kernels.block_transfer import BlockTransfer
from kvbm.layouts.vllm_tensors import describe_vllm_kv_caches
from kvbm.leader import Move, MoveKind
from kvbm.policies.cost import LoadCostPolicy
from kvbm.tiers import kvbm_tiers
from kvbm.vllm_integration.connector import DynamoConnector, kvbm_config_from
from kvbm.vllm_integration.metadata import DynamoConnectorMetadata
from kvbm.vllm_integration.scheduler import SchedulerSide

CONNECTOR = "kvbm.vllm_integration.connector:DynamoConnector"
LAYERS = H.TinyModelSpec().num_layers


def kvbm_harness(tmp_path: Path | None = None, *, host: int | None = 512, disk: int | None = None,
                 extra: dict[str, Any] | None = None, **overrides: Any) -> H.VllmHarness:
    """Harness with DynamoConnector: ``host`` G2 blocks, ``disk`` G3 blocks in ``tmp_path``. The cost rule is off:
    the tiny model's recompute is nearly free and the CPU copies are slow, so it would (rightly) drop most hits."""
    config: dict[str, Any] = {"DYN_KVBM_DISABLE_COST_AWARE_HITS": "true"}
    if host is not None:
        config["DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"] = host
    if disk is not None:
        config.update(DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=disk, DYN_KVBM_DISK_CACHE_DIR=str(tmp_path),
                      DYN_KVBM_DISK_DISABLE_O_DIRECT="true")
    config.update(extra or {})
    overrides.setdefault("num_gpu_blocks", 40)
    return H.VllmHarness(H.HarnessConfig(connector=CONNECTOR, connector_extra_config=config, **overrides))


def chat(num_users: int = 8, num_rounds: int = 4, **kw: Any) -> H.MultiTurnChatWorkload:
    """Users whose histories (~16 blocks each at 4 rounds) do not fit together in 39 GPU blocks."""
    return H.MultiTurnChatWorkload(num_users=num_users, num_rounds=num_rounds, system_prompt_tokens=64, seed=3, **kw)


def run_counting(h: H.VllmHarness, workload: H.MultiTurnChatWorkload) -> Counter:
    """Run ``workload``; count the connector's load/save jobs, preemptions, verified tokens and load errors."""
    counts: Counter = Counter()
    execute = h.worker.execute
    connector = h.worker.connector
    load_errors = connector.get_block_ids_with_load_errors

    def counting_errors() -> set[int]:
        errors = load_errors()
        counts["load_errors"] += len(errors)
        return errors

    def counting_execute(so, new_blocks):
        meta = so.kv_connector_metadata
        assert isinstance(meta, DynamoConnectorMetadata)
        counts["load_jobs"] += len(meta.plan.loads)
        counts["layerwise_jobs"] += sum(load.layerwise for load in meta.plan.loads)
        counts["loaded_blocks"] += sum(m.num_blocks for job in meta.plan.loads for m in job.moves)
        counts["save_jobs"] += len(meta.plan.stores)
        counts["preempted"] += len(so.preempted_req_ids or ())
        out = execute(so, new_blocks)
        counts["verified"] += h.worker.last_report.verified_tokens
        return out

    connector.get_block_ids_with_load_errors = counting_errors
    h.worker.execute = counting_execute
    counts["steps"] = h.run_workload(workload)
    return counts


def worker_of(h: H.VllmHarness):
    """The worker side's engine-independent worker (tiers and store)."""
    return h.worker.connector.worker


def assert_clean(h: H.VllmHarness) -> None:
    """Nothing leaked: vLLM's pool is full again, no request tracked on either side, nothing running, and the
    index's holds match its open moves."""
    assert h.free_block_count() == h.config.num_gpu_blocks - 1 and not h.scheduler.requests
    assert not h.scheduler.connector.scheduler_side.leader.requests
    worker = worker_of(h)
    worker.store.wait_all()  # background cascades (G2 -> G3) may still be writing
    worker.poll()
    assert not (worker._moves or worker._loading or worker._storing or worker._held) and not worker.store.busy
    h.scheduler.connector.scheduler_side.leader.index.check_invariants()


def metric(h: H.VllmHarness, name: str, direction: str | None = None) -> float:
    return worker_of(h).store.metrics.value(name, direction)


# --------------------------------------------------------------------------------------------------
# Multi-turn chat: later turns onboard from G2 (and G3) after vLLM evicted their GPU blocks
# --------------------------------------------------------------------------------------------------

FORMATS = [
    pytest.param({}, "vllm_lbnhc", id="views-LBNHC"),
    pytest.param({"kv_layout": "LBHNC"}, "vllm_lbhnc", id="views-LBHNC"),
    pytest.param({"kv_format": "flash5d"}, "vllm_flash_attn_nhd", id="flash5d"),
    pytest.param({"kv_format": "flashinfer5d"}, "vllm_flashinfer_nhd", id="flashinfer5d"),
]


@pytest.mark.parametrize("runner", ["v1", "v2"])
@pytest.mark.parametrize(("fmt", "layout_name"), FORMATS)
def test_multi_turn_onboards_from_host(runner: str, fmt: dict, layout_name: str) -> None:
    workload = chat(num_users=6, num_rounds=3)
    with kvbm_harness(runner=runner, num_gpu_blocks=32, **fmt) as h:
        assert worker_of(h).engine_cache.name == layout_name
        counts = run_counting(h, workload)
        assert workload.done and all(len(h.outputs[t.request_id]) == t.max_tokens for t in workload.completed)
        # Later turns found their history in G2 only (vLLM had evicted it) and read it back byte-exact, layer by
        # layer beside the forward that read it.
        assert counts["load_jobs"] == counts["layerwise_jobs"] > 0 and h.cache_stats.external_hits > 0
        assert metric(h, "kvbm_onboard_blocks_h2d") == counts["loaded_blocks"] > 0
        assert metric(h, "kvbm_offload_blocks_d2h") > 0
        assert counts["verified"] > 0 and counts["load_errors"] == 0
        assert_clean(h)


@pytest.mark.parametrize("admission_filter", [False, True], ids=["every-block", "admission-filter"])
def test_hits_come_from_disk_after_host_eviction(tmp_path: Path, admission_filter: bool) -> None:
    """A G2 too small for the chats pushes blocks to G3 (every block, or those hit once in G2 under KVBM's
    admission filter); later turns load from both tiers, byte-exact."""
    if admission_filter:
        workload, host, extra = chat(num_rounds=5), 48, {}
    else:
        workload, host, extra = chat(), 24, {"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}
    with kvbm_harness(tmp_path, host=host, disk=512, extra=extra) as h:
        sources: Counter = Counter()
        split = h.scheduler.connector.get_external_cache_hit_sources

        def recording_split(request, num_external_tokens):
            result = split(request, num_external_tokens)
            assert sum(result.values()) == num_external_tokens
            sources.update({source.value: n for source, n in result.items()})
            return result

        h.scheduler.connector.get_external_cache_hit_sources = recording_split
        counts = run_counting(h, workload)
        assert sources["host"] > 0 and sources["disk"] > 0  # vLLM's hit stats learn the tier
        assert workload.done and counts["load_errors"] == 0 and counts["verified"] > 0
        assert metric(h, "kvbm_offload_blocks_h2d") > 0  # G2 -> G3
        assert metric(h, "kvbm_onboard_blocks_d2d") > 0  # G3 -> G1
        assert metric(h, "kvbm_onboard_blocks_h2d") > 0  # G2 -> G1
        assert h.cache_stats.external_hits > 0
        assert_clean(h)


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_without_vllm_prefix_caching(runner: str) -> None:
    """vLLM's own prefix cache off: every later turn reads its whole history (minus the last block) from G2."""
    workload = chat(num_users=4, num_rounds=3)
    with kvbm_harness(runner=runner, enable_prefix_caching=False) as h:
        counts = run_counting(h, workload)
        assert h.cache_stats.gpu_queries == 0 and h.cache_stats.external_hits > 0
        assert counts["loaded_blocks"] * 16 == h.cache_stats.external_hits
        assert counts["verified"] == LAYERS * h.cache_stats.external_hits  # exactly the onboarded tokens
        assert workload.done and counts["load_errors"] == 0
        assert_clean(h)


def test_offload_only_adds_no_loads_when_everything_fits() -> None:
    """Control: with GPU room for every history, vLLM's own prefix cache serves the later turns."""
    workload = chat(num_users=2, num_rounds=3)
    with kvbm_harness(num_gpu_blocks=128) as h:
        counts = run_counting(h, workload)
        assert counts["load_jobs"] == 0 and counts["save_jobs"] > 0 and h.cache_stats.gpu_hits > 0
        assert metric(h, "kvbm_offload_blocks_d2h") > 0
        assert_clean(h)


# --------------------------------------------------------------------------------------------------
# Failures, preemption, aborts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_failed_disk_loads_are_recomputed(tmp_path: Path, runner: str) -> None:
    """Disk-only mode; the disk file is truncated after the first rounds: reads fail, the failed blocks are
    reported, vLLM recomputes them (the verifier accepts only reported blocks), and nothing leaks."""
    workload = chat()
    with kvbm_harness(tmp_path, host=None, disk=512, runner=runner,
                      extra={"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}) as h:
        store = worker_of(h).store
        assert sorted(store.caches) == ["G1", "G3"]
        disk_file = store.cache("G3").file
        truncated = False
        complete = workload.complete

        def truncating_complete(request_id, output_token_ids):
            nonlocal truncated
            if not truncated and len(workload.completed) >= 8:
                os.truncate(disk_file.path, 0)
                truncated = True
            return complete(request_id, output_token_ids)

        workload.complete = truncating_complete
        counts = run_counting(h, workload)
        assert truncated and workload.done
        assert counts["load_errors"] > 0
        assert metric(h, "kvbm_transfer_failed_blocks", "g3_to_g1") > 0
        assert all(len(h.outputs[t.request_id]) == t.max_tokens for t in workload.completed)
        assert_clean(h)


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_preemption(runner: str) -> None:
    """Long concurrent chats in 24 GPU blocks: vLLM preempts; resumed requests reload their prefix byte-exact."""
    workload = chat(num_users=6, num_rounds=3, user_tokens=(40, 80), answer_tokens=(20, 40))
    with kvbm_harness(runner=runner, num_gpu_blocks=24, max_model_len=368) as h:
        counts = run_counting(h, workload)
        assert counts["preempted"] > 0 and counts["load_jobs"] > 0 and counts["verified"] > 0
        assert workload.done and counts["load_errors"] == 0
        assert_clean(h)


class Gate:
    """Keeps the worker's transfers into G1 (``"onboard"``) or out of it (``"offload"``) in flight until
    ``release``, which also ends the gating."""

    def __init__(self, worker: Any, direction: str) -> None:
        self.transfers: list[BlockTransfer] = []
        self.released = False
        engine = worker.engine_cache
        transfers = worker.store.transfers
        real = transfers.submit
        self._restore = lambda: setattr(transfers, "submit", real)
        gate = self

        class Waitable:
            def query(self) -> bool:
                return gate.released

            def synchronize(self) -> None:
                assert gate.released, "a gated transfer was waited for"

        def gated(src: Any, dst: Any, *args: Any, **kwargs: Any) -> BlockTransfer:
            inner = real(src, dst, *args, **kwargs)
            if not ((dst is engine) if direction == "onboard" else (src is engine)):
                return inner

            def steps():
                yield Waitable()
                inner.wait()
                return inner.reasons

            gated_transfer = BlockTransfer(inner.num_blocks, inner.path, steps())
            self.transfers.append(gated_transfer)
            return gated_transfer

        transfers.submit = gated

    def release(self) -> None:
        self._restore()
        self.released = True


def _first_turn_then_evict(h: H.VllmHarness, prompt: list[int]) -> None:
    h.add_request("first", prompt, 3)
    h.run_until_idle()
    assert h.scheduler.reset_prefix_cache()  # the next request must come from G2


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_request_aborted_mid_load(runner: str) -> None:
    """Aborted while its asynchronous onboard is in flight: vLLM keeps the blocks until the worker reports the load
    done."""
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=100, seed=5).system_prompt
    with kvbm_harness(runner=runner, extra={"DYN_KVBM_DISABLE_LAYERWISE_ONBOARD": "true"}) as h:
        _first_turn_then_evict(h, prompt)
        gate = Gate(worker_of(h), "onboard")
        h.add_request("second", prompt + [7, 8, 9], 3)
        for _ in range(4):
            h.step()
        request = h.scheduler.requests["second"]
        assert gate.transfers and request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
        held = h.free_block_count()
        h.abort("second")
        for _ in range(3):
            h.step()
        assert "second" in h.scheduler.requests and h.free_block_count() == held  # blocks still being written
        gate.release()
        h.run_until_idle()
        assert "second" not in h.scheduler.requests
        assert_clean(h)


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_finished_request_held_until_its_offload_is_done(runner: str) -> None:
    """A request finishing (or aborted) with offloads in flight keeps its blocks until ``finished_sending``."""
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=100, seed=6).system_prompt
    with kvbm_harness(runner=runner) as h:
        gate = Gate(worker_of(h), "offload")
        h.add_request("a", prompt, 40)
        for _ in range(3):
            h.step()
        h.abort("a")
        for _ in range(4):
            h.step()
        assert gate.transfers and "a" in h.scheduler.requests
        assert h.free_block_count() < h.config.num_gpu_blocks - 1
        gate.release()
        h.run_until_idle()
        assert "a" not in h.scheduler.requests
        assert_clean(h)
        # What was offloaded is served back: a new request with the same prompt loads it byte-exact.
        assert h.scheduler.reset_prefix_cache()
        h.add_request("b", prompt + [5], 2)
        verified = 0
        for _ in range(50):
            if not h.busy():
                break
            h.step()
            verified += h.worker.last_report.verified_tokens
        assert verified == LAYERS * 96 and h.cache_stats.external_hits == 96
        assert_clean(h)


# --------------------------------------------------------------------------------------------------
# Many requests, isolation, refusals
# --------------------------------------------------------------------------------------------------


def test_hundreds_of_requests_leave_nothing_behind() -> None:
    """300 short requests over 12 rotating prefixes (more than 23 GPU blocks hold), some aborted: later ones hit
    G2, and no GPU block, ticket or tracked request leaks."""
    prefixes = [H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=48, seed=100 + k).system_prompt
                for k in range(12)]
    with kvbm_harness(runner="v2", host=256, num_gpu_blocks=24, max_num_seqs=32) as h:
        for i in range(300):
            tail = [H.FIRST_REGULAR_TOKEN + (i * 7 + k) % 4000 for k in range(5 + i % 23)]
            h.add_request(f"r{i}", prefixes[i % 12] + tail, 1 + i % 5)
            if i % 10 == 9:
                h.step()
            if i % 37 == 0:
                h.abort(f"r{i}")
        h.run_until_idle()
        aborted = {f"r{i}" for i in range(0, 300, 37)}
        assert set(h.finish_reasons) == {f"r{i}" for i in range(300)} - aborted  # aborts report no output
        assert h.cache_stats.external_hits > 0
        assert_clean(h)


def test_salt_and_lora_enter_the_hash() -> None:
    """The same prompt under another cache salt or LoRA adapter finds nothing; under the same one it hits."""
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=64, seed=11).system_prompt
    with kvbm_harness() as h:
        h.add_request("plain", prompt, 2, cache_salt="s1", lora_name="a")
        h.run_until_idle()
        hits = {}
        for request_id, salt, lora in [("salt", "s2", "a"), ("lora", "s1", "b"), ("same", "s1", "a")]:
            assert h.scheduler.reset_prefix_cache()
            before = h.cache_stats.external_hits
            h.add_request(request_id, prompt + [9], 2, cache_salt=salt, lora_name=lora)
            h.run_until_idle()
            hits[request_id] = h.cache_stats.external_hits - before
        assert hits == {"salt": 0, "lora": 0, "same": 64}
        assert_clean(h)


# --------------------------------------------------------------------------------------------------
# The cost rule learns the engine's prefill rate from the timed forward of prefill steps
# --------------------------------------------------------------------------------------------------


@dataclass
class WorkerStep:
    """One step on the worker: the tokens its plan marks for timing, the tokens it computes, and the wall time of
    the harness's forward (inside the timed span) and of the whole step (around it)."""

    timed: int
    scheduled: int
    forward_s: float
    step_s: float


class StepClock:
    """Times the harness's forward and whole steps, and records what reaches the cost rule's ``observe_prefill``."""

    def __init__(self, h: H.VllmHarness) -> None:
        self.steps: list[WorkerStep] = []
        self.observed: list[tuple[int, float]] = []
        worker, forward_s = h.worker, [0.0]
        execute, forward = worker.execute, worker._forward

        def timed_forward(work, attn):
            start = time.perf_counter()
            forward(work, attn)
            forward_s[0] += time.perf_counter() - start

        def timed_execute(so, new_blocks):
            forward_s[0] = 0.0
            start = time.perf_counter()
            out = execute(so, new_blocks)
            self.steps.append(WorkerStep(so.kv_connector_metadata.plan.timed_tokens, so.total_num_scheduled_tokens,
                                         forward_s[0], time.perf_counter() - start))
            return out

        worker._forward, worker.execute = timed_forward, timed_execute
        cost = leader_of(h).cost
        observe = cost.observe_prefill

        def recording_observe(tokens: int, seconds: float) -> None:
            self.observed.append((tokens, seconds))
            observe(tokens, seconds)

        cost.observe_prefill = recording_observe

    @property
    def timed(self) -> list[WorkerStep]:
        return [s for s in self.steps if s.timed]


def leader_of(h: H.VllmHarness) -> ConnectorLeader:
    return h.scheduler.connector.scheduler_side.leader


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(H.FIRST_REGULAR_TOKEN, 4000) for _ in range(n)]


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_prefill_rate_is_learned_from_the_timed_forward(runner: str) -> None:
    """From a cold start of 50 tokens/s, the estimate moves to the rate the workers measure: every prefill step's
    forward is timed (from ``bind_connector_metadata`` to the end of the forward in the runner's call order), each
    timing lies between the harness's own forward time and its whole step time, and reaches the rule once."""
    rng = random.Random(11)
    with kvbm_harness(runner=runner, extra={"DYN_KVBM_PREFILL_TOKENS_PER_S": "50"}) as h:
        clock, cost = StepClock(h), leader_of(h).cost
        assert cost.prefill_rate == 50
        for i in range(4):  # 90-200 prompt tokens each, 256 per step: chunked, mixed with a few decodes
            h.add_request(f"p{i}", tokens(rng, rng.randrange(90, 200)), 2)
        h.run_until_idle()
        assert len(clock.timed) >= 2 and len(clock.observed) == len(clock.timed)
        for (n, seconds), step in zip(clock.observed, clock.timed):
            assert n == step.timed == step.scheduled
            assert step.forward_s <= seconds <= step.step_s
        rates = [n / seconds for n, seconds in clock.observed]
        assert min(rates) <= cost.prefill_rate <= max(rates)
        assert cost.prefill_rate > 20 * 50
        assert cost.metrics.value("kvbm_prefill_tokens_per_second") == cost.prefill_rate  # the scheduler side's
        assert_clean(h)


def test_decode_only_and_decode_heavy_steps_leave_the_prefill_rate_alone() -> None:
    """Six requests prefill in one step (timed); then they decode, and a short prompt joins them in a step of 12
    prompt tokens and 6 decode tokens (below the 3/4 prompt share): no timing, the estimate does not move."""
    rng = random.Random(12)
    with kvbm_harness(extra={"DYN_KVBM_PREFILL_TOKENS_PER_S": "50"}) as h:
        clock, cost = StepClock(h), leader_of(h).cost
        for i in range(6):
            h.add_request(f"d{i}", tokens(rng, 8), 12)
        h.step()
        assert [(s.timed, s.scheduled) for s in clock.steps] == [(48, 48)] and len(clock.observed) == 1
        learned = cost.prefill_rate
        assert learned > 50
        for _ in range(3):
            h.step()
        h.add_request("late", tokens(rng, 12), 4)
        h.step()
        assert clock.steps[-1].scheduled == 18
        h.run_until_idle()
        assert len(clock.steps) > 12 and not any(s.timed for s in clock.steps[1:])
        assert len(clock.observed) == 1 and cost.prefill_rate == learned
        assert_clean(h)


def test_learned_prefill_rate_drops_a_slow_disk_hit(tmp_path: Path) -> None:
    """Disk-only; G3 configured at 10 kB/s and the prefill rate's cold start at 5 tokens/s. At those values a
    6-block G3 hit is worth loading (0.4 s a block against 3.2 s of recompute). Once the first request's prefill
    has been timed (the harness computes hundreds of tokens/s or more), the same hit is dropped and the request
    computed: the learned rate flips the decision."""
    extra = {"DYN_KVBM_DISABLE_COST_AWARE_HITS": "false", "DYN_KVBM_DISK_LOAD_GB_PER_S": "0.00001",
             "DYN_KVBM_PREFILL_TOKENS_PER_S": "5", "DYN_KVBM_COST_PROBE_SECS": "0",
             "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}
    prompt = tokens(random.Random(13), 100)  # 6 full blocks
    with kvbm_harness(tmp_path, host=None, disk=64, extra=extra) as h:
        leader = leader_of(h)
        cold = LoadCostPolicy.from_config(h.scheduler.connector.config, ["G3"], block_bytes=leader.cost.block_bytes,
                                          block_tokens=16)
        assert cold.decide((6,)).hits == (6,)  # the cold-start rule would load the hit
        counts: Counter = Counter()
        matched = h.scheduler.connector.get_num_new_matched_tokens

        def recording_match(request, num_computed_tokens):
            n, is_async = matched(request, num_computed_tokens)
            counts[request.request_id] = max(counts[request.request_id], n or 0)
            return n, is_async

        h.scheduler.connector.get_num_new_matched_tokens = recording_match
        h.add_request("first", prompt, 2)
        h.run_until_idle()
        assert metric(h, "kvbm_offload_blocks_d2d") == 6  # G1 -> G3
        assert leader.cost.prefill_rate > 100 * 5
        assert h.scheduler.reset_prefix_cache()
        h.add_request("again", prompt, 2)
        h.run_until_idle()
        assert counts["again"] == 0 and h.cache_stats.external_hits == 0
        assert leader.metrics.value("kvbm_cost_dropped_blocks", tier="G3") == 6
        assert metric(h, "kvbm_onboard_blocks_d2d") == 0
        assert len(h.outputs["again"]) == 2
        assert_clean(h)


def scheduler_side(block_size: int, host_blocks: int = 16) -> SchedulerSide:
    """A scheduler side over a G2 of ``host_blocks`` blocks, without vLLM's scheduler."""
    config = KvbmConfig(cpu_cache_override_num_blocks=host_blocks)
    return SchedulerSide(ConnectorLeader(kvbm_tiers(config, 4096), config, block_size))


def test_multimodal_requests_are_neither_matched_nor_saved(caplog: pytest.LogCaptureFixture) -> None:
    side = scheduler_side(16)
    request = SimpleNamespace(request_id="mm", mm_features=[object()], prompt_embeds=None, lora_request=None,
                              cache_salt=None, num_tokens=64, num_preemptions=0, num_computed_tokens=64,
                              all_token_ids=list(range(3, 67)))
    with caplog.at_level("INFO", logger="kvbm.vllm_integration.scheduler"):
        side.on_new_request(request)
    assert "multimodal" in caplog.text
    assert side.get_num_new_matched_tokens(request, 0) == (0, False)
    assert side.request_finished(request, list(range(4))) == (False, None)


def test_match_starts_after_vllms_own_hit() -> None:
    """Blocks vLLM still holds may have left G2: the lookup starts at the first block vLLM lacks."""
    from kvbm.hashing import salt_hash, sequence_hashes

    bs = 4
    tokens = list(range(3, 3 + 4 * bs + 2))  # 4 full blocks and 2 tokens
    request = SimpleNamespace(request_id="r", mm_features=[], prompt_embeds=None, lora_request=None,
                              cache_salt="s", num_tokens=len(tokens), num_preemptions=0, all_token_ids=tokens)
    hashes = sequence_hashes(tokens, bs, salt_hash("s", None))
    side = scheduler_side(bs)
    index = side.leader.index
    for move in index.plan_store(hashes[2:4], [5, 6]).moves:  # blocks 0 and 1 are on the GPU only
        index.complete(move.move_id, {})
    assert side.get_num_new_matched_tokens(request, 0) == (0, False)
    assert side.get_num_new_matched_tokens(request, 2 * bs) == (2 * bs, True)
    assert side.get_num_new_matched_tokens(request, 4 * bs) == (0, False)  # nothing beyond vLLM's hit


def test_unsupported_setups_are_refused() -> None:
    """Tensor parallelism is accepted (``tests/test_vllm_ranks.py`` runs it); context parallelism and a KV cache
    group of another attention kind are refused (``tests/test_vllm_hybrid.py`` runs hybrid models)."""
    with kvbm_harness() as h:
        plan = h.plan
        vllm_config = h.vllm_config
        vllm_config.parallel_config.tensor_parallel_size = 2
        leader = DynamoConnector(vllm_config, H.KVConnectorRole.SCHEDULER, plan.scheduler_config)
        assert leader.scheduler_side.leader.num_workers == 2
        leader.shutdown()
        vllm_config.parallel_config.tensor_parallel_size = 1
        vllm_config.parallel_config.decode_context_parallel_size = 2
        with pytest.raises(ValueError, match="decode_context_parallel_size=2"):
            DynamoConnector(vllm_config, H.KVConnectorRole.SCHEDULER, plan.scheduler_config)
        vllm_config.parallel_config.decode_context_parallel_size = 1
        group = plan.scheduler_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        chunked = ChunkedLocalAttentionSpec(block_size=spec.block_size, num_kv_heads=spec.num_kv_heads,
                                            head_size=spec.head_size, dtype=spec.dtype, attention_chunk_size=64)
        other = plan.scheduler_config.__class__(**{**plan.scheduler_config.__dict__, "kv_cache_groups": [
            group.__class__(group.layer_names, chunked)]})
        with pytest.raises(ValueError, match="ChunkedLocalAttentionSpec in KV cache group 0"):
            DynamoConnector(vllm_config, H.KVConnectorRole.WORKER, other)
        with pytest.raises(RuntimeError, match="already called"):
            h.worker.connector.register_kv_caches(dict(h.worker.kv_caches))


@pytest.mark.parametrize("executor", ["uni", "mp"])
def test_hnd_layout_on_request_and_metrics_server(monkeypatch: pytest.MonkeyPatch, executor: str) -> None:
    """``kv_layout: HND`` makes vLLM allocate LBHNC; ``DYN_KVBM_METRICS`` serves the counters while running. With
    vLLM's in-process executor (``uni``) the single-rank engine serves both sides on one port under KVBM's names,
    no rank label; with the multiprocessing executor (vLLM's choice on CPU) the worker runs in a process of its own
    and serves its series on the next port, labelled ``rank="0"``."""
    import urllib.request

    from test_process_metrics import free_ports, scrape, served

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if executor == "uni" else "1")
    port = free_ports(2)
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=48, seed=17).system_prompt
    with kvbm_harness(extra={"kv_layout": "HND", "DYN_KVBM_METRICS": "1", "DYN_KVBM_METRICS_PORT": port}) as h:
        assert h.vllm_config.parallel_config.distributed_executor_backend == executor
        assert h.vllm_config.cache_config.kv_cache_layout == "LBHNC"
        assert worker_of(h).engine_cache.name == "vllm_lbhnc"
        h.add_request("a", prompt + [5], 2)
        h.run_until_idle()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "\nkvbm_workers_expected 1.0" in text and "\nkvbm_workers_registered 1.0" in text
        assert "\nkvbm_matched_tokens 0.0" in text
        assert text.count("rank=") == 1  # kvbm_worker_failed_blocks{rank="0"}, the scheduler side's count
        if executor == "uni":
            assert "\nkvbm_offload_blocks_d2h 3.0" in text
            assert not served(port + 1)
        else:
            assert "kvbm_offload_blocks_d2h" not in text
            worker = scrape(port + 1)
            assert worker[("kvbm_offload_blocks_d2h", (("rank", "0"),))] == 3
            assert not any(name.startswith("kvbm_matched") for name, _ in worker)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)  # stopped at shutdown
    assert not served(port + 1)
    with pytest.raises(ValueError, match="'NHD' or 'HND'"):
        kvbm_harness(extra={"kv_layout": "LBHNC"})


def test_config_from_extra_config_overrides_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "2")
    monkeypatch.setenv("DYN_KVBM_MAX_TRANSFER_BATCH_SIZE", "8")
    config = kvbm_config_from({"DYN_KVBM_CPU_CACHE_GB": 0.5, "other": 1})
    assert config.cpu_cache_gb == 0.5 and config.max_transfer_batch_size == 8


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "LHBNC", "BLNHC", "BLHNC", "BHLNC"])
def test_every_standardized_layout_is_detected(layout: str) -> None:
    """The order is read from the views' strides and layer offsets; a prefix hit loads back byte-exact."""
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=48, seed=13).system_prompt
    with kvbm_harness(kv_layout=layout, num_gpu_blocks=16) as h:
        assert worker_of(h).engine_cache.name == f"vllm_{layout.lower()}"
        assert describe_vllm_kv_caches(h.worker.kv_caches).name == f"vllm_{layout.lower()}"
        _first_turn_then_evict(h, prompt)
        h.add_request("second", prompt + [4], 2)
        verified = 0
        while h.busy():
            h.step()
            verified += h.worker.last_report.verified_tokens
        assert verified == LAYERS * 48
        assert_clean(h)


def test_bad_kv_tensors_are_refused() -> None:
    import torch

    with pytest.raises(ValueError, match="dimensions"):
        describe_vllm_kv_caches({"a": torch.zeros(4, 16, 576)})
    with pytest.raises(ValueError, match=r"\[2, B, N, H, D\]"):
        describe_vllm_kv_caches({"a": torch.zeros(4, 3, 16, 2, 8)})
    with pytest.raises(TypeError, match="non-empty dict"):
        describe_vllm_kv_caches({})
    with kvbm_harness() as h:
        worker = DynamoConnector(h.vllm_config, H.KVConnectorRole.WORKER, h.plan.worker_config)
        load = RequestLoad("r", (Move(1, MoveKind.LOAD, "G2", "G1", (0,), (1,), (7,)),))
        worker.bind_connector_metadata(DynamoConnectorMetadata(StepPlan(loads=[load])))
        with pytest.raises(RuntimeError, match="register_kv_caches"):
            worker.start_load_kv(None)
        assert worker.get_finished({"r"}) == (None, None)
        worker.shutdown()
    with pytest.raises(ValueError, match="1 source ids, 2 destination ids"):
        Move(1, MoveKind.LOAD, "G2", "G1", (0,), (1, 2), (7,))
