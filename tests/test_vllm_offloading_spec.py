"""kvbm's `KvbmOffloadingSpec` inside vLLM 0.33's real `OffloadingConnector`, on vLLM's real scheduler (CPU).

The harness (`vllm_harness`) steps vLLM's Scheduler and emulates a worker in both model runners' call orders; every
KV byte a request attends to is checked against its deterministic oracle, and newly allocated blocks are NaN until
written, so a block served wrong or never loaded is caught. Needs vLLM 0.33 light (``tests/install_vllm_light.sh``).
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import vllm_harness as H  # first: imports vLLM for the CPU platform, clear of the repo's kernels/ folder

from kvbm.kernels.block_transfer import BlockTransfer
from kvbm.leader.plans import ENGINE_TIER
from kvbm.vllm_offloading.connector import KvbmOffloadingConnector
from kvbm.vllm_offloading.manager import KvbmOffloadingManager
from kvbm.vllm_offloading.spec import KvbmOffloadingSpec
from kvbm.vllm_offloading.worker import KvbmOffloadingWorker, TransferFailedError

PLAIN = "OffloadingConnector"
KVBM = f"{KvbmOffloadingConnector.__module__}:{KvbmOffloadingConnector.__name__}"
GPU_BLOCKS = 40


def extra(host_blocks: int = 256, **more: Any) -> dict[str, Any]:
    """Connector extra config selecting kvbm's spec, with kvbm's options as DYN_KVBM_* entries."""
    return {"spec_name": KvbmOffloadingSpec.__name__, "spec_module_path": "kvbm.vllm_offloading.spec",
            "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": host_blocks, **more}


def harness(runner: str, connector: str = PLAIN, **extra_overrides: Any) -> H.VllmHarness:
    return H.VllmHarness(H.HarnessConfig(connector=connector, connector_extra_config=extra(**extra_overrides),
                                         runner=runner, num_gpu_blocks=GPU_BLOCKS))


def chat() -> H.MultiTurnChatWorkload:
    """8 users x 4 rounds, all active: their histories do not fit in the GPU blocks, later turns onboard."""
    return H.MultiTurnChatWorkload(num_users=8, num_rounds=4, system_prompt_tokens=64, seed=3)


def run(h: H.VllmHarness, workload: H.MultiTurnChatWorkload) -> Counter:
    counts: Counter = Counter()
    execute = h.worker.execute

    def counting(so, new_blocks):
        counts["load_jobs"] += len(so.kv_connector_metadata.load_jobs)
        counts["store_jobs"] += len(so.kv_connector_metadata.store_jobs)
        out = execute(so, new_blocks)
        counts["verified"] += h.worker.last_report.verified_tokens
        return out

    h.worker.execute = counting
    counts["steps"] = h.run_workload(workload)
    return counts


def parts(h: H.VllmHarness) -> tuple[KvbmOffloadingManager, KvbmOffloadingWorker]:
    manager = h.scheduler.connector.connector_scheduler.manager
    worker = h.worker.connector.connector_worker.worker
    assert isinstance(manager, KvbmOffloadingManager) and isinstance(worker, KvbmOffloadingWorker)
    return manager, worker


def check_done(h: H.VllmHarness, workload: H.MultiTurnChatWorkload) -> None:
    """Every turn answered in full; no GPU block, request, job, hold or pending slot left behind (blocks admitted
    to G3 after the last job stay held in G2 until a job carries their cascade)."""
    assert workload.done and all(len(h.outputs[t.request_id]) == t.max_tokens for t in workload.completed)
    assert h.free_block_count() == GPU_BLOCKS - 1 and not h.scheduler.requests
    manager, worker = parts(h)
    assert manager.open_jobs() == 0 and not manager.index.open_moves()
    manager.check_invariants()  # every hold is an open move's (none left) or a block admitted to the next tier
    if len(manager.index.tier_names) == 1:
        pool = manager.index.pool("G2")
        assert all(pool.holds(s) == 0 for s in range(pool.num_blocks))
    assert not worker.store.busy


@pytest.mark.parametrize("connector", [PLAIN, KVBM])
@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_multi_turn_loads_from_kvbm(runner: str, connector: str) -> None:
    """Later turns onboard from kvbm's G2 tier with the original bytes, in both runners' call orders."""
    workload = chat()
    with harness(runner, connector) as h:
        counts = run(h, workload)
        manager, worker = parts(h)
        assert counts["load_jobs"] > 0 and counts["store_jobs"] > 0 and counts["verified"] > 0
        assert h.cache_stats.external_hits > 0
        assert manager.index.tier_names == ["G2"]
        assert worker.engine_cache.geometry.num_layers == H.TinyModelSpec().num_layers
        check_done(h, workload)


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_disk_tier_and_eviction(runner: str, tmp_path: Path) -> None:
    """A G2 too small for the workload: blocks cascade to G3 and are loaded back from disk, byte-exact."""
    workload = chat()
    with harness(runner, KVBM, host_blocks=24, DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=512,
                 DYN_KVBM_DISK_CACHE_DIR=str(tmp_path), DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="1",
                 DYN_KVBM_DISK_DISABLE_O_DIRECT="1", DYN_KVBM_DISK_IO="posix") as h:
        manager, worker = parts(h)
        submitted: Counter = Counter()
        submit = worker.store.transfers.submit

        def counting_submit(src, dst, src_ids, dst_ids, **kwargs):
            names = {id(c): n for n, c in worker.store.caches.items()}
            submitted[(names[id(src)], names[id(dst)])] += len(src_ids)
            return submit(src, dst, src_ids, dst_ids, **kwargs)

        worker.store.transfers.submit = counting_submit
        counts = run(h, workload)
        assert manager.index.tier_names == ["G2", "G3"]
        assert submitted[("G2", "G3")] > 0 and submitted[("G3", ENGINE_TIER)] > 0, submitted
        assert counts["verified"] > 0
        check_done(h, workload)


def failing(worker: KvbmOffloadingWorker, src_tier: str, dst_tier: str, budget: int) -> list[int]:
    """Make the next ``budget`` transfers from ``src_tier`` to ``dst_tier`` fail every block (nothing copied)."""
    left = [budget]
    submit = worker.store.transfers.submit
    names = lambda cache: next(n for n, c in worker.store.caches.items() if c is cache)  # noqa: E731

    def flaky(src, dst, src_ids, dst_ids):
        if left[0] and names(src) == src_tier and names(dst) == dst_tier:
            left[0] -= 1
            return BlockTransfer.failed(len(src_ids), "injected", "injected failure")
        return submit(src, dst, src_ids, dst_ids)

    worker.store.transfers.submit = flaky
    return left


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_failed_loads_are_recomputed(runner: str) -> None:
    """Loads that fail leave NaN in their GPU blocks; the connector reports them and vLLM recomputes them."""
    workload = chat()
    with harness(runner, KVBM) as h:
        reported: set[int] = set()
        connector = h.worker.connector
        take = connector.get_block_ids_with_load_errors

        def recording() -> set[int]:
            errors = take()
            reported.update(errors)
            return errors

        connector.get_block_ids_with_load_errors = recording
        left = failing(parts(h)[1], "G2", ENGINE_TIER, 3)
        counts = run(h, workload)
        assert left == [0] and reported and counts["load_jobs"] > 3
        check_done(h, workload)


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_failed_stores_are_discarded(runner: str) -> None:
    """Stores that fail copy nothing: the manager discards their slots, so no later turn loads them."""
    workload = chat()
    with harness(runner, KVBM) as h:
        manager, worker = parts(h)
        discarded: list[int] = []
        note = manager.note_failures

        def recording(results):
            results = list(results)
            discarded.extend(len(r.failed) for r in results)
            note(results)

        manager.note_failures = recording
        left = failing(worker, ENGINE_TIER, "G2", 4)
        counts = run(h, workload)
        assert left == [0] and sum(discarded) > 0 and counts["load_jobs"] > 0
        check_done(h, workload)


def test_failed_load_without_failure_channel_raises() -> None:
    """vLLM 0.33's own OffloadingConnector cannot be told of a failed load: kvbm's worker refuses to go on."""
    with harness("v1", PLAIN) as h:
        failing(parts(h)[1], "G2", ENGINE_TIER, 1)
        with pytest.raises(TransferFailedError, match="KvbmOffloadingConnector"):
            run(h, chat())


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_offloaded_block_of_two_gpu_blocks(runner: str) -> None:
    """blocks_per_chunk=2: one vLLM key is two kvbm slots; loads may start mid-key."""
    workload = chat()
    with harness(runner, KVBM, blocks_per_chunk=2) as h:
        manager, _ = parts(h)
        assert manager.blocks_per_chunk == 2
        counts = run(h, workload)
        assert counts["load_jobs"] > 0 and counts["verified"] > 0
        check_done(h, workload)


def test_a_job_moves_as_one_transfer_per_pair_of_tiers() -> None:
    """A store job of more blocks than ``DYN_KVBM_MAX_TRANSFER_BATCH_SIZE`` is one move (vLLM's job is the batch),
    and so is its load."""
    from vllm.v1.kv_offload.base import ReqContext

    from kvbm.config import KvbmConfig
    from kvbm.kernels.medium import Medium
    from kvbm.tiers import TierSpec

    config = KvbmConfig(max_transfer_batch_size=4, cpu_cache_override_num_blocks=64)
    manager = KvbmOffloadingManager([TierSpec("G2", Medium.HOST, 64)], config, 1)
    keys = [f"k{i}".encode().ljust(32, b"\0") for i in range(40)]
    ctx = ReqContext(req_id="r")
    out = manager.prepare_store(keys, ctx)
    assert out is not None and [m.num_blocks for m in out.store_spec.moves] == [40]
    manager.complete_store(keys, ctx)
    assert [m.num_blocks for m in manager.prepare_load(keys, ctx).moves] == [40]


def test_no_tier_configured_is_refused() -> None:
    """Without a G2 or G3 size the spec refuses to start, naming the settings."""
    with pytest.raises(ValueError, match="DYN_KVBM_CPU_CACHE_GB"):
        H.VllmHarness(H.HarnessConfig(connector=PLAIN, num_gpu_blocks=GPU_BLOCKS, connector_extra_config={
            "spec_name": KvbmOffloadingSpec.__name__, "spec_module_path": "kvbm.vllm_offloading.spec"}))


def test_bench_arguments_and_smoke_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The offloading bench parses its command line and, without a GPU, runs kvbm's path byte-checked on the CPU."""
    import importlib.util

    import torch

    # loaded from its file: the repo root is not on the test path
    path = Path(__file__).resolve().parent.parent / "bench" / "offloading_bench.py"
    spec = importlib.util.spec_from_file_location("offloading_bench_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)

    args = bench.parse_args([])
    assert args.blocks == [16, 256] and args.geometries == ["llama8b", "small"] and args.out is None
    assert args.vllm_ops == "auto" and bench.parse_args(["--vllm-ops", "stand-in"]).vllm_ops == "stand-in"
    assert bench.GEOMETRIES["llama8b"].piece_bytes == 32 << 10 and bench.GEOMETRIES["small"].piece_bytes == 4 << 10
    for bad in (["--blocks", "0"], ["--vllm-ops", "stub"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    if torch.cuda.is_available():
        pytest.skip("the smoke run is the no-GPU mode; on a GPU run the bench itself")
    result = bench.main(["--smoke", "--out", str(tmp_path)])
    assert result["smoke"] and result["notes"] and result["vllm_ops"] is None  # vLLM's path is not run
    assert {(r["path"], r["direction"]) for r in result["rows"]} == {("kvbm spec", "d2h"), ("kvbm spec", "h2d")}
    assert all(r["gbps"] and r["gbps"] > 0 and r["error"] is None for r in result["rows"])
    assert (tmp_path / "results.json").exists() and "kvbm spec" in (tmp_path / "results.md").read_text()
