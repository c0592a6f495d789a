"""DynamoConnector with hybrid models whose KV cache groups have unlike blocks, on vLLM 0.33's real scheduler.

The layers' KV heads differ (``TinyModelSpec.layer_kv_heads``), so vLLM's own planner gives the groups different
blocks: in a layer-outer layout (LBNHC) it scales the smaller page's block size up (groups of 16 and 32 tokens
per block, one page size; a hit is then a multiple of 32 tokens, vLLM's scheduler block size, while the request's
block hashes are computed every 16), or pads a page that does not divide the other (one block size, pages of
unlike KV bytes); in a block-outermost layout (BLNHC) it packs the groups' pages into one block (one block size,
unlike page bytes, groups of unlike layer counts). kvbm keys each group's blocks at its own size, holds every
group's block in one slot of raw tiers as wide as the largest block, and loads each group through its own view.
The harness checks every byte attention reads (the whole context of full layers, the window of sliding layers)
with freshly allocated blocks poisoned.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import vllm_harness as H  # first: imports vLLM for the CPU platform, clear of the repo's kernels/ folder
import vllm_ranks as R
from test_vllm_connector import CONNECTOR, assert_clean, chat, kvbm_harness, metric, run_counting, worker_of
from test_vllm_hybrid import chat_on_two_ranks, store_then_ask_again

from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, UniformTypeKVCacheSpecs

from kvbm.config import KvbmConfig
from kvbm.connectors.groups import FULL, WINDOW, KVGroup
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import RequestLoad, RequestStore, WorkerReport
from kvbm.connectors.pd import RemotePrefill
from kvbm.connectors.worker import ConnectorWorker
from kvbm.kernels.medium import Medium
from kvbm.layouts import KVGeometry, allocate
from kvbm.leader import MoveResult
from kvbm.leader.plans import Move, MoveKind, RemoteSource
from kvbm.tiers import TierSpec, kvbm_tiers
from kvbm.vllm_integration.connector import DynamoConnector
from kvbm.worker.tier_memory import slot_geometry, tier_view

WINDOW_TOKENS = 40
KINDS = ("full", "sliding", "full", "sliding")


def model(heads: tuple[int, ...]) -> H.TinyModelSpec:
    """Full / sliding-window layers with the given KV heads per layer."""
    return H.TinyModelSpec(num_layers=4, num_kv_heads=max(heads), num_attention_heads=2 * max(heads),
                           layer_kinds=KINDS, sliding_window=WINDOW_TOKENS, layer_kv_heads=heads)


#: name -> (model, harness overrides, per group (block size, page bytes, layers), the hit unit in tokens)
CONFIGS: dict[str, tuple[H.TinyModelSpec, dict[str, Any], list[tuple[int, int, int]], int]] = {
    # LBNHC: the window layers' pages are half the full layers', so vLLM doubles their block size.
    "window-blocks-32": (model((4, 2, 4, 2)), {}, [(16, 4096, 2), (32, 4096, 2)], 32),
    # LBNHC: the full layers' pages are the smaller ones: the full group has the larger blocks.
    "full-blocks-32": (model((2, 4, 2, 4)), {}, [(32, 4096, 2), (16, 4096, 2)], 32),
    # BLNHC: one block size, the groups' pages packed side by side in each block (4096 and 2048 bytes).
    "page-bytes": (model((4, 2, 4, 2)), {"kv_layout": "BLNHC"}, [(16, 4096, 2), (16, 2048, 2)], 16),
    # LBNHC: 2 heads' pages do not divide 3 heads': vLLM pads them to 3072 bytes (2048 of KV).
    "padded-pages": (model((3, 2, 3, 2)), {}, [(16, 3072, 2), (16, 3072, 2)], 16),
    # BLNHC: the window layers' larger pages make vLLM split them into groups of one layer each.
    "layer-counts": (model((2, 4, 2, 4)), {"kv_layout": "BLNHC", "max_model_len": 240},
                     [(16, 2048, 2), (16, 4096, 1), (16, 4096, 1)], 16),
}


def unlike_harness(name: str, tmp_path: Path | None = None, **overrides: Any) -> H.VllmHarness:
    """The harness of configuration ``name``: 48 GPU blocks, G2 (and G3 when ``disk`` is given)."""
    spec, extra, _, _ = CONFIGS[name]
    kw = {"num_gpu_blocks": 48, "max_model_len": 320, **extra, **overrides}
    return kvbm_harness(tmp_path, model=spec, **kw)


def check_plan(h: H.VllmHarness, name: str) -> None:
    """vLLM planned the groups the configuration names; kvbm's tiers are raw slots as wide as the largest block,
    seen by every group through its own view."""
    _, _, groups, unit = CONFIGS[name]
    planned = [(g.kv_cache_spec.block_size, g.kv_cache_spec.page_size_bytes, len(g.layer_names))
               for g in h.plan.scheduler_config.kv_cache_groups]
    assert planned == groups
    assert h.plan.scheduler_block_size == unit and h.scheduler.connector.scheduler_side.leader.unit == unit
    store = worker_of(h).store
    engine = [store.cache("G1" if k == 0 else f"G1.{k}") for k in range(len(groups))]
    slot = max(c.geometry.block_bytes for c in engine)
    for tier in [t for t in ("G2", "G3") if t in store.caches]:
        assert store.cache(tier).geometry == slot_geometry(slot) and store.cache(tier).dtype == torch.uint8
        for k, cache in enumerate(engine):
            view = store.end(tier, "G1" if k == 0 else f"G1.{k}")
            assert view.geometry == cache.geometry and view.num_blocks == store.cache(tier).num_blocks


def record_hits(h: H.VllmHarness) -> list[tuple[int, int]]:
    """Every ``(engine hit, tokens the connector answered)`` vLLM's scheduler asks for from now on."""
    hits: list[tuple[int, int]] = []
    side = h.scheduler.connector.scheduler_side
    ask = side.get_num_new_matched_tokens

    def recording(request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        n, is_async = ask(request, num_computed_tokens)
        hits.append((num_computed_tokens, n))
        return n, is_async

    side.get_num_new_matched_tokens = recording
    return hits


def record_failed_loads(h: H.VllmHarness) -> list[str]:
    """The requests whose load failed (``failed_recving``), from now on."""
    failed: list[str] = []
    results = h.worker.connector.get_transfer_results

    def recording(finished: Any) -> Any:
        out = results(finished)
        failed.extend(out.failed_recving or ())
        return out

    h.worker.connector.get_transfer_results = recording
    return failed


def group_loads(h: H.VllmHarness) -> Counter:
    """Blocks loaded per engine tier (one per KV cache group), from now on."""
    per_tier: Counter = Counter()
    execute = h.worker.execute

    def counting(so: Any, new_blocks: Any) -> Any:
        per_tier.update(Counter({m.dst_tier: m.num_blocks for job in so.kv_connector_metadata.plan.loads
                                 for m in job.moves}))
        return execute(so, new_blocks)

    h.worker.execute = counting
    return per_tier


# --------------------------------------------------------------------------------------------------
# Multi-turn chats through the real scheduler
# --------------------------------------------------------------------------------------------------

TIERS: dict[str, dict[str, Any]] = {
    "host": {},
    "host+disk": dict(host=24, disk=512, extra={"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}),
    "disk": dict(host=None, disk=512),
}
CHATS = [pytest.param(name, runner, tiers, id=f"{name}-{runner}-{tiers}")
         for name in ("window-blocks-32", "page-bytes") for runner in ("v1", "v2") for tiers in ("host", "host+disk")]
CHATS += [pytest.param("full-blocks-32", "v1", "host+disk", id="full-blocks-32-v1-host+disk"),
          pytest.param("padded-pages", "v2", "host+disk", id="padded-pages-v2-host+disk"),
          pytest.param("layer-counts", "v1", "host+disk", id="layer-counts-v1-host+disk"),
          pytest.param("page-bytes", "v1", "disk", id="page-bytes-v1-disk")]


@pytest.mark.parametrize("name, runner, tiers", CHATS)
def test_unlike_groups_chat_onboards_byte_exact(tmp_path: Path, name: str, runner: str, tiers: str) -> None:
    """Multi-turn chats: later turns load every group's blocks from G2 (with a small G2 also from G3, after the
    raw slots cascaded there; or from G3 alone), each through its own view; every hit ends on a multiple of every
    group's block size, every attended byte is checked, no load fails and nothing leaks."""
    disk = tiers != "host"
    unit = CONFIGS[name][3]
    with unlike_harness(name, tmp_path, runner=runner, **TIERS[tiers]) as h:
        check_plan(h, name)
        hits, failed, per_tier = record_hits(h), record_failed_loads(h), group_loads(h)
        counts = run_counting(h, chat(num_rounds=3 if name == "layer-counts" else 4))
        assert counts["load_jobs"] > 0 and counts["verified"] > 0 and not failed
        assert h.cache_stats.external_hits > 0 and all((local + n) % unit == 0 for local, n in hits if n)
        assert all(per_tier[f"G1.{k}" if k else "G1"] > 0 for k in range(len(CONFIGS[name][2])))
        assert (metric(h, "kvbm_transfer_bytes", "g3_to_g1") > 0) == disk
        assert_clean(h)


@pytest.mark.parametrize("name", ["window-blocks-32", "page-bytes"])
def test_unlike_groups_with_tensor_parallelism(tmp_path: Path, name: str) -> None:
    """Two tensor-parallel ranks (``vllm_ranks``), each with its half of every layer's KV heads: each rank's tiers
    are raw slots of its own largest block, later turns load every group on both ranks from G2 and G3, every
    attended byte of each rank checked."""
    spec, extra, _, unit = CONFIGS[name]
    config = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": 24, "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": 512,
              "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true",
              "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true", "DYN_KVBM_DISABLE_COST_AWARE_HITS": "true"}
    harness = H.HarnessConfig(connector=CONNECTOR, connector_extra_config=config, model=spec, num_gpu_blocks=48,
                              max_model_len=320, kv_layout=extra.get("kv_layout"))
    with R.RankedVllmHarness(harness, 2, 1) as h:
        assert h.leader.hybrid and h.leader.num_workers == 2 and h.leader.unit == unit
        halves = [(size, page // 2) for size, page, _ in CONFIGS[name][2]]  # each rank holds half the heads
        assert [(g.kv_cache_spec.block_size, g.kv_cache_spec.page_size_bytes)
                for g in h.plan.scheduler_config.kv_cache_groups] == halves
        chat_on_two_ranks(h)


# --------------------------------------------------------------------------------------------------
# Exactly which blocks one hit loads; the negative control
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_hit_is_whole_units_and_window_loads_its_blocks(runner: str) -> None:
    """Groups of 16 (full) and 32 (window) tokens per block: the second request's 152 tokens hit 128 (4 units of
    32; the full group holds 144 but the window group's block of tokens 128..159 was never full), the full group
    loads 8 blocks, the window group its 2 blocks holding the 39 tokens before position 128."""
    with unlike_harness("window-blocks-32", runner=runner) as h:
        loads, verified = store_then_ask_again(h)
        hit = 128
        assert h.cache_stats.external_hits == hit
        assert sum(m.num_blocks for m in loads if m.dst_tier == "G1") == hit // 16
        first_kept = (hit - (WINDOW_TOKENS - 1)) // 32  # block 2: tokens 64.. are read by position 128
        assert sum(m.num_blocks for m in loads if m.dst_tier == "G1.1") == hit // 32 - first_kept == 2
        assert verified == 2 * hit + 2 * (WINDOW_TOKENS - 1)
        assert_clean(h)


def test_page_bytes_hit_loads_each_group_at_its_page_size() -> None:
    """One block size, pages of 4096 and 2048 bytes packed into one 8192-byte block: the hit is 144 tokens, the
    full group loads 9 blocks, the window group 3, each of its own bytes."""
    with unlike_harness("page-bytes") as h:
        loads, verified = store_then_ask_again(h)
        hit = 144
        assert h.cache_stats.external_hits == hit
        assert sum(m.num_blocks for m in loads if m.dst_tier == "G1") == 9
        assert sum(m.num_blocks for m in loads if m.dst_tier == "G1.1") == 9 - (hit - (WINDOW_TOKENS - 1)) // 16 == 3
        assert verified == 2 * hit + 2 * (WINDOW_TOKENS - 1)
        assert_clean(h)


def test_hit_at_the_hash_block_size_is_caught() -> None:
    """Negative control: the same scenario with hits aligned to vLLM's hash block size (16) instead of every group's
    block size. The answer is 144 tokens, and the window group's block holding tokens 128..143 is one the window
    group never stored (it was never full): it stays poisoned, and the check of the window layers' context fails."""
    with unlike_harness("window-blocks-32") as h:
        assert h.plan.hash_block_size == 16
        h.scheduler.connector.scheduler_side.leader.unit = h.plan.hash_block_size
        with pytest.raises(H.KVMismatchError, match="layer [13]: .*wrong KV; first at position 128"):
            store_then_ask_again(h)


# --------------------------------------------------------------------------------------------------
# The engine-independent leader, and a worker's raw slots
# --------------------------------------------------------------------------------------------------

def test_leader_hits_in_units_of_every_group_block() -> None:
    """Blocks of 4 tokens (full) and 8 (window of 6): each group's blocks are keyed at its own size, a hit is a
    multiple of 8 tokens, and each group loads its own blocks of it."""
    config = KvbmConfig(cpu_cache_override_num_blocks=64, max_transfer_batch_size=8)
    leader = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4)
    leader.use_groups((KVGroup(0, FULL, 4, "f"), KVGroup(1, WINDOW, 8, "w", window=5)))
    assert leader.unit == 8
    tokens = list(range(10, 42))  # 32 tokens: 8 full blocks, 4 window blocks
    state = leader.track("a", salt=0)
    state.block_ids, state.groups[0].block_ids = list(range(20, 28)), [40, 41, 42, 43]
    leader.plan_stores(state, tokens, 8)
    leader.plan_stores(state, tokens, 4, group=1, null_block=0)
    plan = leader.take_step()
    leader.apply(WorkerReport({m.move_id: MoveResult(m.move_id) for job in plan.stores for m in job.moves}))
    assert len(state.hashes) == 8 and len(state.groups[0].hashes) == 4
    assert set(state.hashes).isdisjoint(state.groups[0].hashes)
    leader.forget("a")
    # 32 tokens asked again: one token must be computed, so at most 3 units (24 tokens); the window group needs its
    # block 2 at position 24 ((24 - 5) // 8), held.
    b = leader.track("b", salt=0)
    assert leader.match(b, tokens, 0) == 24
    loads = leader.plan_matched_group_loads(b, [list(range(50, 58)), [0, 0, 62, 63]], 3, null_block=0)
    assert [(m.dst_tier, list(m.dst_ids)) for load in loads for m in load.moves] == [
        ("G1", list(range(50, 56))), ("G1.1", [62])]
    # 21 tokens: 2 whole units (16 tokens), though the full group holds 5 blocks (20 tokens) of them.
    c = leader.track("c", salt=0)
    assert leader.match(c, tokens[:21], 0) == 16
    # An engine hit that is not a whole unit is never extended (vLLM's are multiples of its scheduler block size).
    d = leader.track("d", salt=0)
    assert leader.match(d, tokens, 4) == 0


def test_hybrid_leader_takes_no_part_in_disaggregated_prefill(caplog: pytest.LogCaptureFixture) -> None:
    """A hybrid model's prompts are computed on each instance: a prefill another instance offers is not matched
    (logged; vLLM then asks for the local hit), and no finished prompt is pinned for another instance."""
    config = KvbmConfig(cpu_cache_override_num_blocks=64)
    leader = ConnectorLeader(kvbm_tiers(config, 4096), config, block_size=4)
    leader.use_groups((KVGroup(0, FULL, 4, "f"), KVGroup(1, WINDOW, 8, "w", window=5)))
    leader.endpoints = (b"rank0",)
    tokens = list(range(10, 42))
    state = leader.track("a", salt=0)
    offered = RemotePrefill(RemoteSource("other", "a", (b"rank0",)), 4, tuple(range(8)), tuple(range(8)))
    with caplog.at_level(logging.WARNING, logger="kvbm.connectors.leader"):
        assert leader.match_remote(state, tokens, 0, offered) == 0
    assert "not implemented for a hybrid model (2 KV cache groups)" in caplog.text and state.remote is None
    assert leader.keep_for_remote(state, tokens) is None and not len(leader.pins)


def random_cache(preset: str, geometry: KVGeometry, blocks: int, dtype: torch.dtype, seed: int) -> Any:
    """An engine cache of random values (never zero)."""
    cache = allocate(preset, geometry, blocks, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    for layer in range(geometry.num_layers):
        for kv in range(geometry.num_kv):
            view = cache.piece_view(layer, kv)
            view.copy_(torch.rand(view.shape, generator=g) * 2 + 0.5)
    return cache


def block_bytes(cache: Any, block: int) -> torch.Tensor:
    """Every byte of one block of ``cache``, piece by piece."""
    g = cache.geometry
    return torch.stack([cache.piece_view(layer, kv, torch.int16)[block] for layer in range(g.num_layers)
                        for kv in range(g.num_kv)])


def test_worker_moves_unlike_groups_through_raw_slots_byte_exact(tmp_path: Path) -> None:
    """Two engine caches of unlike geometry and dtype (16 tokens x 4 heads x 2 layers in bf16; 32 tokens x 2 heads
    x 1 layer in fp16): the tiers are raw slots of the larger block; stores through each group's view, a cascade
    of whole slots to disk, a slot of G2 reused by the other group, loads from G2 and G3 into poisoned blocks: every
    byte where it belongs."""
    big = random_cache("vllm_lbnhc", KVGeometry(2, 2, 16, 4, 16, 2), 12, torch.bfloat16, seed=1)
    small = random_cache("vllm_blnhc", KVGeometry(1, 2, 32, 2, 16, 2), 12, torch.float16, seed=2)
    tiers = [TierSpec("G2", Medium.HOST, 8), TierSpec("G3", Medium.DISK, 8, tmp_path, use_o_direct=False)]
    worker = ConnectorWorker(big, tiers, KvbmConfig(), groups={"G1.1": small})
    try:
        assert worker.tier_geometry == slot_geometry(big.geometry.block_bytes) and worker.tier_dtype == torch.uint8
        with pytest.raises(ValueError, match="do not fit"):
            tier_view(worker.store.cache("G2"), KVGeometry(2, 2, 32, 4, 16, 2), torch.bfloat16)
        kept = {("big", b): block_bytes(big, b).clone() for b in (1, 2, 5)}
        kept.update({("small", b): block_bytes(small, b).clone() for b in (3, 4)})

        def run(*moves: Move) -> dict[int, MoveResult]:
            for m in moves:
                if m.kind is MoveKind.LOAD:
                    worker.start_loads([RequestLoad("r", (m,))])
                elif m.kind is MoveKind.STORE:
                    worker.start_stores([RequestStore("r", (m,))])
                else:
                    worker.start_cascades([m])
            worker.store.wait_all()
            worker.poll()
            report = worker.take_report()
            assert report is not None and sorted(report.results) == sorted(m.move_id for m in moves)
            return report.results

        ok = run(Move(1, MoveKind.STORE, "G1", "G2", (1, 2), (0, 1), (101, 102)),
                 Move(2, MoveKind.STORE, "G1.1", "G2", (3, 4), (2, 3), (201, 202)))
        ok |= run(Move(3, MoveKind.CASCADE, "G2", "G3", (0, 1, 2, 3), (5, 4, 7, 6), (101, 102, 201, 202)))
        ok |= run(Move(4, MoveKind.STORE, "G1", "G2", (5,), (2,), (103,)))  # slot 2: now the other group's block
        for cache, blocks in ((big, (7, 8, 9)), (small, (10, 11))):
            for b in blocks:
                for layer in range(cache.geometry.num_layers):
                    for kv in range(2):
                        cache.piece_view(layer, kv)[b] = float("nan")
        ok |= run(Move(5, MoveKind.LOAD, "G3", "G1", (4, 5), (9, 8), (102, 101)),
                  Move(6, MoveKind.LOAD, "G3", "G1.1", (6, 7), (10, 11), (202, 201)),
                  Move(7, MoveKind.LOAD, "G2", "G1", (2,), (7,), (103,)))
        assert not any(r.failed for r in ok.values())
        for (name, src), dst in {("big", 1): 8, ("big", 2): 9, ("big", 5): 7, ("small", 3): 11,
                                 ("small", 4): 10}.items():
            assert torch.equal(block_bytes(big if name == "big" else small, dst), kept[(name, src)])
        # A byte flipped inside the small group's block on disk fails its load through the view (the checksum
        # covers the whole raw block), and nothing is written into the engine block.
        disk = worker.store.cache("G3")
        with open(disk.file.path, "r+b") as f:
            f.seek(6 * disk.slot_bytes + 100)
            byte = f.read(1)
            f.seek(6 * disk.slot_bytes + 100)
            f.write(bytes([byte[0] ^ 0x40]))
        small.piece_view(0, 0)[10] = float("nan")
        bad = run(Move(8, MoveKind.LOAD, "G3", "G1.1", (6,), (10,), (202,)))[8]
        assert list(bad.failed) == [0] and "checksum mismatch" in bad.failed[0] and bad.lost == {0}
        assert torch.isnan(small.piece_view(0, 0)[10]).all()
    finally:
        worker.close()


# --------------------------------------------------------------------------------------------------
# What is still refused
# --------------------------------------------------------------------------------------------------

def test_group_of_unlike_layer_specs_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """A group whose layers have unlike specs (vLLM's ``UniformTypeKVCacheSpecs`` of two page sizes: no one block
    geometry describes its blocks) is refused with the reason logged: nothing matched, stored or allocated."""
    with unlike_harness("page-bytes") as h:
        config = h.plan.scheduler_config
        groups = config.kv_cache_groups
        names = groups[0].layer_names
        specs = {names[0]: FullAttentionSpec(block_size=16, num_kv_heads=4, head_size=16, dtype=torch.bfloat16),
                 names[1]: FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.bfloat16)}
        mixed = config.__class__(**{**config.__dict__, "kv_cache_groups": [
            KVCacheGroupSpec(names, UniformTypeKVCacheSpecs(block_size=16, kv_cache_specs=specs)), groups[1]]})
        with caplog.at_level(logging.WARNING, logger="kvbm.vllm_integration.connector"):
            connector = DynamoConnector(h.vllm_config, H.KVConnectorRole.SCHEDULER, mixed)
        assert "KV cache group 0 (2 layers from model.layers.0.self_attn.attn) mixes layers of unlike specs" in \
            caplog.text
        assert connector.groups == () and connector.scheduler_side.refusal is not None
        request = h.make_request("a", list(range(10, 90)), 4)
        assert connector.get_num_new_matched_tokens(request, 0) == (0, False)
        connector.shutdown()


def test_unlike_groups_keep_their_geometry_in_hashes() -> None:
    """The groups' keys name their spec (block size and page bytes enter the salt): groups of 16 and 32 tokens, or
    of 4096- and 2048-byte pages, never share a key even where their first blocks cover the same tokens."""
    with unlike_harness("window-blocks-32") as h:
        groups = h.scheduler.connector.scheduler_side.leader.groups
        assert [(g.kind, g.block_size) for g in groups] == [(FULL, 16), (WINDOW, 32)]
        assert "tokens=32" in groups[1].spec_key and "tokens=16" in groups[0].spec_key
        assert len({g.salt(7, True) for g in groups}) == 2
