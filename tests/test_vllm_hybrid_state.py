"""DynamoConnector with a hybrid model of full attention and recurrent state (Mamba) in vLLM 0.33's
``mamba_cache_mode="align"``, on vLLM's real scheduler (its hybrid KV cache manager and ``MambaManager``).

In align mode vLLM keeps a request's state at block boundaries: block ``i`` of the state group's block table holds
the state after the first ``(i + 1) * block_size`` tokens once a chunk (prefill chunks end on block boundaries) or
a decode step reaches that boundary, or once a backend with prefill checkpoints (Mamba2's) exported it from inside
a chunk into the block reserved at that column; the blocks between chunk ends are its null block, and the blocks
below the one holding the state of the last computed token are freed. An external hit of ``T`` tokens gets one
real state block, at column ``T / block_size - 1``, and the first step after it reads the state there. kvbm stores
every real state block once its boundary is computed, keyed like a KV block of its group, and loads the one block a
hit needs. The worker harness runs the state the way both of vLLM's model runners place it (read from column
``(start - 1) // block_size``, written to ``cdiv(end, block_size) - 1``; checkpoints where vLLM's own
``compute_mamba_prefill_checkpoints`` puts them) and checks the state it reads at every step byte-exactly, as well
as every attention context, with freshly allocated blocks poisoned first.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import vllm_harness as H  # first: imports vLLM for the CPU platform, clear of the repo's kernels/ folder
import vllm_ranks as R
from test_vllm_connector import CONNECTOR, Gate, assert_clean, chat, kvbm_harness, metric, run_counting, worker_of
from test_vllm_hybrid import chat_on_two_ranks, first_load_fails, leader_with_stores, store_then_ask_again
from test_vllm_hybrid_unlike import record_failed_loads, record_hits

from kvbm.connectors.groups import FULL, STATE, KVGroup
from kvbm.connectors.messages import WorkerReport
from kvbm.leader import MoveResult
from kvbm.vllm_integration.ranks import kv_groups

KINDS = ("full", "mamba", "full", "mamba")
MAMBA_ALIGN = H.TinyModelSpec(num_layers=4, layer_kinds=KINDS, mamba_cache_mode="align")
#: The same with prefill checkpoints (as ``MambaMixer2``, i.e. Mamba2 hybrids, declares them): a prefill's last
#: chunk runs past its last block boundary, the backend exporting the state there into a block reserved at its column.
MAMBA2_ALIGN = dataclasses.replace(MAMBA_ALIGN, mamba_checkpoints=True)
MODELS = {"mamba": MAMBA_ALIGN, "mamba2": MAMBA2_ALIGN}
STATE_TIER = "G1.1"


def state_harness(tmp_path: Path | None = None, model: str = "mamba", **overrides: Any) -> H.VllmHarness:
    """Full attention (layers 0, 2) and Mamba state (layers 1, 3) with prefix caching on: vLLM plans a full group
    and a state group of 16-token blocks; 48 GPU blocks shared by both."""
    overrides.setdefault("num_gpu_blocks", 48)
    overrides.setdefault("max_model_len", 320)
    return kvbm_harness(tmp_path, model=MODELS[model], **overrides)


def record_plans(h: H.VllmHarness) -> list[Any]:
    """Every step plan the workers run from now on."""
    plans: list[Any] = []
    execute = h.worker.execute

    def recording(so: Any, new_blocks: Any) -> Any:
        plans.append(so.kv_connector_metadata.plan)
        return execute(so, new_blocks)

    h.worker.execute = recording
    return plans


def count_states(h: H.VllmHarness) -> Counter:
    """States the harness read and checked byte-exactly, summed over the steps from now on (``"states"``)."""
    counts: Counter = Counter()
    execute = h.worker.execute

    def counting(so: Any, new_blocks: Any) -> Any:
        out = execute(so, new_blocks)
        counts["states"] += h.worker.last_report.verified_states
        return out

    h.worker.execute = counting
    return counts


def state_moves(plans: list[Any], kind: str) -> list[Any]:
    """The state group's moves of ``kind`` ("loads" or "stores") in ``plans``."""
    return [m for plan in plans for job in getattr(plan, kind) for m in job.moves
            if STATE_TIER in (m.src_tier, m.dst_tier)]


