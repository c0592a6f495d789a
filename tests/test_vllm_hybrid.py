"""DynamoConnector with hybrid models on vLLM 0.33's real scheduler (its hybrid KV cache manager, ``SupportsHMA``).

The KV cache configs are planned by vLLM's own planner from vLLM's own spec classes (``FullAttentionSpec``,
``SlidingWindowSpec``, ``MambaSpec``) for a tiny Llama config whose layers are declared of those kinds (no hybrid
model class runs on the CPU platform without weights): full + sliding window gives two KV cache groups sharing one
block pool, full + Mamba a full-attention group and a state group. The worker harness writes and checks each
layer through its group's block table: the whole context of full-attention layers, the window of sliding-window
layers, the state of Mamba layers (every step), byte-exactly, with freshly allocated blocks poisoned first.
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import vllm_harness as H  # first: imports vLLM for the CPU platform, clear of the repo's kernels/ folder
import vllm_ranks as R
from test_vllm_connector import CONNECTOR, Gate, assert_clean, chat, kvbm_harness, metric, run_counting, worker_of

from vllm.distributed.kv_transfer.kv_connector.v1.base import supports_hma
from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, KVCacheGroupSpec

from kvbm.config import KvbmConfig
from kvbm.connectors.groups import FULL, WINDOW, KVGroup
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import WorkerReport
from kvbm.hashing import group_salt, salt_hash, sequence_hashes
from kvbm.kernels.block_transfer import BlockTransfer
from kvbm.leader import MoveResult
from kvbm.tiers import kvbm_tiers
from kvbm.vllm_integration.connector import DynamoConnector
from kvbm.vllm_integration.metadata import DynamoConnectorMetadata

WINDOW_TOKENS = 40
SLIDING = H.TinyModelSpec(num_layers=4, layer_kinds=("full", "sliding", "full", "sliding"),
                          sliding_window=WINDOW_TOKENS)
MAMBA = H.TinyModelSpec(num_layers=2, layer_kinds=("full", "mamba"))


def hybrid_harness(model: H.TinyModelSpec = SLIDING, **overrides: Any) -> H.VllmHarness:
    """48 GPU blocks shared by the groups; the longest request (320 tokens) fits with its window's blocks."""
    overrides.setdefault("num_gpu_blocks", 48)
    overrides.setdefault("max_model_len", 320)
    return kvbm_harness(model=model, **overrides)


def group_loads(so_plan: Any) -> Counter:
    """Blocks loaded per engine tier (one per KV cache group) by a step plan."""
    return Counter({m.dst_tier: m.num_blocks for job in so_plan.loads for m in job.moves})


