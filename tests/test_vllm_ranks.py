"""DynamoConnector with tensor and pipeline parallelism: vLLM 0.33's real scheduler, one scheduler-side index, and
2 or 4 worker ranks (``vllm_ranks``), each holding its shard of the KV cache and its own G2/G3 shard, every byte it
reads checked against the deterministic model for its heads and layers. Outputs are aggregated by vLLM's
``KVOutputAggregator``. Needs vLLM 0.33 light; imported plainly so a missing install fails loudly.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import vllm_ranks as R  # first: imports vLLM for the CPU platform
from vllm_ranks import H

from kvbm.config import GB
from kvbm.connectors.registration import WorkersMissingError
from kvbm.leader.plans import direction
from kvbm.vllm_integration.connector import DynamoConnector
from test_process_metrics import free_ports, scrape

CONNECTOR = "kvbm.vllm_integration.connector:DynamoConnector"
#: 3 layers (uneven over 2 pipeline stages: 2 + 1), 4 KV heads (2 per rank at tp=2).
MODEL = H.TinyModelSpec(num_layers=3, num_kv_heads=4, num_attention_heads=8, head_dim=16)


def ranked(tmp_path: Path | None, tp: int, pp: int = 1, *, host: int | None = 512, disk: int | None = None,
           extra: dict[str, Any] | None = None, model: H.TinyModelSpec = MODEL, handshake: bool = True,
           **kw: Any) -> R.RankedVllmHarness:
    """A harness of ``tp x pp`` ranks of ``model`` with ``host`` G2 and ``disk`` G3 blocks; ``handshake``: the
    scheduler side gets the ranks' handshake metadata at start, as vLLM's engine core hands it over."""
    config: dict[str, Any] = {}
    if host is not None:
        config["DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"] = host
    if disk is not None:
        config.update(DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=disk, DYN_KVBM_DISK_CACHE_DIR=str(tmp_path),
                      DYN_KVBM_DISK_DISABLE_O_DIRECT="true", DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="true")
    config.update(extra or {})
    harness = H.HarnessConfig(connector=CONNECTOR, connector_extra_config=config, model=model, num_gpu_blocks=32,
                              handshake=handshake)
    return R.RankedVllmHarness(harness, tp, pp, **kw)


def chat(num_users: int = 5, num_rounds: int = 3) -> H.MultiTurnChatWorkload:
    """Chats whose histories do not fit together in 31 GPU blocks: later turns load from the tiers."""
    return H.MultiTurnChatWorkload(num_users=num_users, num_rounds=num_rounds, system_prompt_tokens=64, seed=5)


def assert_clean(h: R.RankedVllmHarness) -> None:
    """Nothing leaked on the scheduler side or any rank; every move reported by every rank was completed."""
    settled = h.worker.settle()
    assert not any(s["leftover"] for s in settled)
    h.step()  # one empty step carries the ranks' last reports to the leader
    assert h.free_block_count() == h.config.num_gpu_blocks - 1 and not h.scheduler.requests
    assert not h.leader.requests and not h.leader._partial
    h.leader.index.check_invariants()


def run(h: R.RankedVllmHarness, workload: H.MultiTurnChatWorkload) -> None:
    h.run_workload(workload)
    assert workload.done and all(len(h.outputs[t.request_id]) == t.max_tokens for t in workload.completed)


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (2, 2)], ids=["tp2", "tp2-pp2"])
def test_multi_turn_loads_from_host_and_disk_on_every_rank(tmp_path: Path, tp: int, pp: int) -> None:
    """A small G2 pushes blocks to G3; later turns load from both on every rank, byte-exact for each rank's heads
    and layers; one index, one move completed by all ranks' reports."""
    with ranked(tmp_path, tp, pp, host=24, disk=512) as h:
        assert h.leader.num_workers == tp * pp
        run(h, chat())
        counts = h.worker.counts
        assert counts["load_jobs"] > 0 and counts["loaded_blocks"] > 0 and counts["load_errors"] == 0
        assert all(counts[f"verified{r}"] > 0 for r in range(tp * pp))
        assert h.cache_stats.external_hits > 0
        assert_clean(h)


def test_load_failing_on_one_rank_is_recomputed_on_all(tmp_path: Path) -> None:
    """Rank 1 fails every 2nd load move (its blocks keep their poison); vLLM's aggregator unions the invalid
    blocks, so every rank recomputes them, and rank 0's good copy is never trusted alone."""
    with ranked(tmp_path, 2, faults={1: 2}) as h:
        run(h, chat())
        counts = h.worker.counts
        assert counts["load_jobs"] > 1 and counts["load_errors"] > 0
        assert h.worker.rank_invalid[1] and not h.worker.rank_invalid[0]
        assert all(counts[f"verified{r}"] > 0 for r in range(2))
        assert_clean(h)