# --------------------------------------------------------------------------------------------------
# Multi-turn chats through the real scheduler
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_harness_places_states_where_vllm_prefix_cache_finds_them(model: str) -> None:
    """The harness's placement of states (and of prefill checkpoints) agrees with vLLM's scheduler: without a
    connector, vLLM's own prefix-cache hits in align mode resume from the state blocks it cached, and every state a
    step reads, over a chat with hits, chunked prefills and preemptions, is byte-exact."""
    harness = H.HarnessConfig(model=MODELS[model], num_gpu_blocks=32, max_model_len=320, max_num_batched_tokens=64,
                              verify="every_step")
    with H.VllmHarness(harness) as h:
        states = count_states(h)
        preempted = 0
        execute = h.worker.execute

        def counting(so: Any, new_blocks: Any) -> Any:
            nonlocal preempted
            preempted += len(so.preempted_req_ids or ())
            return execute(so, new_blocks)

        h.worker.execute = counting
        workload = chat(num_users=6, num_rounds=3)
        h.run_workload(workload)
        assert workload.done and h.cache_stats.gpu_hits > 0 and states["states"] > 0 and preempted > 0


TIERS: dict[str, dict[str, Any]] = {
    "host": {},
    "host+disk": dict(host=24, disk=512, extra={"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}),
}


CHATS = [pytest.param(model, runner, tiers, None, id=f"{model}-{runner}-{tiers}")
         for model in MODELS for runner in ("v1", "v2") for tiers in TIERS]
CHATS += [pytest.param("mamba", "v1", "host", "BLNHC", id="mamba-v1-host-BLNHC"),
          pytest.param("mamba2", "v2", "host+disk", "BLNHC", id="mamba2-v2-host+disk-BLNHC")]


@pytest.mark.parametrize("model, runner, tiers, layout", CHATS)
def test_state_group_chat_onboards_byte_exact(tmp_path: Path, model: str, runner: str, tiers: str,
                                              layout: str | None) -> None:
    """Multi-turn chats: later turns load their attention blocks and the one state block at the hit point from G2
    (with a small G2 also from G3), every hit a whole number of blocks; the state read at every step (the loaded
    one at the first step after a hit) and every attended byte are checked, no load fails and nothing leaks. In a
    block-outermost layout (BLNHC) vLLM pads each layer's state page inside the block."""
    with state_harness(tmp_path, model, runner=runner, kv_layout=layout, **TIERS[tiers]) as h:
        groups = h.plan.scheduler_config.kv_cache_groups
        assert [type(g.kv_cache_spec).__name__ for g in groups] == ["FullAttentionSpec", "MambaSpec"]
        assert [g.kv_cache_spec.block_size for g in groups] == [16, 16] and h.plan.hash_block_size == 16
        assert [g.kind for g in h.scheduler.connector.groups] == [FULL, STATE]
        assert sorted(worker_of(h).store.caches) == ["G1", STATE_TIER, "G2"] + (["G3"] if tiers != "host" else [])
        hits, failed, plans, states = record_hits(h), record_failed_loads(h), record_plans(h), count_states(h)
        counts = run_counting(h, chat())
        assert counts["load_jobs"] > 0 and counts["verified"] > 0 and states["states"] > 0 and not failed
        assert h.cache_stats.external_hits > 0 and all((local + n) % 16 == 0 for local, n in hits if n)
        # A hit's loads are one job per group (full, state): the state job brings exactly one block.
        state_jobs = [job for plan in plans for job in plan.loads[1::2]]
        assert all(len(plan.loads) % 2 == 0 for plan in plans) and len(state_jobs) == counts["load_jobs"] // 2
        assert all(sum(m.num_blocks for m in job.moves) + len(job.missing) == 1 for job in state_jobs)
        assert all(m.dst_tier == STATE_TIER for job in state_jobs for m in job.moves)
        assert len(state_moves(plans, "stores")) > 0
        assert (metric(h, "kvbm_transfer_bytes", "g3_to_g1") > 0) == (tiers != "host")
        assert_clean(h)


def test_state_group_with_tensor_parallelism(tmp_path: Path) -> None:
    """Two tensor-parallel ranks (``vllm_ranks``), each with its half of the attention heads and its own state
    bytes: later turns load both groups on both ranks from G2 and G3, every byte of each rank checked."""
    model = H.TinyModelSpec(num_layers=4, num_kv_heads=4, num_attention_heads=8, layer_kinds=KINDS,
                            mamba_cache_mode="align")
    config = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": 24, "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": 512,
              "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true",
              "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true", "DYN_KVBM_DISABLE_COST_AWARE_HITS": "true"}
    harness = H.HarnessConfig(connector=CONNECTOR, connector_extra_config=config, model=model, num_gpu_blocks=48,
                              max_model_len=320)
    with R.RankedVllmHarness(harness, 2, 1) as h:
        assert h.leader.hybrid and h.leader.num_workers == 2
        assert [g.kind for g in h.leader.groups] == [FULL, STATE]
        chat_on_two_ranks(h)


# --------------------------------------------------------------------------------------------------
# Exactly which blocks one hit loads, and which are stored
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_hit_loads_the_one_state_block_at_its_end(model: str, runner: str) -> None:
    """A 150-token prompt is computed in chunks ending at 144 (vLLM stops a chunk at the last block boundary before
    the prompt's end) and 150, or in one chunk whose backend exports the state after 144 tokens into column 8
    (prefill checkpoints); asked again (two tokens appended) after vLLM's cache is reset, it hits 144 tokens: the
    full group loads its 9 blocks, the state group the one block holding the state after 144 tokens, into column 8
    of the request's state blocks, where the first step reads it (checked)."""
    with state_harness(model=model, runner=runner) as h:
        states = count_states(h)
        tables: dict[str, list[int]] = {}
        execute = h.worker.execute

        def keeping(so: Any, new_blocks: Any) -> Any:
            out = execute(so, new_blocks)
            if "second" in h.worker.requests:
                tables.setdefault("second", list(h.worker.requests["second"].block_ids[1]))
            return out

        h.worker.execute = keeping
        loads, verified = store_then_ask_again(h)
        hit = 144
        assert h.cache_stats.external_hits == hit
        full = [b for m in loads if m.dst_tier == "G1" for b in m.dst_ids]
        state = [b for m in loads if m.dst_tier == STATE_TIER for b in m.dst_ids]
        assert len(full) == hit // 16 and len(state) == 1
        assert tables["second"][:hit // 16 - 1] == [0] * (hit // 16 - 1) and tables["second"][hit // 16 - 1] == state[0]
        assert verified == 2 * hit  # the full layers' context on admission
        assert states["states"] > 0
        assert_clean(h)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("retention", [None, 0], ids=["dense", "sparse"])
def test_state_stores_are_the_boundary_states_vllm_hands_over(model: str, retention: int | None) -> None:
    """kvbm finds a request's state blocks by their place in the group's block table; vLLM also hands a connector
    each state block it caches, with the boundary its state follows (``boundary_state_offloads``). Over a chat with
    chunked prefills, preemptions and decodes, every block vLLM hands over sits in kvbm's table at column
    ``boundary / 16 - 1``. With vLLM caching every state block (``prefix_cache_retention_interval=None``) every
    state block kvbm stores is one vLLM handed over for that request; with vLLM's default sparse retention (the
    prompt's last boundary only) kvbm stores more: the states at chunk ends and decode boundaries, which vLLM
    computed as well (their bytes are checked wherever a later hit loads them)."""
    with state_harness(model=model, max_num_batched_tokens=64, prefix_cache_retention_interval=retention,
                       num_gpu_blocks=28) as h:
        side = h.scheduler.connector.scheduler_side
        offered: set[tuple[str, int]] = set()
        stored: set[tuple[str, int]] = set()
        placed = 0
        build = h.scheduler.connector.build_connector_meta

        def checking(so: Any) -> Any:
            nonlocal placed
            meta = build(so)
            for request_id, entries in so.kv_connector_block_state.boundary_state_offloads.items():
                for group, block, tokens in entries:
                    assert group == 1 and tokens % 16 == 0
                    offered.add((request_id, block))
                    state = side.leader.requests.get(request_id)
                    table = side.leader.group_state(state, 1).block_ids if state is not None else []
                    if len(table) >= tokens // 16:
                        assert table[tokens // 16 - 1] == block, (request_id, tokens, table)
                        placed += 1
            for job in meta.plan.stores:
                stored.update((job.request_id, b) for m in job.moves if m.src_tier == STATE_TIER for b in m.src_ids)
            return meta

        h.scheduler.connector.build_connector_meta = checking
        counts = run_counting(h, chat(num_users=6, num_rounds=3))
        assert counts["preempted"] > 0 and h.cache_stats.external_hits > 0
        assert placed > 0 and stored and (stored <= offered) == (retention is None)
        assert_clean(h)


# --------------------------------------------------------------------------------------------------
# Stores of freed state blocks, failed loads, the negative control
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def gated_state_store(model: str, *, prompt_tokens: int, seed: int, max_tokens: int, steps: int
                      ) -> Iterator[tuple[Any, Gate]]:
    """One request's state-group stores held in flight (`Gate`) after ``steps`` engine steps; yields the harness and
    the gate, then checks that the next step waits for them in ``handle_preemptions`` (before its forward)."""
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=prompt_tokens, seed=seed).system_prompt
    with state_harness(model=model) as h:
        store = worker_of(h).store
        gate = Gate(SimpleNamespace(engine_cache=store.cache(STATE_TIER), store=store), "offload")
        h.add_request("a", prompt, max_tokens)
        for _ in range(steps):
            h.step()
        yield h, gate
        with pytest.raises(AssertionError, match="a gated transfer was waited for"):
            h.step()
        assert h.worker.call_log[-1] == "handle_preemptions"
        gate.release()


@pytest.mark.parametrize("model, steps", [("mamba", 2), ("mamba2", 1)])
def test_store_of_a_freed_state_block_is_finished_before_reuse(model: str, steps: int) -> None:
    """State-group stores kept in flight: a 100-token prompt is computed in chunks ending at 96 (its state in
    column 5) and 100, or in one chunk exporting the state after 96 tokens into column 5 (prefill checkpoints);
    the step after the prompt, vLLM frees the state block of 96 (the request's state is in column 6 now), and
    ``handle_preemptions`` waits for its store before the step's forward may write the block again."""
    with gated_state_store(model, prompt_tokens=100, seed=14, max_tokens=4, steps=steps) as (h, gate):
        assert gate.transfers and h.worker.call_log[-1] == "clear_connector_metadata"


@pytest.mark.parametrize("model, steps", [("mamba", 2), ("mamba2", 1)])
def test_store_of_a_state_block_freed_at_finish_is_finished_before_reuse(model: str, steps: int) -> None:
    """A 60-token prompt (chunks ending at 48 and 60, or one exporting the state after 48 tokens) answered with one
    token: vLLM frees the state block of 48 as the request finishes (before ``request_finished_all_groups``), while
    its store is in flight; the next step's ``handle_preemptions`` waits for it."""
    with gated_state_store(model, prompt_tokens=60, seed=15, max_tokens=1, steps=steps) as (h, gate):
        assert gate.transfers and "a" in h.scheduler.requests  # finished, blocks held for its stores


def test_failed_state_load_fails_the_request_for_recompute() -> None:
    """The load of the state block fails (nothing written, the stored copy reported bad): the connector reports the
    request in ``failed_recving`` and vLLM recomputes it whole; the attention blocks loaded beside it are not
    trusted either. Re-admitted, no stored state ends where its attention blocks do (the one at 144 is dropped),
    so it hits nothing and computes its prompt, every state it reads checked."""
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=150, seed=13).system_prompt
    with state_harness() as h:
        h.add_request("first", prompt, 3)
        h.run_until_idle()
        assert h.scheduler.reset_prefix_cache()
        failed_requests, states = record_failed_loads(h), count_states(h)
        with first_load_fails(worker_of(h), STATE_TIER) as failed:  # the state group's
            h.add_request("second", prompt + [7, 8], 2)
            h.run_until_idle()
        assert len(failed) == 1 and failed_requests == ["second"] and len(h.outputs["second"]) == 2
        assert h.cache_stats.external_hits == 144 and states["states"] > 0
        assert_clean(h)


def test_wrong_state_byte_is_caught() -> None:
    """Negative control: one byte of the stored state (in G2) flipped before the prompt is asked again. The load
    brings it into the state block at the hit point, and the harness's check of the state the first step reads
    fails on it."""
    prompt = H.MultiTurnChatWorkload(num_users=1, system_prompt_tokens=150, seed=11).system_prompt
    with state_harness() as h:
        plans = record_plans(h)
        h.add_request("first", prompt, 3)
        h.run_until_idle()
        assert h.scheduler.reset_prefix_cache()
        stores = state_moves(plans, "stores")
        assert [m.dst_tier for m in stores] == ["G2"] and len(stores[0].dst_ids) == 1
        host = worker_of(h).store.cache("G2")
        raw = host.tensors[0].reshape(-1)
        raw[stores[0].dst_ids[0] * host.geometry.block_bytes + 100] ^= 0x40
        h.add_request("second", prompt + [7, 8], 2)
        with pytest.raises(H.KVMismatchError, match="Mamba layer 1: the state after 144 tokens in block"):
            h.run_until_idle()


# --------------------------------------------------------------------------------------------------
# The engine-independent leader; what is refused
# --------------------------------------------------------------------------------------------------

def test_leader_state_group_hits_where_a_state_is_stored() -> None:
    """A full group and a state group, blocks of 4 tokens: the state group stores its real blocks (not the null
    placeholders between chunk ends, nor those below ``keep_from``); a hit ends where the full group's run holds
    and a state is stored, and loads the full blocks after the engine's hit and the one state block at its end."""
    tokens = list(range(10, 46))  # 9 blocks
    # chunks ended at 8 and 24 tokens, decode reached 32: states in columns 1, 5 and 7
    leader, state, plan, stored = leader_with_stores(KVGroup(1, STATE, 4, "s"), tokens,
                                                     [0, 31, 0, 0, 0, 35, 0, 37], keep_from=2)
    assert stored == {"G1": list(range(20, 28)), "G1.1": [35, 37]}  # 31 is below keep_from
    assert leader.stores_below(state, 1, 6) and not leader.stores_below(state, 1, 5)
    leader.apply(WorkerReport({m.move_id: MoveResult(m.move_id) for job in plan.stores for m in job.moves}))
    leader.forget("a")
    # 32 tokens asked: one must be computed, so at most 28; no state after 28 (column 6) is stored, one after 24 is.
    b = leader.track("b", salt=0)
    assert leader.match(b, tokens[:32], 0) == 24
    loads = leader.plan_matched_group_loads(b, [list(range(40, 48)), [0] * 5 + [55, 56]], 6, null_block=0)
    assert [(m.dst_tier, list(m.dst_ids)) for load in loads for m in load.moves] == [
        ("G1", list(range(40, 46))), ("G1.1", [55])]
    # 36 tokens: the full run and the state after 32 tokens: 32; after an engine hit of 8 tokens, 24 more, of which
    # the full group loads blocks 2..7 and the state group column 7 only.
    c = leader.track("c", salt=0)
    assert leader.match(c, tokens, 8) == 24
    loads = leader.plan_matched_group_loads(c, [list(range(40, 48)), [0] * 7 + [57]], 6, null_block=0)
    assert [(m.dst_tier, list(m.dst_ids)) for load in loads for m in load.moves] == [
        ("G1", list(range(42, 48))), ("G1.1", [57])]
    group = KVGroup(1, STATE, 16, "s")
    assert [group.first_kept_block(n) for n in (0, 1, 16, 17, 144)] == [0, 0, 0, 1, 8]


def test_state_groups_vllm_keeps_otherwise_are_refused() -> None:
    """A state group is offloaded only where its block table's places name the boundaries of its states: with
    speculative blocks (relocated within the table) or hits inside a state block (sub-block hits) it is refused
    with the reason, as is a model of state groups only, and a state kept without prefix caching; the align config
    is accepted, with or without prefill checkpoint blocks, its state group keyed by its state's shapes and
    dtypes."""
    with state_harness() as h:
        config = h.plan.scheduler_config
        full, mamba = config.kv_cache_groups
        groups, refusal = kv_groups(config)
        assert refusal is None and [g.kind for g in groups] == [FULL, STATE]
        assert "shapes=((1024,),)" in groups[1].spec_key and "torch.int8" in groups[1].spec_key

        def with_state(**changes: Any) -> Any:
            spec = dataclasses.replace(mamba.kv_cache_spec, **changes)
            return dataclasses.replace(config, kv_cache_groups=[full, dataclasses.replace(mamba, kv_cache_spec=spec)])

        assert kv_groups(with_state(num_prefill_checkpoint_blocks=1, prefill_checkpoint_alignment=1))[1] is None
        cases = [(with_state(num_speculative_blocks=1), "speculative decoding (1 speculative state blocks)"),
                 (dataclasses.replace(config, cache_hit_alignment_tokens=8), "hits land every 8 tokens"),
                 (with_state(mamba_cache_mode="none"), "one running state"),
                 (dataclasses.replace(config, kv_cache_groups=[mamba]), "every KV cache group holds recurrent")]
        for other, reason in cases:
            _, why = kv_groups(other)
            assert why is not None and reason in why, why