# --------------------------------------------------------------------------------------------------
# Full + sliding window
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("runner", ["v1", "v2"])
@pytest.mark.parametrize("disk", [False, True], ids=["host", "host+disk"])
def test_sliding_window_chat_onboards_byte_exact(tmp_path: Path, runner: str, disk: bool) -> None:
    """Multi-turn chats through two KV cache groups: later turns load from G2 (and, with a small G2, from G3) into
    both groups' blocks (the sliding-window group only the blocks its window reads), every attended byte checked,
    nothing leaked."""
    tiers: dict[str, Any] = dict(host=24, disk=512, extra={"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}) if disk \
        else {}
    with hybrid_harness(tmp_path=tmp_path, runner=runner, **tiers) as h:
        groups = h.plan.scheduler_config.kv_cache_groups
        assert [type(g.kv_cache_spec).__name__ for g in groups] == ["FullAttentionSpec", "SlidingWindowSpec"]
        assert supports_hma(h.scheduler.connector) and h.scheduler.connector.hybrid
        assert sorted(worker_of(h).store.caches) == ["G1", "G1.1", "G2"] + (["G3"] if disk else [])
        per_tier: Counter = Counter()
        execute = h.worker.execute

        def counting(so: Any, new_blocks: Any) -> Any:
            per_tier.update(group_loads(so.kv_connector_metadata.plan))
            return execute(so, new_blocks)

        h.worker.execute = counting
        counts = run_counting(h, chat())
        assert counts["load_jobs"] > 0 and counts["verified"] > 0 and counts["load_errors"] == 0
        assert h.cache_stats.external_hits > 0
        # Full attention loads every block of a hit; the window group at most ceil(39 / 16) + 1 blocks of each.
        assert per_tier["G1"] > per_tier["G1.1"] > 0
        assert per_tier["G1.1"] <= counts["load_jobs"] // 2 * (-(-(WINDOW_TOKENS - 1) // 16) + 1)
        # Both groups' onboards are counted as G2 -> G1 (or G3 -> G1) in the metrics.
        block_bytes = worker_of(h).engine_cache.geometry.block_bytes
        from_disk = metric(h, "kvbm_transfer_bytes", "g3_to_g1")
        assert metric(h, "kvbm_transfer_bytes", "g2_to_g1") + from_disk == counts["loaded_blocks"] * block_bytes
        assert (from_disk > 0) == disk
        assert_clean(h)


@contextlib.contextmanager
def first_load_fails(worker: Any, tier: str) -> Iterator[list[int]]:
    """While open: the worker's first transfer into the engine cache ``tier`` fails every block as lost (a failed
    read); yields the engine block ids it was to fill."""
    cache, transfers = worker.store.cache(tier), worker.store.transfers
    real = transfers.submit
    failed: list[int] = []

    def failing(src: Any, dst: Any, src_ids: Any, dst_ids: Any, *args: Any, **kwargs: Any) -> BlockTransfer:
        if dst is not cache or failed:
            return real(src, dst, src_ids, dst_ids, *args, **kwargs)
        failed.extend(dst_ids)
        n = len(dst_ids)
        return BlockTransfer(n, "injected", errors={i: "injected read error" for i in range(n)}, lost=set(range(n)))

    transfers.submit = failing
    try:
        yield failed
    finally:
        transfers.submit = real

def chat_on_two_ranks(h: Any) -> None:
    """A multi-round chat on a two-rank harness: every request finishes, both ranks load and verify blocks, no load
    fails, nothing is left held."""
    workload = H.MultiTurnChatWorkload(num_users=5, num_rounds=3, system_prompt_tokens=64, seed=5)
    h.run_workload(workload)
    assert workload.done and all(len(h.outputs[t.request_id]) == t.max_tokens for t in workload.completed)
    counts = h.worker.counts
    assert counts["load_jobs"] > 0 and counts["loaded_blocks"] > 0 and counts["load_errors"] == 0
    assert counts["verified0"] > 0 and counts["verified1"] > 0 and h.cache_stats.external_hits > 0
    assert not any(s["leftover"] for s in h.worker.settle())


def store_then_ask_again(h: H.VllmHarness) -> tuple[list[Any], int]:
    """A 150-token prompt stored, vLLM's cache reset, the prompt (two other tokens appended) asked again: the
    second request's load moves and the tokens its attention layers read on admission."""
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=150, seed=11).system_prompt
    h.add_request("first", prompt, 3)
    h.run_until_idle()
    assert h.scheduler.reset_prefix_cache()
    plans: list[Any] = []
    execute = h.worker.execute
    h.worker.execute = lambda so, nb: (plans.append(so.kv_connector_metadata.plan), execute(so, nb))[1]
    h.add_request("second", prompt + [7, 8], 2)
    verified = 0
    while h.busy():
        h.step()
        verified += h.worker.last_report.verified_tokens
    return [m for plan in plans for job in plan.loads for m in job.moves], verified


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_sliding_window_loads_exactly_the_window(runner: str) -> None:
    """One prompt stored, vLLM's cache reset, the prompt asked again: the full group loads every block of the
    hit, the window group exactly the blocks holding the 39 tokens before the hit point (vLLM holds its null block
    below them), and the second request reads the right bytes in both."""
    with hybrid_harness(runner=runner) as h:
        loads, verified = store_then_ask_again(h)
        hit = 144  # 9 full blocks of the 152-token prompt (150 + 2)
        assert h.cache_stats.external_hits == hit
        full = sorted(b for m in loads if m.dst_tier == "G1" for b in m.dst_ids)
        window = sorted(b for m in loads if m.dst_tier == "G1.1" for b in m.dst_ids)
        assert len(full) == 9
        first_kept = (hit - (WINDOW_TOKENS - 1)) // 16  # block 6: tokens 105.. are read by position 144
        assert len(window) == 9 - first_kept == 3
        # Full layers read all 144 positions, window layers the 39 before position 144 (checked on admission).
        assert verified == 2 * hit + 2 * (WINDOW_TOKENS - 1)
        assert_clean(h)


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_sliding_window_stores_skip_freed_blocks_and_flush_before_reuse(runner: str) -> None:
    """A long prefill in chunks smaller than the prompt: vLLM frees window blocks below the window while the
    request runs; the connector never stores a block below the window of the tokens computed before a step, and
    a store still reading one is finished in ``handle_preemptions`` before vLLM hands the block out again (the
    harness poisons reused blocks right after it). With async scheduling (V2) a step is planned before the
    previous step's store is reported, so those flushes happen."""
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=300, seed=12).system_prompt
    with hybrid_harness(max_num_batched_tokens=64, runner=runner) as h:
        side = h.scheduler.connector.scheduler_side
        window_stores: list[int] = []
        flushes = 0
        execute = h.worker.execute

        def checking(so: Any, new_blocks: Any) -> Any:
            nonlocal flushes
            plan = so.kv_connector_metadata.plan
            for job in plan.stores:
                window_stores.extend(b for m in job.moves if m.src_tier == "G1.1" for b in m.src_ids)
            flushes += "long" in plan.preempted and "long" not in (so.preempted_req_ids or ())
            return execute(so, new_blocks)

        h.worker.execute = checking
        h.add_request("long", prompt, 4)
        h.run_until_idle()
        assert len(window_stores) == 300 // 16  # every window block stored once, when computed
        assert not side.leader.requests
        assert (flushes > 0) == h.config.use_async_scheduling
        # Served back: a second request hits the whole prompt in both groups.
        assert h.scheduler.reset_prefix_cache()
        h.add_request("again", prompt + [9], 2)
        h.run_until_idle()
        assert h.cache_stats.external_hits == 288
        assert_clean(h)