def test_tiers_are_sized_over_all_ranks(tmp_path: Path) -> None:
    """``DYN_KVBM_CPU_CACHE_GB`` counts a block's bytes over all ranks; every rank holds as many blocks as the
    index, of its own size (pipeline stages of 2 and 1 layers)."""
    rank_bytes = [2 * 16 * 2 * 2 * 16 * n for n in (2, 2, 1, 1)]  # tokens x heads x (K, V) x dim x bf16 x layers
    gb = 300 * sum(rank_bytes) / GB + 1e-9
    with ranked(tmp_path, 2, 2, host=None, extra={"DYN_KVBM_CPU_CACHE_GB": gb}) as h:
        assert h.leader.index.tier_names == ["G2"]
        settled = h.worker.settle()
        assert [s["block_bytes"] for s in settled] == rank_bytes
        assert all(s["blocks"]["G2"] == 300 for s in settled)
        assert h.scheduler.connector.block_bytes == sum(rank_bytes)
        assert_clean(h)


def test_a_rank_with_other_blocks_than_assumed_is_refused(tmp_path: Path) -> None:
    """A worker whose KV tensors differ from what the scheduler side assumed for its rank says both sizes."""
    with ranked(tmp_path, 2, 2) as h:
        rank = h.worker.ranks[2].local  # stage 1: one layer
        config = h.rank_configs[2]
        worker = DynamoConnector(rank.vllm_config, H.KVConnectorRole.WORKER, config)
        wrong = H.allocate_worker_kv_caches(h.rank_configs[0], rank.vllm_config, MODEL, "views")  # 2 layers
        with pytest.raises(ValueError, match=r"rank 2 holds KV blocks of 4096 bytes; the leader sized the tiers for "
                                             r"2048 bytes on this rank \(12288 bytes over 4 ranks\)"):
            worker.register_kv_caches(wrong)
        with pytest.raises(ValueError, match="pipeline stage 1 has 2 KV cache layers"):
            DynamoConnector(rank.vllm_config, H.KVConnectorRole.WORKER, h.rank_configs[0])
        worker.shutdown()


def test_two_rank_processes(tmp_path: Path) -> None:
    """The ranks as spawned OS processes receiving pickled scheduler outputs: multi-turn loads byte-exact on both,
    a load failing on rank 1 only recomputed on both, nothing leaked, processes stopped. With DYN_KVBM_METRICS each
    rank serves its transfers on DYN_KVBM_METRICS_PORT + 1 + rank (labelled by rank), equal to the blocks the plans
    moved, and the scheduler side (this process) serves the lookups, the ranks registered and the blocks each rank
    failed on DYN_KVBM_METRICS_PORT."""
    base = free_ports(3)
    metrics = {"DYN_KVBM_METRICS": "1", "DYN_KVBM_METRICS_PORT": base, "DYN_KVBM_METRICS_HOST": "127.0.0.1"}
    with ranked(tmp_path, 2, ranks="process", faults={1: 2}, extra=metrics) as h:
        planned: Counter = Counter()  # blocks the plans moved, by direction (every rank runs every move)
        execute = h.worker.execute

        def tallying_execute(so: Any, new_block_ids: Any) -> Any:
            plan = so.kv_connector_metadata.plan
            for move in [*(m for load in plan.loads for m in load.moves),
                         *(m for store in plan.stores for m in store.moves), *plan.cascades]:
                planned[direction(move)] += move.num_blocks
            return execute(so, new_block_ids)

        h.worker.execute = tallying_execute
        run(h, chat())
        counts = h.worker.counts
        assert counts["load_jobs"] > 0 and counts["load_errors"] > 0 and not h.worker.rank_invalid[0]
        assert counts["verified0"] > 0 and counts["verified1"] > 0
        block_bytes = [s["block_bytes"] for s in h.worker.settle()]
        assert_clean(h)
        assert set(planned) == {"g1_to_g2", "g2_to_g1"} and min(planned.values()) > 0
        failed = []
        for r in range(2):
            got, rank = scrape(base + 1 + r), ("rank", str(r))
            stored, loaded = got[("kvbm_offload_blocks_d2h", (rank,))], got[("kvbm_onboard_blocks_h2d", (rank,))]
            assert stored == planned["g1_to_g2"]
            assert got[("kvbm_transfer_bytes", (("direction", "g1_to_g2"), rank))] == stored * block_bytes[r]
            assert got[("kvbm_transfer_failed_blocks", (("direction", "g1_to_g2"), rank))] == 0
            failed.append(got[("kvbm_transfer_failed_blocks", (("direction", "g2_to_g1"), rank))])
            assert loaded + failed[r] == planned["g2_to_g1"]
            assert not any(name.startswith(("kvbm_matched", "kvbm_host_cache", "kvbm_workers")) for name, _ in got)
        assert failed[0] == 0 < failed[1]
        got = scrape(base)
        assert got[("kvbm_workers_expected", ())] == 2 == got[("kvbm_workers_registered", ())]
        assert [got[("kvbm_worker_failed_blocks", (("rank", str(r)),))] for r in range(2)] == failed
        assert got[("kvbm_matched_tokens", ())] > 0
        assert not any(name.startswith(("kvbm_offload", "kvbm_onboard", "kvbm_transfer")) for name, _ in got)
        processes = [rank.process for rank in h.worker.ranks]
    assert not any(p.is_alive() for p in processes)


