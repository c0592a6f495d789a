"""The TTFT benchmark (bench/ttft): the model runner's paged attention against dense causal attention, its prefill
split at any point against one whole prefill, its CUDA-graph prefill against the eager one, the G1 pool and the
byte check, and the --smoke run end to end."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "bench" / "ttft"


@pytest.fixture(scope="module")
def ttft():
    """bench/ttft as a package loaded from its folder (the repo root is not on the test path)."""
    name = "ttft_under_test"
    spec = importlib.util.spec_from_file_location(name, PKG / "__init__.py", submodule_search_locations=[str(PKG)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    modules = {}
    for sub in ("model", "graphs", "modes", "report", "engine", "bench", "call_times", "shares"):
        sub_spec = importlib.util.spec_from_file_location(f"{name}.{sub}", PKG / f"{sub}.py")
        module = importlib.util.module_from_spec(sub_spec)
        sys.modules[f"{name}.{sub}"] = module
        sub_spec.loader.exec_module(module)
        modules[sub] = module
    yield modules
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _paged_against_dense(m, cached: int, new: int, heads: int, kv_heads: int, d: int, device: str,
                         dtype: torch.dtype, tol: float) -> None:
    """Paged attention after a prefill of ``cached`` tokens against dense causal attention over all tokens, and
    every token's K/V in its slot."""
    g = torch.Generator().manual_seed(cached * 1000 + new)
    total = cached + new
    q, k, v = (torch.randn(total, n, d, generator=g).to(device, dtype) for n in (heads, kv_heads, kv_heads))
    num_blocks = -(-total // m.BLOCK_SIZE) + 3
    cache = torch.full((2, num_blocks, m.BLOCK_SIZE, kv_heads, d), float("nan"), device=device, dtype=dtype)
    table = torch.randperm(num_blocks, generator=g).to(device)  # blocks in no particular order
    if cached:
        m.paged_attention(q[:cached], k[:cached], v[:cached], cache, table, 0)
    out = m.paged_attention(q[cached:], k[cached:], v[cached:], cache, table, cached)
    ref = m.dense_causal_attention(q.double(), k.double(), v.double())[cached:]
    assert out.shape == (new, heads, d)
    assert rel_err(out.double(), ref) < tol
    # every token's K and V sit, bit for bit, in slot (table[pos // 16], pos % 16)
    pos = torch.arange(total, device=device)
    assert torch.equal(cache[0, table[pos // m.BLOCK_SIZE], pos % m.BLOCK_SIZE], k)
    assert torch.equal(cache[1, table[pos // m.BLOCK_SIZE], pos % m.BLOCK_SIZE], v)


@pytest.mark.parametrize("cached,new,heads,kv_heads", [(0, 40, 4, 4), (37, 11, 4, 2), (64, 16, 8, 2), (5, 1, 4, 1),
                                                       (100, 60, 6, 3)])
def test_paged_attention_matches_dense_causal(ttft, cached, new, heads, kv_heads):
    _paged_against_dense(ttft["model"], cached, new, heads, kv_heads, 32, "cpu", torch.float32, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention runs on a GPU only (this machine has none)")
@pytest.mark.parametrize("cached,new,heads,kv_heads", [(0, 300, 16, 8), (1000, 77, 32, 8), (2048, 256, 32, 8)])
def test_paged_attention_runs_flash_with_grouped_kv_heads(ttft, cached, new, heads, kv_heads):
    """On the GPU grouped-query attention, causal and offset by a cached prefix, runs FlashAttention: with every
    other SDPA backend disabled a fallback that copies K/V per head or materializes the mask would raise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        _paged_against_dense(ttft["model"], cached, new, heads, kv_heads, 128, "cuda", torch.bfloat16, 2e-2)


@pytest.mark.parametrize("shape_name", ["tiny", "qwen3-0.6b"])
def test_prefill_split_at_any_point_matches_one_prefill(ttft, shape_name):
    m = ttft["model"]
    shape = m.SHAPES[shape_name]
    if shape_name != "tiny":  # the real head layout and q/k norm, few layers and a small width to stay quick
        shape = m.ModelShape(**{**shape.__dict__, "num_layers": 2, "hidden": 256, "intermediate": 512,
                                "vocab": 500})
    model = m.DecoderModel(shape, "cpu", torch.float32, seed=3)
    weights = [model.embed, model.lm_head, model.final_norm] + [t for layer in model.layers for t in layer.values()]
    assert all(float((t != 0).float().mean()) > 0.99 for t in weights)  # random, never zeros
    tokens = torch.randint(0, shape.vocab, (90,), generator=torch.Generator().manual_seed(1))
    table = torch.randperm(12)
    whole = model.prefill(tokens, m.allocate_kv_caches(shape, 12, torch.float32, "cpu"), table, 0)
    assert torch.isfinite(whole).all() and whole.std() > 0
    for split in (16, 33, 89):
        caches = m.allocate_kv_caches(shape, 12, torch.float32, "cpu")
        model.prefill(tokens[:split], caches, table, 0)
        assert rel_err(model.prefill(tokens[split:], caches, table, split), whole) < 1e-5


def test_padded_size_is_the_smallest_captured_size_that_holds_the_tokens(ttft):
    g = ttft["graphs"]
    assert [g.padded_size((64, 16, 256), n) for n in (1, 16, 17, 64, 65, 256)] == [16, 16, 64, 64, 256, 256]
    assert g.padded_size((64, 16, 256), 257) is None and g.padded_size((), 1) is None
    model = ttft["model"].DecoderModel(ttft["model"].SHAPES["tiny"], "cpu", torch.float32)
    with pytest.raises(ValueError, match="CUDA model"):
        g.GraphedPrefill(model)
    for sizes in ((), (0, 16)):
        with pytest.raises(ValueError, match="positive token counts"):
            g.GraphedPrefill(model, sizes=sizes, capture=False)


def _graphed_against_eager(ttft, shape_name: str, device: str, dtype: torch.dtype, capture: bool, tol: float) -> None:
    """Pieces of two sizes run for token counts that fill them or leave padding (one after another, so padded rows
    hold a previous prefill's values), and a count past the largest size (eager): the same logits as the eager
    prefill, the same K/V in the same slots, every other slot untouched, the layer hooks called in the same order."""
    m, g = ttft["model"], ttft["graphs"]
    shape = m.SHAPES[shape_name]
    if shape_name != "tiny":
        shape = m.ModelShape(**{**shape.__dict__, "num_layers": 3, "hidden": 512, "intermediate": 1024,
                                "vocab": 500})
    model = m.DecoderModel(shape, device, dtype, seed=5)
    graphed = g.GraphedPrefill(model, sizes=(16, 64), capture=capture)
    gen = torch.Generator().manual_seed(7)
    for new, cached in ((16, 0), (40, 0), (23, 37), (64, 16), (9, 100), (70, 5)):
        num_blocks = 16
        table = torch.randperm(num_blocks, generator=gen).to(device)
        tokens = torch.randint(0, shape.vocab, (new,), generator=gen).to(device)
        poison = [torch.randn(2, num_blocks, m.BLOCK_SIZE, shape.num_kv_heads, shape.head_dim, generator=gen)
                  .to(device, dtype) for _ in range(shape.num_layers)]
        runs = []
        for runner in (model, graphed):
            caches, calls = [c.clone() for c in poison], []
            logits = runner.prefill(tokens, caches, table, cached, lambda i: calls.append(("wait", i)),
                                    lambda i: calls.append(("save", i)))
            runs.append((logits, caches, calls))
        (eager_logits, eager_caches, eager_calls), (logits, caches, calls) = runs
        assert calls == eager_calls == [(hook, i) for i in range(shape.num_layers) for hook in ("wait", "save")]
        assert torch.isfinite(logits).all() and rel_err(logits, eager_logits) < tol, (new, cached)
        if graphed.padded_size(new) is not None:  # the pieces ran: their last hidden states give these logits
            assert torch.equal(model.logits(graphed._x[new - 1:new]), logits)
        pos = torch.arange(cached, cached + new, device=device)
        written = torch.zeros(2, num_blocks, m.BLOCK_SIZE, dtype=torch.bool, device=device)
        written[:, table[pos // m.BLOCK_SIZE], pos % m.BLOCK_SIZE] = True
        for got, want, before in zip(caches, eager_caches, poison):
            assert torch.equal(got[~written], before[~written])  # no other slot touched
            assert rel_err(got[written].float(), want[written].float()) < tol
            assert not torch.equal(got[written], before[written])


@pytest.mark.parametrize("shape_name", ["tiny", "qwen3-0.6b"])
def test_graph_pieces_over_padded_buffers_match_the_eager_prefill(ttft, shape_name):
    """The pieces the graphs capture, run uncaptured on the CPU: the padding and the buffers between them."""
    _graphed_against_eager(ttft, shape_name, "cpu", torch.float32, capture=False, tol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (this machine has none)")
@pytest.mark.parametrize("shape_name", ["tiny", "qwen3-0.6b"])
def test_graphed_prefill_matches_the_eager_prefill(ttft, shape_name):
    """The captured graphs replayed (bf16: padded matmuls may pick other kernels, hence the tolerance)."""
    _graphed_against_eager(ttft, shape_name, "cuda", torch.bfloat16, capture=True, tol=5e-2)


def test_g1_pool_prefix_cache_and_eviction_order(ttft):
    pool = ttft["engine"].G1Pool(range(4))
    a = pool.allocate(2)
    pool.register(a, [11, 12])
    assert pool.match([11, 12, 13]) == a  # matched while still in use
    pool.release(a)
    pool.release(a)
    assert pool.num_free == 4
    b = pool.allocate(2)  # never-used blocks first, then the tail of the freed request
    assert set(b).isdisjoint(a)
    c = pool.allocate(1)
    assert c == [a[1]] and pool.match([11, 12]) == [a[0]]
    with pytest.raises(RuntimeError, match="free blocks"):
        pool.allocate(1)


def test_reference_check_finds_a_changed_byte(ttft):
    m, e = ttft["model"], ttft["engine"]
    shape = m.SHAPES["tiny"]
    caches = [torch.randn(2, 8, m.BLOCK_SIZE, shape.num_kv_heads, shape.head_dim) for _ in range(2)]
    ref = e.Reference(caches, 4)
    ref.record([1, 2, 3], [5, 6, 7])
    assert ref.check([1, 2, 3], [5, 6, 7]) == (3, 0)
    assert ref.check([1, 9], [5, 0]) == (1, 1)  # hash 9 was never recorded
    caches[1][1, 6, 3, 0, 0] = torch.nextafter(caches[1][1, 6, 3, 0, 0], torch.tensor(1e9))
    assert ref.check([1, 2, 3], [5, 6, 7]) == (2, 0)


def test_reference_holds_more_blocks_than_the_cache(ttft):
    """A QA working set outgrows G1: the reference keeps every block first computed, whatever G1's size."""
    m, e = ttft["model"], ttft["engine"]
    shape = m.SHAPES["tiny"]
    caches = [torch.randn(2, 4, m.BLOCK_SIZE, shape.num_kv_heads, shape.head_dim) for _ in range(2)]
    ref = e.Reference(caches, 10)
    ref.record([1, 2, 3, 4], [0, 1, 2, 3])
    for c in caches:  # G1 blocks reused for other hashes
        c.copy_(torch.randn_like(c))
    ref.record([5, 6, 7, 8], [0, 1, 2, 3])
    assert ref.check([5, 6, 7, 8], [0, 1, 2, 3]) == (4, 0)
    assert ref.check([1, 2], [0, 1]) == (0, 0)  # recorded, and G1 now holds other bytes
    with pytest.raises(RuntimeError, match="full"):
        ref.record([9, 10, 11], [0, 1, 2])


def test_reference_replaces_a_block_stored_again(ttft):
    """A hash stored again from another computation: without ``replace`` the first bytes stay, with it the new."""
    m, e = ttft["model"], ttft["engine"]
    shape = m.SHAPES["tiny"]
    caches = [torch.randn(2, 4, m.BLOCK_SIZE, shape.num_kv_heads, shape.head_dim) for _ in range(2)]
    ref = e.Reference(caches, 4)
    ref.record([1, 2], [0, 1])
    caches[0][:, 2] = torch.randn_like(caches[0][:, 2])
    ref.record([1], [2])
    assert ref.check([1], [2]) == (0, 0) and ref.check([1], [0]) == (1, 0)
    ref.record([1, 3], [2, 3], replace=True)
    assert ref.check([1, 3], [2, 3]) == (2, 0) and ref.check([2], [1]) == (1, 0) and len(ref.slot_of) == 3


def test_smoke_run_writes_every_row_with_bytes_checked(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")}
    proc = subprocess.run([sys.executable, "-m", "bench.ttft", "--smoke", "--out", str(out),
                           "--disk-dir", str(tmp_path)], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.rstrip().splitlines()
    assert last[-5].startswith("| tiny-2l") and last[-2].startswith("- tiny, layer waits")  # the table comes last
    assert last[-3] == "- tiny, forwards: eager (no GPU)"
    assert last[-1].startswith("- tiny, stores of a 128-token prefill into G2: started after the forward: TTFT")
    result = json.loads((out / "ttft.json").read_text())
    assert (out / "ttft.md").is_file() and (out / "ttft.png").stat().st_size > 0
    meta = result["meta"]
    for key in ("date", "gpu", "torch", "triton", "commit", "command"):
        assert key in meta
    assert "--smoke" in meta["command"] and meta["kvbm_env"] == {}
    rows = result["rows"]
    for prefix in (64, 128):
        modes = {r["mode"]: r for r in rows if r["workload"] == "prefix" and r["prefix_tokens"] == prefix}
        for mode in ("recompute", "G1 hit (prefix on GPU)", "G2 hit, bulk onboard", "G2 hit, layer-wise",
                     "G3 hit, posix", "lower bound (PCIe + compute)"):
            assert modes[mode]["ttft_ms"] > 0, (prefix, mode)
        for mode in ("G2 hit, bulk onboard", "G2 hit, layer-wise", "G3 hit, posix"):
            row = modes[mode]
            assert row["bytes_ok"] is True and row["bad_blocks"] == 0
            assert row["checked_blocks"] == 3 * prefix // 16  # every loaded block of every timed request
            assert row["loaded_tokens"] == 3 * prefix
        bulk, layerwise = modes["G2 hit, bulk onboard"], modes["G2 hit, layer-wise"]
        turns = [b - w for b, w in zip(bulk["ttft_all_ms"], layerwise["ttft_all_ms"])]
        share = sorted(turns)[1] / bulk["load_ms"]  # the median of three turns
        assert f"hides {100 * share:.0f}% of the bulk load ({bulk['load_ms']:.1f} ms)" in layerwise["note"]
        bound = 1 - layerwise["load_ms"] / bulk["load_ms"]
        assert f"its {layerwise['load_ms']:.1f} ms before the forward leave {100 * bound:.0f}%" in layerwise["note"]
        assert modes["G3 hit, gds"]["ttft_ms"] is None and "unavailable" in modes["G3 hit, gds"]["note"]
        assert modes["recompute"]["computed_tokens"] == 3 * (prefix + 32)
        auto = modes["G3 hit, cost rule"]  # loaded or recomputed, as the rule decided (a CPU's timings)
        loads = auto["rule"]["loads"]
        assert auto["ttft_ms"] > 0 and loads + auto["rule"]["recomputes"] == 3 and auto["rule"]["enabled"]
        assert auto["loaded_tokens"] == loads * prefix and auto["checked_blocks"] == loads * prefix // 16
        assert auto["computed_tokens"] == 3 * 32 + (3 - loads) * prefix
        assert auto["bytes_ok"] is (True if loads else None) and auto["note"].startswith("rule: ")
        assert auto["rule"]["prefill_tokens_per_s"] > 0 and auto["rule"]["bandwidth_gb_per_s"] > 0
    probes = [r["note"] for r in rows if r["mode"] == "G3 hit, cost rule" and "probe before warm-up" in r["note"]]
    assert len(probes) == 1  # the first prefix's: the rule keeps what it learned
    assert result["notes"]["tiny"]["layer_waits"] == {"note": "needs a GPU (CUDA events time each layer)"}
    qa = {r["mode"]: r for r in rows if r["workload"].startswith("QA")}
    assert qa["recompute"]["requests"] == 6 and qa["recompute"]["loaded_tokens"] == 0
    for mode in ("G2 hit, bulk onboard", "G2 hit, layer-wise", "G3 hit, posix"):
        assert qa[mode]["bytes_ok"] is True and qa[mode]["loaded_tokens"] > 0
        assert qa[mode]["checked_blocks"] == qa[mode]["loaded_tokens"] // 16
    auto = qa["G3 hit, cost rule"]
    decided, unstored = auto["rule"]["loads"] + auto["rule"]["recomputes"], auto["rule"]["unstored_blocks"]
    # the rule decides the requests that find stored blocks; on a loaded CPU it may judge a reload not worth it while
    # the requests store, and then the store rule leaves their blocks unstored and no request finds any
    assert auto["requests"] == 6 and (decided > 0 or unstored > 0)
    assert ("nothing stored was found" in auto["note"]) == (decided == 0)
    assert (f"stores left {unstored} blocks out" in auto["note"]) == (unstored > 0)
    assert auto["checked_blocks"] == auto["loaded_tokens"] // 16 and auto["bytes_ok"] is not False
    assert (auto["loaded_tokens"] > 0) == (auto["rule"]["loads"] > 0)


def test_hidden_share_of_the_bulk_load(ttft):
    """The median over turns of (bulk TTFT - layer-wise TTFT) / bulk load ms: a drift between turns moves the rows'
    medians apart (here the layer-wise median is above the bulk one) but not the turns' differences; no share
    without timed requests or a load to hide."""
    row = ttft["bench"].Row
    bulk = row("m", "prefix", "G2 hit, bulk onboard", 2048, 256, ttft_ms=40.0, load_ms=5.0, requests=3,
               ttft_all_ms=[30.0, 50.0, 40.0])
    layerwise = row("m", "prefix", "G2 hit, layer-wise", 2048, 256, ttft_ms=44.0, requests=3,
                    ttft_all_ms=[26.0, 46.0, 44.0])
    assert ttft["bench"].hidden_share(bulk, layerwise) == pytest.approx(0.8)
    assert ttft["bench"].hidden_share(bulk, row("m", "prefix", "G2 hit, layer-wise", 2048, 256)) is None
    assert ttft["bench"].hidden_share(dataclasses.replace(bulk, load_ms=0.0), bulk) is None


def test_share_left_by_the_time_before_the_forward_and_saved_rows_split(ttft, tmp_path):
    """`share_bound`: 1 - layer-wise load / bulk load; `shares` reads saved rows (keys it does not know ignored) and
    lists only the prefixes with both rows."""
    bench, row = ttft["bench"], ttft["bench"].Row
    bulk = row("m", "prefix", "G2 hit, bulk onboard", 2048, 256, ttft_ms=40.0, load_ms=5.0, requests=3,
               ttft_all_ms=[30.0, 50.0, 40.0])
    layerwise = row("m", "prefix", "G2 hit, layer-wise", 2048, 256, ttft_ms=44.0, load_ms=1.5, requests=3,
                    ttft_all_ms=[26.0, 46.0, 44.0])
    assert bench.share_bound(bulk, layerwise) == pytest.approx(0.7)
    assert bench.share_bound(dataclasses.replace(bulk, load_ms=None), layerwise) is None
    assert bench.share_bound(bulk, dataclasses.replace(layerwise, load_ms=None)) is None
    lone = row("m", "prefix", "G2 hit, bulk onboard", 8192, 256, ttft_ms=60.0, load_ms=20.0)
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"rows": [{**dataclasses.asdict(bulk), "added_later": 1},
                                          dataclasses.asdict(layerwise), dataclasses.asdict(lone)]}))
    text = ttft["shares"].table([saved])
    assert "| saved.json | m | 2048 |  | 5.00 | 1.50 | 80% | 70% |" in text and "8192" not in text
    g1 = row("m", "prefix", "G1 hit (prefix on GPU)", 2048, 256, ttft_ms=35.0, load_ms=0.2)
    run = tmp_path / "run1" / "ttft.json"  # (the bench's own file name: named with its folder)
    run.parent.mkdir()
    run.write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in (g1, bulk, layerwise)]}))
    assert "| run1/ttft.json | m | 2048 | 35.00 | 5.00 | 1.50 | 80% | 70% |" in ttft["shares"].table([run])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="no 'rows' list"):
        ttft["shares"].rows_of(other)


def test_rows_run_in_turns_warm_ups_dropped_and_a_raising_row_dropped(ttft):
    """One request of each row in turn (so the host's drift is shared by the rows compared); the warm-ups are not
    returned; a row that raises is reported with its exception and not run again."""
    calls = []

    def run(name, fail_at=None):
        def one():
            calls.append(name)
            if len(calls) == fail_at:
                raise OSError(f"{name} broke")
            return f"{name}{calls.count(name)}"
        return one
    results, raised = ttft["bench"]._timed_in_turns(3, 1, {"a": run("a"), "b": run("b", fail_at=5), "c": run("c")})
    assert calls == ["a", "b", "c", "a", "b", "c", "a", "c", "a", "c"]
    assert results == {"a": ["a2", "a3", "a4"], "c": ["c2", "c3", "c4"]}
    assert set(raised) == {"b"} and "b broke" in str(raised["b"])


def test_a_kvbm_mode_that_raises_is_reported_and_dropped(ttft, tmp_path, monkeypatch):
    b, modes = ttft["bench"], ttft["modes"]
    for key in [k for k in os.environ if k.startswith("DYN_KVBM_")]:
        monkeypatch.delenv(key)
    args = b.parse_args(["--smoke", "--workloads", "prefix", "--reps", "1", "--warmup", "0",
                         "--disk-dir", str(tmp_path)])
    with torch.inference_mode():
        setup = b.build(args, "tiny", torch.device("cpu"), torch.float32)
        try:
            g3 = setup.sides[modes.G3_POSIX]

            def broken(loads, layer_ratio=0.0):
                raise OSError("disk gone")
            monkeypatch.setattr(g3.worker, "start_loads", broken)
            rows = {r.mode: r for r in b.run_prefix(args, setup, 64, {})}
            assert rows[modes.G3_POSIX].bytes_ok is False and "disk gone" in rows[modes.G3_POSIX].note
            assert rows[modes.G2].bytes_ok is True and rows[modes.G2].loaded_tokens == 64
            assert modes.G3_POSIX not in setup.sides
            rows = {r.mode: r for r in b.run_prefix(args, setup, 128, {})}  # the run goes on without the mode
            assert rows[modes.G3_POSIX].ttft_ms is None and "disk gone" in rows[modes.G3_POSIX].note
            assert rows[modes.G2].bytes_ok is True and rows[modes.G2].loaded_tokens == 128
        finally:
            for side in setup.sides.values():
                side.close()


def _cost_rule_rows(b, tmp_path, monkeypatch, slow_down):
    """The recompute and cost-rule rows of a 128-token prefix (2 timed requests after 1 warm-up) on the tiny model,
    after ``slow_down(setup)``; and the rule."""
    for key in [k for k in os.environ if k.startswith("DYN_KVBM_")]:
        monkeypatch.delenv(key)
    args = b.parse_args(["--smoke", "--workloads", "prefix", "--modes", "recompute,g3-auto", "--prefixes", "128",
                         "--reps", "2", "--warmup", "1", "--disk-dir", str(tmp_path)])
    with torch.inference_mode():
        setup = b.build(args, "tiny", torch.device("cpu"), torch.float32)
        try:
            slow_down(setup)
            rows = {r.mode: r for r in b.run_prefix(args, setup, 128, {})}
        finally:
            for side in setup.sides.values():
                side.close()
    return rows[b.RECOMPUTE], rows[b.G3_AUTO], setup.rule


def test_qa_rows_report_the_wait_for_g1_blocks_that_stores_still_read(ttft, tmp_path, monkeypatch):
    """Writes into G3 held for 50 ms each keep the stored requests' G1 blocks (a CPU engine's blocks are written
    straight from G1): in the QA workload, whose G1 holds a quarter of its working set, later requests wait for
    them, and the G3 row says how long; the recompute row, with no store, never waits."""
    b, modes = ttft["bench"], ttft["modes"]
    for key in [k for k in os.environ if k.startswith("DYN_KVBM_")]:
        monkeypatch.delenv(key)
    args = b.parse_args(["--smoke", "--workloads", "qa", "--modes", "recompute,g3-posix", "--disk-dir",
                         str(tmp_path)])
    with torch.inference_mode():
        setup = b.build(args, "tiny", torch.device("cpu"), torch.float32)
        try:
            disk = setup.sides[modes.G3_POSIX].worker.store.cache("G3")
            write = disk.write_slots

            def slow_write(*a, **kw):
                time.sleep(0.05)
                return write(*a, **kw)
            monkeypatch.setattr(disk, "write_slots", slow_write)
            rows = {r.mode: r for r in b.run_qa(args, setup)}
        finally:
            for side in setup.sides.values():
                side.close()
    recompute, g3 = rows[modes.RECOMPUTE], rows[modes.G3_POSIX]
    assert recompute.block_wait_ms == 0 and "waited" not in recompute.note
    assert g3.block_wait_ms >= 5  # at least one request waited for a whole held write (6 requests)
    assert f"waited {g3.block_wait_ms:.1f} ms a request for G1 blocks stores still read" in g3.note
    assert g3.bytes_ok is True


def test_qa_passes_run_the_modes_in_turn_each_from_cold_tiers(ttft, tmp_path, monkeypatch):
    """``--qa-passes 2``: recompute's requests, then G2's, then recompute's again and G2's again, each pass under a
    salt of its own (its tier cold: the second G2 pass loads as much as the first, every block checked); a row is
    over both passes' requests, its mean their mean, and lists each pass's mean."""
    b, modes = ttft["bench"], ttft["modes"]
    for key in [k for k in os.environ if k.startswith("DYN_KVBM_")]:
        monkeypatch.delenv(key)
    with pytest.raises(SystemExit):
        b.parse_args(["--smoke", "--qa-passes", "0"])
    args = b.parse_args(["--smoke", "--workloads", "qa", "--modes", "recompute,g2", "--qa-passes", "2",
                         "--disk-dir", str(tmp_path)])
    with torch.inference_mode():
        setup = b.build(args, "tiny", torch.device("cpu"), torch.float32)
        try:
            calls = []
            run_request = setup.engine.run_request

            def recorded(prompt, sides=(), **kw):
                result = run_request(prompt, sides, **kw)
                calls.append((bool(sides), kw["salt"], result.loaded_tokens))
                return result
            monkeypatch.setattr(setup.engine, "run_request", recorded)
            rows = {r.mode: r for r in b.run_qa(args, setup)}
        finally:
            for side in setup.sides.values():
                side.close()
    per_pass = 6  # 3 users x 2 rounds
    assert [(kv, salt) for kv, salt, _ in calls[::per_pass]] == [(False, 1), (True, 2), (False, 3), (True, 4)]
    assert all(calls[i][:2] == calls[i - i % per_pass][:2] for i in range(len(calls)))
    loaded = [sum(n for _, _, n in calls[k * per_pass:(k + 1) * per_pass]) for k in range(4)]
    assert loaded[0] == loaded[2] == 0 and loaded[1] == loaded[3] > 0
    for mode in (modes.RECOMPUTE, modes.G2):
        row = rows[mode]
        assert row.requests == 2 * per_pass and len(row.pass_means_ms) == 2
        assert row.ttft_ms == pytest.approx(sum(row.ttft_all_ms) / len(row.ttft_all_ms), abs=1e-2)
        assert row.pass_means_ms == pytest.approx([sum(row.ttft_all_ms[:per_pass]) / per_pass,
                                                   sum(row.ttft_all_ms[per_pass:]) / per_pass], abs=1e-2)
        assert "pass means " + " / ".join(f"{m:.1f}" for m in row.pass_means_ms) in row.note
    assert rows[modes.G2].loaded_tokens == loaded[1] + loaded[3] and rows[modes.G2].bytes_ok is True
    assert rows[modes.G2].checked_blocks == rows[modes.G2].loaded_tokens // 16


def test_cost_rule_recomputes_from_a_slow_disk(ttft, tmp_path, monkeypatch):
    """A disk taking a second per read (8 blocks of 32 KiB: 0.26 MB/s) loses to recomputing 128 tokens even on a
    busy CPU: after the probe (one untimed load with the rule off) the rule recomputes, and the row's TTFT is about
    recompute's."""
    b, modes = ttft["bench"], ttft["modes"]

    def slow_disk(setup):
        disk = setup.sides[modes.G3_AUTO].worker.store.cache("G3").file
        read = disk.read_slots

        def slow_read(*args, **kwargs):
            time.sleep(1.0)
            return read(*args, **kwargs)
        monkeypatch.setattr(disk, "read_slots", slow_read)
    recompute, auto, rule = _cost_rule_rows(b, tmp_path, monkeypatch, slow_disk)
    assert rule.measured and rule.policy.bandwidth("G3") < 8 * rule.policy.block_bytes / 1.0
    assert auto.rule["recomputes"] == 2 and auto.rule["loads"] == 0 and auto.rule["probes"] == 0
    assert auto.note.startswith("rule: recompute 2/2 (G3 est. ")
    assert "probe before warm-up: 128 tokens loaded" in auto.note
    assert auto.loaded_tokens == 0 and auto.computed_tokens == recompute.computed_tokens == 2 * (128 + 32)
    assert auto.bytes_ok is None and auto.checked_blocks == 0  # nothing loaded, nothing to check
    # about recompute's: within noise (a shared CPU), well below the second a load would add
    assert auto.ttft_ms < recompute.ttft_ms + 500 and auto.load_ms < 500


def test_cost_rule_loads_when_prefill_is_slow(ttft, tmp_path, monkeypatch):
    """With the prefill slowed to 2 ms per token (500 tokens/s, learned from the engine's steps), loading 128 tokens'
    blocks from disk beats recomputing them: the rule loads, every loaded block checked byte for byte. The fitted
    rate is checked against 1k tokens/s, twice the slowed one: the fit's slope comes from steps of 32 and 160 tokens,
    and a busy machine's jitter of a few ms on one short step moves it by several percent."""
    b = ttft["bench"]

    def slow_prefill(setup):
        model = setup.engine.model
        prefill = model.prefill

        def slow(tokens, *args, **kwargs):
            time.sleep(2e-3 * tokens.numel())
            return prefill(tokens, *args, **kwargs)
        monkeypatch.setattr(model, "prefill", slow)
    recompute, auto, rule = _cost_rule_rows(b, tmp_path, monkeypatch, slow_prefill)
    assert rule.policy.prefill_rate < 1000  # the steps the engine passed in
    assert auto.rule["loads"] == 2 and auto.rule["recomputes"] == 0 and auto.note.startswith("rule: load 2/2")
    assert auto.loaded_tokens == 2 * 128 and auto.bytes_ok is True and auto.checked_blocks == 2 * 128 // 16
    assert auto.computed_tokens == 2 * 32 and recompute.computed_tokens == 2 * (128 + 32)


def test_qa_through_a_rule_that_never_loads_stores_nothing_and_says_so(ttft, tmp_path, monkeypatch):
    """A rule that has measured a disk at 1 kB/s would recompute every reload, so the store rule, keeping no batch
    alive for probes, leaves every QA request's blocks unstored: no request finds any, and the row counts the blocks
    left out rather than reporting a rule that never decided."""
    b, modes = ttft["bench"], ttft["modes"]
    for key in [k for k in os.environ if k.startswith("DYN_KVBM_")]:
        monkeypatch.delenv(key)
    args = b.parse_args(["--smoke", "--workloads", "qa", "--modes", "g3-auto", "--disk-dir", str(tmp_path)])
    with torch.inference_mode():
        setup = b.build(args, "tiny", torch.device("cpu"), torch.float32)
        try:
            for _ in range(50):
                setup.rule.policy.observe_load("G3", num_bytes=1000, seconds=1.0)
            setup.rule.measured = True  # no probe: the rule decides from the first request
            backlog = setup.sides[modes.G3_AUTO].leader.backlog
            backlog.keep_alive_seconds = 0.0  # as for a rule that never probes
            before = backlog.total_dropped("G3")
            row, = b.run_qa(args, setup)
            left_out = backlog.total_dropped("G3") - before
        finally:
            for side in setup.sides.values():
                side.close()
    assert setup.rule.policy.bandwidth("G3") < 2e3
    assert row.requests == 6 and row.loaded_tokens == 0 and row.bytes_ok is None
    assert row.rule["loads"] == row.rule["recomputes"] == 0 and row.rule["not_found"] == 6
    assert left_out > 0 and row.rule["unstored_blocks"] == left_out
    assert row.note.startswith(f"rule: nothing stored was found; stores left {left_out} blocks out")


def test_every_side_learns_from_every_step_the_engine_runs(ttft, tmp_path, monkeypatch):
    """As a served connector times every step of its engine: a recompute request (no kvbm side) and a request
    through the G2 side are both steps the G3 side's rule learns from, once the sides are the engine's; a side the
    engine no longer serves (dropped after a failure) learns nothing more."""
    b, modes = ttft["bench"], ttft["modes"]
    for key in [k for k in os.environ if k.startswith("DYN_KVBM_")]:
        monkeypatch.delenv(key)
    args = b.parse_args(["--smoke", "--workloads", "prefix", "--modes", "g2,g3-auto", "--disk-dir", str(tmp_path)])
    seen: dict[str, list[int]] = {}
    with torch.inference_mode():
        setup = b.build(args, "tiny", torch.device("cpu"), torch.float32)
        try:
            assert setup.engine.sides == list(setup.sides.values())
            for mode, side in setup.sides.items():
                observe = side.leader.cost.observe_prefill
                monkeypatch.setattr(side.leader.cost, "observe_prefill",
                                    lambda tokens, seconds, mode=mode, observe=observe:
                                    (seen.setdefault(mode, []).append(tokens), observe(tokens, seconds)))
            setup.engine.evict_all()
            setup.engine.run_request(list(range(40)))  # recompute: no side takes part
            setup.engine.run_request(list(range(100, 150)), [setup.sides[modes.G2]])
            assert seen == {modes.G2: [40, 50], modes.G3_AUTO: [40, 50]}
            setup.engine.abandon(setup.sides[modes.G3_AUTO])
            setup.engine.run_request(list(range(200, 230)))
            assert seen == {modes.G2: [40, 50, 30], modes.G3_AUTO: [40, 50]}
        finally:
            for side in setup.sides.values():
                side.close()


def test_plot_rings_the_cost_rules_recomputes(ttft, tmp_path, monkeypatch):
    """The plot draws every mode's line and the cost rule's decisions (a ring where it recomputed, the QA counts)."""
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the bench extra)")
    import matplotlib.axes
    b, modes = ttft["bench"], ttft["modes"]
    rows = []
    for prefix, ms in ((64, 3.0), (128, 5.0)):
        rows.append(b.Row("tiny", "prefix", modes.RECOMPUTE, prefix, 32, ttft_ms=ms))
        rows.append(b.Row("tiny", "prefix", modes.G3_AUTO, prefix, 32, ttft_ms=ms + 0.1,
                          rule={"loads": 0, "recomputes": 3} if prefix == 64 else {"loads": 3, "recomputes": 0}))
    rows.append(b.Row("tiny", "QA", modes.G3_AUTO, ttft_ms=4.0, rule={"loads": 2, "recomputes": 1}))
    result = {"rows": [dataclasses.asdict(r) for r in rows], "meta": {"new_tokens": 32}}
    rings, notes = [], []
    scatter, annotate = matplotlib.axes.Axes.scatter, matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter",
                        lambda self, *a, **k: rings.append((a, k["label"])) or scatter(self, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: notes.append(text) or annotate(self, text, *a, **k))
    assert ttft["report"].plot(result, tmp_path / "ttft.png") is None
    assert (tmp_path / "ttft.png").stat().st_size > 0
    assert rings == [(((64,), (3.1,)), "G3 hit, cost rule: rule recomputed")]
    assert notes == ["load 2\nrecompute 1"]


def test_layerwise_rows_with_later_groups_enqueued_in_the_forward(ttft, tmp_path, monkeypatch):
    """``DYN_KVBM_ONBOARD_LATER_GROUPS_IN_FORWARD=1``: the layer-wise hits of a CPU run (4 layers, so four layer
    groups) load every block right, and the results name the setting."""
    for key in [k for k in os.environ if k.startswith("DYN_KVBM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("DYN_KVBM_ONBOARD_LATER_GROUPS_IN_FORWARD", "1")
    monkeypatch.setenv("DYN_KVBM_ONBOARD_LAYERS_PER_GROUP", "1")
    monkeypatch.setenv("DYN_KVBM_DISABLE_COST_LAYER_GROUPS", "1")
    code = ttft["bench"].main(["--smoke", "--models", "tiny", "--layers", "4", "--workloads", "prefix",
                               "--modes", "g2-layerwise", "--prefixes", "64", "--reps", "2", "--warmup", "0",
                               "--layer-wait-prefix", "0", "--layer-store-tokens", "0", "--device", "cpu",
                               "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "ttft.json").read_text())
    assert result["meta"]["kvbm_env"] == {"DYN_KVBM_DISABLE_COST_LAYER_GROUPS": "1",
                                          "DYN_KVBM_ONBOARD_LATER_GROUPS_IN_FORWARD": "1",
                                          "DYN_KVBM_ONBOARD_LAYERS_PER_GROUP": "1"}
    (row,) = [r for r in result["rows"] if r["mode"] == "G2 hit, layer-wise"]
    assert row["bytes_ok"] is True and row["bad_blocks"] == 0 and row["checked_blocks"] == 2 * 64 // 16


def test_call_times_names_the_groups_and_times_each_call_of_a_layerwise_hit(ttft, tmp_path, monkeypatch):
    """`bench.ttft.call_times` over a CPU run of the tiny model (4 layers): one record per request through a kvbm
    side; a layer-wise hit's names layer groups that cover every layer once and times its lookup, load plan and
    start, the start no shorter than the groups' submit inside it nor than the time before the forward allows; the
    timed classes are restored afterwards."""
    ct, engine = ttft["call_times"], ttft["engine"]
    for key in [k for k in os.environ if k.startswith("DYN_KVBM_")]:
        monkeypatch.delenv(key)
    originals = (engine.Engine.run_request, ct.ConnectorLeader.lookup, ct.layerwise.LayerwiseLoads.start)
    with ct.recording() as requests:
        code = ttft["bench"].main(["--smoke", "--models", "tiny", "--layers", "4", "--workloads", "prefix",
                                   "--modes", "g2,g2-layerwise", "--prefixes", "64", "--reps", "2", "--warmup", "0",
                                   "--layer-wait-prefix", "0", "--layer-store-tokens", "0", "--device", "cpu",
                                   "--out", str(tmp_path)])
    assert code == 0
    assert (engine.Engine.run_request, ct.ConnectorLeader.lookup, ct.layerwise.LayerwiseLoads.start) == originals
    hits = [r for r in requests if r.layerwise]
    assert len(hits) == 2 and any(not r.layerwise for r in requests)
    for hit in hits:
        assert hit.ratio is not None and [a for a, _ in hit.groups] == [0] + [b for _, b in hit.groups[:-1]]
        assert hit.groups[0][0] == 0 and hit.groups[-1][1] == 4
        seconds = dict(hit.calls)  # (the last of each name)
        for name in ("ConnectorLeader.lookup", "ConnectorLeader.plan_load", "ConnectorWorker.start_loads",
                     "LayeredMoves.submit_groups", "Transfers.submit_groups"):
            assert seconds[name] > 0, name
        assert seconds["ConnectorWorker.start_loads"] >= seconds["LayeredMoves.submit_groups"]
        assert hit.load_wait_ms / 1e3 >= seconds["ConnectorWorker.start_loads"] and hit.ttft_ms > hit.forward_ms > 0
        assert hit.line().startswith("req lw=True n=") and f"groups={len(hit.groups)}" in hit.line()