def test_store_of_a_freed_window_block_is_finished_before_reuse() -> None:
    """Window-group stores kept in flight: once vLLM frees the window blocks below the window (the step after the
    100-token prefill frees blocks 0..2), ``handle_preemptions`` waits for the stores still reading them, before
    the step's forward may write the blocks again."""
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=100, seed=14).system_prompt
    with hybrid_harness() as h:
        store = worker_of(h).store
        gate = Gate(SimpleNamespace(engine_cache=store.cache("G1.1"), store=store), "offload")
        h.add_request("a", prompt, 4)
        h.step()
        assert gate.transfers and h.worker.call_log[-1] == "clear_connector_metadata"
        with pytest.raises(AssertionError, match="a gated transfer was waited for"):
            h.step()
        assert h.worker.call_log[-1] == "handle_preemptions"
        gate.release()


def test_store_of_a_window_block_freed_at_finish_is_finished_before_reuse() -> None:
    """A 60-token prompt answered in one step: vLLM frees window block 0 as the request finishes (before
    ``request_finished_all_groups``), while its store is in flight; the next step's ``handle_preemptions`` waits
    for it."""
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=60, seed=15).system_prompt
    with hybrid_harness() as h:
        store = worker_of(h).store
        gate = Gate(SimpleNamespace(engine_cache=store.cache("G1.1"), store=store), "offload")
        h.add_request("a", prompt, 1)
        h.step()
        assert gate.transfers and "a" in h.scheduler.requests  # finished, blocks held for its stores
        with pytest.raises(AssertionError, match="a gated transfer was waited for"):
            h.step()
        assert h.worker.call_log[-1] == "handle_preemptions"
        gate.release()


def test_sliding_window_failed_load_fails_the_request_for_recompute() -> None:
    """Loads into the sliding-window group fail (nothing written, the stored copies reported bad): vLLM takes no
    block ids of a hybrid model, so the connector reports the request in ``failed_recving`` and vLLM recomputes
    it; the full group's loaded blocks are not trusted either. Re-admitted, it loads the shorter hit whose window
    blocks are still stored, and reads the right bytes."""
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=150, seed=13).system_prompt
    with hybrid_harness() as h:
        h.add_request("first", prompt, 3)
        h.run_until_idle()
        assert h.scheduler.reset_prefix_cache()
        results: list[Any] = []
        get_results = h.worker.connector.get_transfer_results

        def recording(finished: Any) -> Any:
            out = get_results(finished)
            results.append(out)
            return out

        h.worker.connector.get_transfer_results = recording
        with first_load_fails(worker_of(h), "G1.1") as failed:  # the window group's
            h.add_request("second", prompt + [7, 8], 2)
            h.run_until_idle()
        assert len(failed) == 3 and [r for r in results if "second" in r.failed_recving]
        assert len(h.outputs["second"]) == 2
        # The first admission hit 144 tokens; the retry's hit ends where the window no longer reads the lost
        # blocks 6..8: 96 tokens (window blocks 3..5).
        assert h.cache_stats.external_hits == 144 + 96
        assert_clean(h)