# --------------------------------------------------------------------------------------------------
# Worker registration (DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS) and the ranks' prefill timings
# --------------------------------------------------------------------------------------------------


def prompt_of(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(H.FIRST_REGULAR_TOKEN, 4000) for _ in range(n)]


def test_ranks_register_through_the_handshake_at_start(tmp_path: Path) -> None:
    """As vLLM's engine core hands over the workers' handshake metadata, every rank is registered before the first
    step, with the configured timeout."""
    with ranked(tmp_path, 2, 2, extra={"DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "7"}) as h:
        assert h.leader.workers.missing == [] and h.leader.workers.timeout_s == 7
        assert h.leader.ready()


def test_ranks_register_through_their_first_report(tmp_path: Path) -> None:
    """Without the handshake, nothing is planned in the first step, which computes a whole prompt; the ranks'
    first reports register them, the prompt's blocks are stored in the next step, and a later request loads them
    on both ranks."""
    prompt = prompt_of(64, 21)
    with ranked(tmp_path, 2, handshake=False) as h:
        assert h.leader.workers.missing == [0, 1]
        h.add_request("a", prompt, 3)
        first = h.step()
        assert first.scheduled_tokens == 64
        plan = first.scheduler_output.kv_connector_metadata.plan
        assert not plan.stores and plan.timed_tokens == 0
        assert h.leader.workers.missing == []
        second = h.step().scheduler_output.kv_connector_metadata.plan
        assert sum(m.num_blocks for store in second.stores for m in store.moves) == 4 and second.timed_tokens == 0
        h.run_until_idle()
        assert h.scheduler.reset_prefix_cache()
        h.add_request("b", prompt + [5], 2)
        h.run_until_idle()
        assert h.cache_stats.external_hits == 64 and h.worker.counts["load_errors"] == 0
        assert all(h.worker.counts[f"verified{r}"] > 0 for r in range(2))
        assert_clean(h)


def test_a_rank_that_never_registers_is_named_after_the_timeout(tmp_path: Path) -> None:
    """Rank 1's messages never reach the scheduler side: until DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS (3 s) have
    passed the engine runs with nothing matched or stored (every request computed); the first step after that
    raises, naming rank 1."""
    prompt = prompt_of(64, 22)
    with ranked(tmp_path, 2, silent=[1], extra={"DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "3"}) as h:
        workers = h.leader.workers
        assert workers.missing == [1]
        for i in range(2):
            assert time.monotonic() < workers.deadline - 0.5, "the harness took too long to start"
            h.add_request(f"r{i}", prompt, 2)
            h.run_until_idle()
            assert h.scheduler.reset_prefix_cache()
        assert h.cache_stats.external_hits == 0 and h.worker.counts["load_jobs"] == 0
        assert not any(r["executed"] for r in h.worker.settle())  # no move ran on any rank
        time.sleep(max(workers.deadline - time.monotonic(), 0) + 0.05)
        h.add_request("late", prompt, 2)
        with pytest.raises(WorkersMissingError, match=r"worker rank\(s\) 1 of 2 did not register .* DYN_KVBM_LEADER_"
                                                      r"WORKER_INIT_TIMEOUT_SECS=3 s \(registered: 0\)"):
            h.step()


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (2, 2)], ids=["tp2", "tp2-pp2"])
def test_a_step_time_is_its_slowest_rank_per_stage_summed_over_stages(tmp_path: Path, tp: int, pp: int) -> None:
    """Every rank times each prefill step; the cost rule gets one time per step: the slowest tensor-parallel rank of
    each pipeline stage (rank 1 is made slower), the stages added up."""
    with ranked(tmp_path, tp, pp) as h:
        slow = h.worker.ranks[1].local.harness
        forward = slow._forward

        def slower_forward(work, attn):
            time.sleep(0.15)
            forward(work, attn)

        slow._forward = slower_forward
        timings: dict[int, list] = {}
        observed: list[tuple[int, float]] = []
        apply, observe = h.leader.apply, h.leader.cost.observe_prefill

        def recording_apply(report):
            for t in report.timings:
                timings.setdefault(t.step, []).append(t)
            apply(report)

        def recording_observe(tokens: int, seconds: float) -> None:
            observed.append((tokens, seconds))
            observe(tokens, seconds)

        h.leader.apply, h.leader.cost.observe_prefill = recording_apply, recording_observe
        for i in range(3):
            h.add_request(f"r{i}", prompt_of(80 + 30 * i, 23 + i), 2)
        h.run_until_idle()
        assert timings and all(sorted(t.rank for t in ts) == list(range(tp * pp)) for ts in timings.values())
        expected = []
        for step in sorted(timings):
            ts = timings[step]
            assert {t.stage for t in ts} == set(range(pp)) and len({t.tokens for t in ts}) == 1
            stages = [max(t.seconds for t in ts if t.stage == s) for s in range(pp)]
            assert stages[0] == next(t.seconds for t in ts if t.rank == 1) >= 0.15  # rank 1, stage 0's slowest
            expected.append((ts[0].tokens, sum(stages)))
        assert observed == expected
        assert_clean(h)


#: Hybrid models over 2 pipeline stages: one layer of each group per stage; all full-attention layers on stage 0
#: and all sliding-window ones on stage 1; full attention + Mamba state, split likewise (align mode, and vLLM's
#: "none" mode, whose state group stage 0 holds no layer of: refused for pipeline parallelism before its own refusal
#: names the group's first layer).
HYBRID_STAGES = {
    "alike": (H.TinyModelSpec(num_layers=4, layer_kinds=("full", "sliding", "full", "sliding"), sliding_window=40),
              [[1, 1], [1, 1]]),
    "apart": (H.TinyModelSpec(num_layers=4, layer_kinds=("full", "full", "sliding", "sliding"), sliding_window=40),
              [[2, 0], [0, 2]]),
    "state": (H.TinyModelSpec(num_layers=4, layer_kinds=("full", "full", "mamba", "mamba"),
                              mamba_cache_mode="align"), [[2, 0], [0, 2]]),
    "unkept state": (H.TinyModelSpec(num_layers=4, layer_kinds=("full", "full", "mamba", "mamba")), [[2, 0], [0, 2]]),
}


@pytest.mark.parametrize("name", sorted(HYBRID_STAGES))
def test_a_hybrid_model_under_pipeline_parallelism_is_refused_on_every_side(tmp_path: Path, name: str) -> None:
    """vLLM's own plan for a hybrid model over 2 pipeline stages gives every stage the model's KV cache groups with
    only its own layers (a stage may hold none of a group), the same block count, and the scheduler a copy of stage
    0's groups: no side sees the other stage's block bytes the tiers are sized by (summed over ranks), so the
    scheduler side and each stage's worker refuse the model, saying why."""
    model, per_stage = HYBRID_STAGES[name]
    config = H.HarnessConfig(connector=CONNECTOR, model=model, num_gpu_blocks=64, max_model_len=320,
                             enable_prefix_caching=model.state_align or "mamba" not in model.layer_kinds)
    model_dir = H.write_tiny_model_config(tmp_path / "model", model, config.resolved_max_model_len)
    vllm_config = H.build_vllm_config(config, model_dir)
    R.set_parallel(vllm_config, 1, 2)
    planned, stages = R.plan_rank_caches(vllm_config, model, 1, 2, config.num_gpu_blocks)
    names = [[g.layer_names for g in c.kv_cache_groups] for c in stages]
    assert [[len(layers) for layers in groups] for groups in names] == per_stage
    assert [[type(g.kv_cache_spec) for g in c.kv_cache_groups] for c in stages] == \
        [[type(g.kv_cache_spec) for g in planned.scheduler_config.kv_cache_groups]] * 2
    assert [g.layer_names for g in planned.scheduler_config.kv_cache_groups] == names[0]
    assert {c.num_blocks for c in stages} == {planned.scheduler_config.num_blocks}
    reason = ("does not support a hybrid model \\(2 KV cache groups\\) with pipeline parallelism "
              "\\(pipeline_parallel_size=2\\): vLLM gives each stage's workers the model's groups with only that "
              "stage's layers \\(this config: \\[{}, {}\\] layers per group; .* the scheduler a copy of stage 0's, so "
              "no rank and not the scheduler knows the other stages' block bytes")
    with pytest.raises(ValueError, match=reason.format(*per_stage[0])):
        DynamoConnector(vllm_config, H.KVConnectorRole.SCHEDULER, planned.scheduler_config)
    for stage, kv_config in enumerate(stages):
        R.set_parallel(vllm_config, 1, 2, rank=stage)
        with pytest.raises(ValueError, match=reason.format(*per_stage[stage])):
            DynamoConnector(vllm_config, H.KVConnectorRole.WORKER, kv_config)