def test_sliding_window_with_tensor_parallelism(tmp_path: Path) -> None:
    """Two tensor-parallel ranks (``vllm_ranks``), each with its half of the KV heads of both groups and its own
    G2/G3 shard: later turns load into both groups on both ranks, every attended byte of each rank checked."""
    model = H.TinyModelSpec(num_layers=4, num_kv_heads=4, num_attention_heads=8, layer_kinds=SLIDING.layer_kinds,
                            sliding_window=WINDOW_TOKENS)
    config = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": 24, "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": 512,
              "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true",
              "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}
    harness = H.HarnessConfig(connector=CONNECTOR, connector_extra_config=config, model=model, num_gpu_blocks=48,
                              max_model_len=320)
    with R.RankedVllmHarness(harness, 2, 1) as h:
        assert h.leader.hybrid and h.leader.num_workers == 2
        chat_on_two_ranks(h)


def test_group_keys_never_collide() -> None:
    """Each group of a hybrid model hashes with its own salt (index and spec mixed in); a one-group model keeps
    the request's salt, i.e. Dynamo KVBM's hashes."""
    salt = salt_hash("s", None)
    full, window = KVGroup(0, FULL, 16, "full:a"), KVGroup(1, WINDOW, 16, "window:a", window=39)
    tokens = list(range(100, 164))
    assert full.salt(salt, hybrid=False) == salt
    salts = {full.salt(salt, True), window.salt(salt, True), KVGroup(1, WINDOW, 16, "window:b", window=39).salt(
        salt, True), KVGroup(2, WINDOW, 16, "window:a", window=39).salt(salt, True), salt}
    assert len(salts) == 5
    hashes = [set(sequence_hashes(tokens, 16, s)) for s in salts]
    assert all(a.isdisjoint(b) for i, a in enumerate(hashes) for b in hashes[i + 1:])
    assert group_salt(salt, 1, "x") == group_salt(salt, 1, "x")
    with pytest.raises(ValueError, match="spec_key"):
        group_salt(salt, 1, "")
    assert window.first_kept_block(144) == 6 and window.first_kept_block(30) == 0 and full.first_kept_block(144) == 0


def leader_with_stores(second: KVGroup, tokens: list[int], group_ids: list[int], keep_from: int
                       ) -> tuple[ConnectorLeader, Any, Any, dict[str, list[int]]]:
    """The engine-independent leader of a full group and ``second`` (blocks of 4 tokens, G2 only) after request "a"
    of ``tokens`` planned the stores of its first 8 blocks (engine blocks 20..27 in the full group, ``group_ids``
    in the second, block 0 the null placeholder), the second group's from block ``keep_from``: (leader, the
    request's state, the step's plan, the source block ids stored per engine tier)."""
    config = KvbmConfig(cpu_cache_override_num_blocks=64, max_transfer_batch_size=8)
    leader = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4)
    leader.use_groups((KVGroup(0, FULL, 4, "f"), second))
    state = leader.track("a", salt=0)
    state.block_ids, state.groups[0].block_ids = list(range(20, 28)), group_ids
    leader.plan_stores(state, tokens, 8)
    leader.plan_stores(state, tokens, 8, group=1, keep_from=keep_from, null_block=0)
    plan = leader.take_step()
    return leader, state, plan, {m.src_tier: list(m.src_ids) for job in plan.stores for m in job.moves}


def test_leader_hybrid_hit_loads_and_stores() -> None:
    """The engine-independent leader with a full and a sliding-window group (blocks of 4 tokens, window 6): stores
    skip placeholders and blocks below ``keep_from``, the common hit shrinks until the window group holds what its
    window reads, each group loads its own range into its own engine tier, and ``stores_below`` sees unreported
    window stores."""
    tokens = list(range(10, 42))  # 8 blocks
    leader, state, plan, stored = leader_with_stores(KVGroup(1, WINDOW, 4, "w", window=5), tokens,
                                                     [0, 0, 32, 33, 34, 35, 36, 37], keep_from=3)
    assert stored == {"G1": list(range(20, 28)), "G1.1": [33, 34, 35, 36, 37]}  # 32 is below keep_from
    assert leader.stores_below(state, 1, 4) and not leader.stores_below(state, 1, 3)
    leader.apply(WorkerReport({m.move_id: MoveResult(m.move_id) for job in plan.stores for m in job.moves}))
    assert not leader.stores_below(state, 1, 8)
    assert set(state.hashes).isdisjoint(state.groups[0].hashes)
    leader.forget("a")
    # Full group: blocks 0..7 stored; window group: blocks 3..7. A hit at 7 blocks (28 tokens; one token must be
    # computed) needs window blocks from (28 - 5) // 4 = 5: held, so all 7 blocks are a hit.
    b = leader.track("b", salt=0)
    assert leader.match(b, tokens, 0) == 28
    loads = leader.plan_matched_group_loads(b, [list(range(40, 48)), [0] * 5 + [55, 56, 57]], 7, null_block=0)
    assert [(m.dst_tier, list(m.dst_ids)) for load in loads for m in load.moves] == [
        ("G1", list(range(40, 47))), ("G1.1", [55, 56])]
    # A shorter prompt's hit at 3 blocks needs window blocks 0..2, never stored: the hit shrinks to nothing.
    c = leader.track("c", salt=0)
    assert leader.match(c, tokens[:13], 0) == 0


def test_unsupported_groups_are_refused() -> None:
    """Groups of another attention kind are refused with the reason; groups of unlike layer counts are not (their
    blocks share raw tier slots: `test_vllm_hybrid_unlike`). (A hybrid model under pipeline parallelism:
    `test_vllm_ranks`.)"""
    with hybrid_harness() as h:
        config = h.plan.scheduler_config
        groups = config.kv_cache_groups
        spec = groups[1].kv_cache_spec
        chunked = ChunkedLocalAttentionSpec(block_size=spec.block_size, num_kv_heads=spec.num_kv_heads,
                                            head_size=spec.head_size, dtype=spec.dtype, attention_chunk_size=32)
        other = config.__class__(**{**config.__dict__, "kv_cache_groups": [
            groups[0], KVCacheGroupSpec(groups[1].layer_names, chunked)]})
        with pytest.raises(ValueError, match="ChunkedLocalAttentionSpec in KV cache group 1"):
            DynamoConnector(h.vllm_config, H.KVConnectorRole.SCHEDULER, other)
        fewer = config.__class__(**{**config.__dict__, "kv_cache_groups": [
            groups[0], KVCacheGroupSpec(groups[1].layer_names[:1], spec)]})
        accepted = DynamoConnector(h.vllm_config, H.KVConnectorRole.SCHEDULER, fewer)
        assert [g.kind for g in accepted.groups] == [FULL, WINDOW] and accepted.refusal is None
        accepted.shutdown()


# --------------------------------------------------------------------------------------------------
# Full + Mamba state
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_mamba_state_group_is_refused_and_nothing_served_wrong(runner: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A full-attention + Mamba model without prefix caching (vLLM then keeps its state in
    ``mamba_cache_mode="none"``: one running state per request): the connector logs why it refuses the state
    group, claims no hit, stores nothing and allocates no tiers; the engine runs as without it, every attention
    context and every step's state checked. (Align mode: `test_vllm_hybrid_state`.)"""
    with caplog.at_level(logging.WARNING, logger="kvbm.vllm_integration.connector"):
        h = hybrid_harness(MAMBA, runner=runner, enable_prefix_caching=False, verify="every_step")
    with h:
        groups = h.plan.scheduler_config.kv_cache_groups
        assert [type(g.kv_cache_spec).__name__ for g in groups] == ["FullAttentionSpec", "MambaSpec"]
        assert "KV cache group 1 holds recurrent state (MambaSpec, mamba_cache_mode='none'" in caplog.text
        assert "one running state, never the state at a block boundary" in caplog.text
        assert h.worker.connector.worker is None
        states = 0
        execute = h.worker.execute

        def counting(so: Any, new_blocks: Any) -> Any:
            nonlocal states
            assert isinstance(so.kv_connector_metadata, DynamoConnectorMetadata)
            out = execute(so, new_blocks)
            states += h.worker.last_report.verified_states
            return out

        h.worker.execute = counting
        workload = chat()
        counts = run_counting(h, workload)
        assert workload.done and counts["verified"] > 0 and states > 0
        assert counts["load_jobs"] == counts["save_jobs"] == 0 and h.cache_stats.external_hits == 0
        assert not h.scheduler.connector.scheduler_side.leader.requests
        assert h.free_block_count() == h.config.num_gpu_blocks - 1


def test_mamba_state_check_catches_a_wrong_state() -> None:
    """The harness's state check is live: a running request's state block overwritten mid-run fails the run."""
    with hybrid_harness(MAMBA, enable_prefix_caching=False) as h:
        h.add_request("a", list(range(10, 90)), 20)
        for _ in range(3):
            h.step()
        state = h.worker.requests["a"]
        h.worker.state_views["model.layers.1.self_attn.attn"][state.block_ids[1][0]] += 1
        with pytest.raises(H.KVMismatchError, match="Mamba layer 1"):
            h.run_until_idle()


def test_connector_is_hma_capable_for_vllm() -> None:
    """vLLM keeps its hybrid KV cache manager on with DynamoConnector (it turns it off for connectors without
    ``SupportsHMA``)."""
    with hybrid_harness() as h:
        assert h.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager is False
        assert h.vllm_config.kv_transfer_config.kv_connector_module_path + ":DynamoConnector" == CONNECTOR
