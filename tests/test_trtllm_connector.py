"""TensorRT-LLM connector pair on CPU tensors, driven in the executor's call order, byte-exact.

TensorRT-LLM cannot be installed here: ``trtllm_standin`` puts a stand-in of its published connector interface
into ``sys.modules`` first. ``Executor`` below plays the executor's part: it schedules requests, allocates cache
blocks from the pool, builds ``RequestData`` the way the executor does (the whole prompt and every block id on a
request's first report; the connector-loaded tokens left out of ``computed_position`` in the step that matched
them), holds asynchronously loading requests out of the forward pass until ``get_finished`` reports them, runs a
"forward pass" that writes each computed token's KV (a function of the token prefix, so equal prefixes give equal
bytes), and keeps a finished request's blocks while the connector saves them. The step's plan is read through
``loads_of`` / ``saves_of`` (per request: engine block ids and sequence hashes).
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import trtllm_standin as standin
from kvbm.layouts import KVGeometry, allocate
from manager_testkit import POISON, config

GEOM = KVGeometry(num_layers=3, num_kv=2, block_size=4, num_heads=2, head_dim=16, itemsize=2)
NUM_BLOCKS = 32


@pytest.fixture(scope="module")
def trt():
    """The connector module, imported over the stand-in; the stand-in is removed afterwards."""
    standin.install()
    sys.modules.pop("kvbm.trtllm_integration.connector", None)
    try:
        yield importlib.import_module("kvbm.trtllm_integration.connector")
    finally:
        sys.modules.pop("kvbm.trtllm_integration.connector", None)
        standin.uninstall()


def llm_args(tokens_per_block: int = GEOM.block_size, world_size: int = 1) -> SimpleNamespace:
    """The parts of TorchLlmArgs the connector reads."""
    mapping = SimpleNamespace(world_size=world_size, rank=0)
    return SimpleNamespace(kv_cache_config=SimpleNamespace(tokens_per_block=tokens_per_block),
                           parallel_config=SimpleNamespace(to_mapping=lambda: mapping))


@dataclass
class Request:
    """The parts of LlmRequest the connector reads."""

    request_id: int
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    cache_salt_id: int | None = None
    lora_task_id: int | None = None
    multimodal_hashes: list | None = None

    def get_tokens(self, beam: int) -> list[int]:
        assert beam == 0
        return self.prompt + self.generated


def token_kv(prefix: tuple[int, ...], layer: int) -> torch.Tensor:
    """KV of the last token of ``prefix`` in ``layer``: [2, heads, head_dim] random bf16 bits, no zeros."""
    rng = np.random.default_rng([layer, len(prefix), *prefix])
    bits = rng.integers(1, 2**15, (2, GEOM.num_heads, GEOM.head_dim), dtype=np.int16)
    return torch.from_numpy(bits).view(torch.bfloat16)


class Executor:
    """Plays TensorRT-LLM's executor around one leader/worker pair (see the module docstring)."""

    def __init__(self, trt, *, use_callable: bool = True, host_blocks: int = 64, chunk: int = 1 << 30,
                 seed: int = 0, device: str = "cpu", kvbm_config=None) -> None:
        self.chunk = chunk  # context tokens computed per step (chunked prefill)
        cfg = kvbm_config or config(host=host_blocks)
        self.leader = trt.DynamoKVBMConnectorLeader(llm_args(), config=cfg)
        self.worker = trt.DynamoKVBMConnectorWorker(llm_args(), config=cfg)
        cache = allocate("trtllm_pool", GEOM, NUM_BLOCKS, dtype=torch.bfloat16, device=device)
        self.stream = torch.cuda.current_stream() if cache.device.type == "cuda" else None
        self.pool = cache.tensors[0]
        self.pool.view(torch.uint8).fill_(POISON)
        self.worker.register_kv_caches(self.pool)
        self.callable = self.worker.register_forward_pass_callable() if use_callable else None
        self.rng = np.random.default_rng(seed)
        self.free = [int(b) for b in self.rng.permutation(NUM_BLOCKS)]
        self.blocks: dict[int, list[int]] = {}
        self.position: dict[int, int] = {}  # tokens with valid KV, per running request
        self.reported: dict[int, tuple[int, int]] = {}  # tokens and blocks already reported in RequestData
        self.external: dict[int, int] = {}  # connector-matched tokens of this step's sync matches
        self.loading: dict[int, Request] = {}
        self.running: dict[int, Request] = {}
        self.saving: set[int] = set()
        self.new_loading: list[int] = []
        self.new_saving: list[int] = []
        self.metas: list = []

    def add(self, req: Request, num_computed_tokens: int = 0) -> tuple[int, bool]:
        """Admit a request: ask the leader, allocate blocks for the prompt, tell the leader the block ids."""
        return standin.admit(self, req, num_computed_tokens, GEOM.block_size, self._poison)

    def _poison(self, blocks: list[int]) -> None:
        for b in blocks:
            self.pool[b].view(torch.uint8).fill_(POISON)

    def _request_data(self, req: Request):
        rid = req.request_id
        tokens, ids = req.get_tokens(0), self.blocks[rid]
        done_tokens, done_blocks = self.reported.get(rid, (0, 0))
        self.reported[rid] = (len(tokens), len(ids))
        pos = self.position[rid]
        if pos < len(req.prompt):  # context: the next chunk of the prompt
            computed, scheduled = pos - self.external.get(rid, 0), min(len(req.prompt) - pos, self.chunk)
        else:  # generation: the last sampled token
            computed, scheduled = len(tokens) - 1, 1
        data = standin.RequestData(rid, tokens[done_tokens:], ids[done_blocks:], computed, scheduled)
        return data, done_tokens == 0

    def step(self):
        """One scheduler + forward step over the running requests with tokens to compute; returns
        (done_saving, done_loading) from the worker."""
        out = standin.SchedulerOutput()
        for req in self.running.values():
            if self.position[req.request_id] == len(req.get_tokens(0)):
                continue  # waiting for the sampler
            data, new = self._request_data(req)
            (out.new_requests if new else out.cached_requests).append(data)
        self.external.clear()
        meta = self.leader.build_connector_meta(out)
        self.metas.append(meta)
        w = self.worker
        w.bind_connector_meta(meta)
        w.start_load_kv(self.stream)
        for layer in range(GEOM.num_layers):
            w.wait_for_layer_load(layer, self.stream)
            for data in out.new_requests + out.cached_requests:
                self._compute(self.running[data.request_id], layer, data)
            w.save_kv_layer(layer, self.stream)
        if self.callable is not None:
            self.callable()
        w.wait_for_save(self.stream)
        for data in out.new_requests + out.cached_requests:
            self.position[data.request_id] += data.num_scheduled_tokens
        saving, self.new_saving = self.new_saving, []
        loading, self.new_loading = self.new_loading, []
        done_saving, done_loading = w.get_finished(saving, loading)
        for rid in done_loading:
            self.running[rid] = self.loading.pop(rid)
        for rid in done_saving:
            self.saving.discard(rid)
            standin.free(self, rid)
        return done_saving, done_loading

    def serve(self, req: Request) -> None:
        """Admit a request, run its prefill step, finish it and run the step that starts its saves."""
        self.add(req)
        self.step()
        self.finish(req)
        self.step()

    def step_until(self, condition, max_steps: int = 500) -> None:
        """Step until ``condition()`` holds: loads from G3 finish when the disk threads have read the blocks."""
        for _ in range(max_steps):
            self.step()
            if condition():
                return
            time.sleep(0.001)
        raise AssertionError(f"condition not reached in {max_steps} steps")

    def _compute(self, req: Request, layer: int, data) -> None:
        """Write the KV of the step's tokens of ``req`` into its blocks."""
        tokens = req.get_tokens(0)
        start = self.position[req.request_id]
        for p in range(start, start + data.num_scheduled_tokens):
            block, slot = self.blocks[req.request_id][p // GEOM.block_size], p % GEOM.block_size
            self.pool[block, layer, :, :, slot, :] = token_kv(tuple(tokens[:p + 1]), layer).to(self.pool.device)

    def generate(self, req: Request, token: int) -> None:
        """The sampler appended a token; give the request a new block when it crosses a block boundary."""
        req.generated.append(token)
        if len(req.get_tokens(0)) > len(self.blocks[req.request_id]) * GEOM.block_size:
            self.blocks[req.request_id].append(self.free.pop())

    def finish(self, req: Request) -> bool:
        """The request is done: ask the leader whether its blocks must be kept; free them if not."""
        keep = standin.finish(self, req)
        if keep:
            self.saving.add(req.request_id)
        return keep

    def block_bytes(self, block: int) -> bytes:
        return self.pool[block].cpu().contiguous().view(torch.uint8).numpy().tobytes()

    def expected_block(self, tokens: list[int], index: int) -> bytes:
        """The oracle bytes of block ``index`` of a sequence starting with ``tokens``."""
        out = torch.empty_like(self.pool[0], device="cpu")
        for layer in range(GEOM.num_layers):
            for slot in range(GEOM.block_size):
                p = index * GEOM.block_size + slot
                out[layer, :, :, slot, :] = token_kv(tuple(tokens[:p + 1]), layer)
        return out.contiguous().view(torch.uint8).numpy().tobytes()

    @property
    def index(self):
        """The leader's block index."""
        return self.leader.leader.index

    @property
    def store(self):
        """The worker's block store."""
        return self.worker.worker.store

    def settle(self, max_steps: int = 500) -> None:
        """Run empty steps (no request scheduled) until every planned move (stores, cascades to G3) is done and
        reported to the leader."""
        for _ in range(max_steps):
            self.store.wait_all()
            self.worker.get_finished([], [])  # collects the results and posts them
            meta = self.leader.build_connector_meta(standin.SchedulerOutput())  # takes them, plans cascades
            if not self.index.open_moves():
                return
            self.worker.bind_connector_meta(meta)
            self.worker.start_load_kv(self.stream)
            self.worker.wait_for_save(self.stream)
        raise AssertionError(f"moves still open after {max_steps} steps")


@dataclass(frozen=True)
class Moved:
    """One request's blocks in a step's plan: engine block ids and the blocks' sequence hashes, in move order."""

    request_id: int
    block_ids: tuple[int, ...]
    seq_hashes: tuple[int, ...]


def loads_of(meta) -> list[Moved]:
    return [Moved(int(job.request_id), tuple(b for m in job.moves for b in m.dst_ids),
                  tuple(h for m in job.moves for h in m.hashes)) for job in meta.plan.loads]


def saves_of(meta) -> list[Moved]:
    return [Moved(int(job.request_id), tuple(b for m in job.moves for b in m.src_ids),
                  tuple(h for m in job.moves for h in m.hashes)) for job in meta.plan.stores]


@pytest.fixture
def make_executor(trt):
    made = []

    def make(**kw) -> Executor:
        ex = Executor(trt, **kw)
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.worker.close()


def prompt(rng: np.random.Generator, n: int) -> list[int]:
    return [int(t) for t in rng.integers(0, 50_000, n)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the GPU variant needs a CUDA GPU"))])
@pytest.mark.parametrize("use_callable", [True, False], ids=["forward_callable", "last_layer_save"])
def test_offload_then_onboard_prefix_byte_exact(make_executor, use_callable, device):
    """Request A's full blocks are offloaded after its forward pass; request B sharing the prefix has them loaded
    asynchronously into other block ids, byte-identical, and computes only the rest. On a GPU the transfers
    complete through CUDA events: the executor steps until the worker reports them."""
    ex = make_executor(use_callable=use_callable, device=device)
    rng = np.random.default_rng(1)
    shared = prompt(rng, 14)  # 3 full blocks + 2 tokens
    a = Request(1, shared + prompt(rng, 3))  # 17 tokens: 4 full blocks
    assert ex.add(a) == (0, False)
    ex.step()
    meta = ex.metas[-1]
    assert loads_of(meta) == [] and len(saves_of(meta)) == 1
    assert saves_of(meta)[0].block_ids == tuple(ex.blocks[1][:4])
    a_blocks = [ex.block_bytes(b) for b in ex.blocks[1][:3]]
    for i, data in enumerate(a_blocks):
        assert data == ex.expected_block(a.prompt, i)
    # A finishes; the leader reports its save still in flight only while it is.
    ex.finish(a)
    for _ in range(100):
        ex.step()
        if 1 not in ex.blocks:
            break
    assert 1 not in ex.blocks

    b = Request(2, shared + prompt(rng, 5))  # shares 3 full blocks with A, then differs
    matched, is_async = ex.add(b)
    assert (matched, is_async) == (12, True)
    b_ids = ex.blocks[2][:3]
    for blk in b_ids:
        assert ex.block_bytes(blk) == bytes([POISON]) * GEOM.block_bytes
    steps = len(ex.metas)
    for _ in range(100):
        ex.step()
        if 2 in ex.running:
            break
    assert 2 in ex.running
    if device == "cpu":
        assert len(ex.metas) == steps + 1  # CPU copies complete when submitted: reported in the same step
    load = loads_of(ex.metas[steps])
    assert len(load) == 1 and load[0].block_ids == tuple(b_ids) and load[0].request_id == 2
    for i, blk in enumerate(b_ids):
        assert ex.block_bytes(blk) == a_blocks[i], f"block {i} of B differs from A's"
    # B now runs: only its remaining tokens are scheduled, and its new full block is offloaded (19 tokens: 4 full
    # blocks, the first 3 stored already).
    ex.step()
    meta = ex.metas[-1]
    assert [d for d in saves_of(meta) if d.request_id == 2][0].block_ids == (ex.blocks[2][3],)
    for i in range(len(b.prompt) // GEOM.block_size):
        assert ex.block_bytes(ex.blocks[2][i]) == ex.expected_block(b.prompt, i)
    ex.index.check_invariants()


def test_decode_blocks_offloaded_and_reused(make_executor):
    """Blocks filled during decoding are offloaded too; a later request with prompt = A's prompt + output finds
    them (all but the last full block, which the engine must compute)."""
    ex = make_executor()
    rng = np.random.default_rng(2)
    a = Request(1, prompt(rng, 6))
    ex.add(a)
    ex.step()
    for _ in range(7):  # 6 + 7 = 13 tokens: 3 full blocks
        ex.generate(a, int(rng.integers(0, 50_000)))
        ex.step()
    saved = [m for meta in ex.metas for m in saves_of(meta)]
    assert [len(m.block_ids) for m in saved] == [1, 1, 1]
    ex.finish(a)
    ex.step()
    b = Request(2, a.get_tokens(0)[:12])  # exactly 3 full blocks: the last one is not reported
    assert ex.add(b) == (8, True)
    ex.step()
    for i in range(2):
        assert ex.block_bytes(ex.blocks[2][i]) == ex.expected_block(b.prompt, i)


@pytest.mark.parametrize("tiers", ["g2_g3", "g3_only"])
def test_onboard_from_disk(make_executor, tmp_path, tiers):
    """Blocks that went to disk (G2 too small, every block admitted; or disk-only mode) load back byte-exact.
    With G2 of 2 blocks, A's prompt is computed 2 blocks per step, each pair copied on to G3 before the next."""
    host = 2 if tiers == "g2_g3" else None
    ex = make_executor(kvbm_config=config(tmp_path, host=host, disk=16, disable_disk_offload_filter=True), chunk=8)
    rng = np.random.default_rng(12)
    a = Request(1, prompt(rng, 18))
    ex.add(a)
    for _ in range(3):
        ex.step()
        ex.settle()  # the G2 -> G3 copies run on disk threads: let them land and reach the leader
    ex.finish(a)
    ex.settle()
    b = Request(2, a.prompt[:16] + prompt(rng, 1))
    before = ex.store.metrics.value("kvbm_onboard_blocks_d2d")
    assert ex.add(b) == (16, True)
    ex.step_until(lambda: 2 in ex.running)
    for i in range(4):
        assert ex.block_bytes(ex.blocks[2][i]) == ex.expected_block(a.prompt, i)
    from_disk = ex.store.metrics.value("kvbm_onboard_blocks_d2d") - before
    assert from_disk == (2 if tiers == "g2_g3" else 4)  # G2 keeps the 2 most recent blocks
    ex.index.check_invariants()


def test_engine_prefix_match_and_partial_block(make_executor):
    """Blocks the engine already matched are not loaded again; an engine match ending inside a block gives
    (0, False)."""
    ex = make_executor()
    rng = np.random.default_rng(3)
    a = Request(1, prompt(rng, 17))
    ex.serve(a)
    b = Request(2, a.prompt[:16] + prompt(rng, 3))
    assert ex.leader.get_num_new_matched_tokens(b, 6) == (0, False)
    matched, is_async = ex.add(b, num_computed_tokens=8)  # the engine holds 2 blocks; kvbm has 2 more
    assert (matched, is_async) == (8, True)
    ex.step()
    load = loads_of(ex.metas[-1])
    assert load[0].block_ids == tuple(ex.blocks[2][2:4])
    for i in (2, 3):
        assert ex.block_bytes(ex.blocks[2][i]) == ex.expected_block(b.prompt, i)


def test_chunked_prefill(make_executor):
    """With chunked prefill each full block is offloaded after the chunk that completes it, exactly once."""
    ex = make_executor(chunk=5)
    rng = np.random.default_rng(9)
    a = Request(1, prompt(rng, 18))
    ex.add(a)
    for _ in range(4):
        ex.step()
    saved = [m.block_ids for meta in ex.metas for m in saves_of(meta)]
    ids = ex.blocks[1]
    assert saved == [(ids[0],), (ids[1],), (ids[2],), (ids[3],)]  # chunks end at tokens 5, 10, 15, 18
    ex.finish(a)
    ex.step()
    b = Request(2, list(a.prompt))
    assert ex.add(b) == (16, True)
    ex.step()
    for i in range(4):
        assert ex.block_bytes(ex.blocks[2][i]) == ex.expected_block(a.prompt, i)


def test_request_finished_holds_blocks_while_offload_in_flight(make_executor, monkeypatch):
    """request_finished returns True while the request's save is in flight; get_finished reports it only after
    the save completed, and only once the executor handed the id over."""
    ex = make_executor()
    rng = np.random.default_rng(4)
    a = Request(1, prompt(rng, 9))
    ex.add(a)
    store = ex.store
    real_poll = store.poll
    monkeypatch.setattr(store, "poll", lambda: [])  # the copy has not completed yet
    ex.step()
    assert ex.finish(a) is True
    assert ex.step() == ([], [])  # still in flight: blocks kept
    assert 1 in ex.blocks
    monkeypatch.setattr(store, "poll", real_poll)
    assert ex.step() == ([1], [])
    assert 1 not in ex.blocks
    # A request whose saves all finished is released at once; one with no full block never saved anything.
    b = Request(2, prompt(rng, 9))
    ex.add(b)
    ex.step()
    ex.step()
    assert ex.finish(b) is False
    c = Request(3, prompt(rng, 3))
    ex.add(c)
    ex.step()
    assert saves_of(ex.metas[-1]) == []
    assert ex.finish(c) is False
    ex.index.check_invariants()


def test_planned_save_keeps_blocks_and_unrun_step_is_dropped(make_executor):
    """A save bound for a step keeps the request's blocks before it starts; if that forward pass never runs, the
    next step's metadata drops it (its KV was never computed, so nothing is stored under its hashes)."""
    ex = make_executor()
    rng = np.random.default_rng(11)
    a = Request(1, prompt(rng, 9))
    ex.add(a)
    data, _ = ex._request_data(a)
    meta = ex.leader.build_connector_meta(standin.SchedulerOutput(new_requests=[data]))
    assert len(saves_of(meta)) == 1
    ex.worker.bind_connector_meta(meta)
    assert ex.leader.request_finished(a, ex.blocks[1]) is True
    ex.worker.bind_connector_meta(ex.leader.build_connector_meta(standin.SchedulerOutput()))
    ex.worker.wait_for_save(None)
    assert ex.worker.get_finished([1], []) == ([1], [])
    ex.settle()  # the leader takes the dropped store's failure: its pending slots are discarded
    pool = ex.index.pool("G2")
    assert not any(pool.contains(h) for h in saves_of(meta)[0].seq_hashes)
    assert ex.index.lookup(saves_of(meta)[0].seq_hashes).num_blocks == 0
    ex.index.check_invariants()


def test_worker_reports_only_ids_handed_over(make_executor):
    """A finished load is reported only after the executor passed the id in started_loading_req_ids."""
    ex = make_executor()
    rng = np.random.default_rng(5)
    a = Request(1, prompt(rng, 9))
    ex.serve(a)
    b = Request(2, a.prompt[:8] + prompt(rng, 2))
    ex.add(b)
    ex.new_loading.clear()  # the executor has not handed the id over yet
    assert ex.step() == ([], [])
    assert ex.worker.get_finished([], [2]) == ([], [2])


def test_failed_load_raises(make_executor):
    """A load that fails is never reported as loaded: get_finished raises KvbmLoadError naming the blocks; a load
    that succeeded in the same step is reported by the next call."""
    ex = make_executor(host_blocks=4)
    trt = sys.modules["kvbm.trtllm_integration.connector"]
    rng = np.random.default_rng(6)
    a, e = Request(1, prompt(rng, 9)), Request(5, prompt(rng, 9))
    for req in (a, e):
        ex.add(req)
        ex.step()
        ex.finish(req)
        ex.step()
    b = Request(2, a.prompt[:8] + prompt(rng, 2))
    d = Request(4, e.prompt[:8] + prompt(rng, 2))
    assert ex.add(b) == (8, True) and ex.add(d) == (8, True)
    # Storing 2 other blocks evicts A's (least recently looked up) before B's load is planned.
    store = ex.index.plan_store([7, 8], ex.blocks[2][:2]).moves[0]
    ex.index.complete(store.move_id, {0: "not run", 1: "not run"})
    with pytest.raises(trt.KvbmLoadError, match=f"request 2: engine block {ex.blocks[2][0]}: no longer stored"):
        ex.step()
    assert ex.worker.get_finished([], []) == ([], [4])
    assert ex.worker.get_finished([], [2]) == ([], [])
    for i in range(2):
        assert ex.block_bytes(ex.blocks[4][i]) == ex.expected_block(e.prompt, i)


def test_failed_transfer_raises_and_index_stays_consistent(make_executor, monkeypatch):
    """A load whose copy fails raises KvbmLoadError naming the request and the reason; the stored blocks stay in
    G2 (their bytes are not known bad) and the next request loads them byte-exact."""
    ex = make_executor()
    trt = sys.modules["kvbm.trtllm_integration.connector"]
    rng = np.random.default_rng(13)
    a = Request(1, prompt(rng, 9))
    ex.serve(a)
    assert ex.add(Request(2, a.prompt[:8] + prompt(rng, 2))) == (8, True)
    real_submit, engine = ex.store.transfers.submit, ex.store.cache("G1")

    def submit(src, dst, src_ids, dst_ids):
        if dst is engine:
            raise RuntimeError("injected")
        return real_submit(src, dst, src_ids, dst_ids)

    monkeypatch.setattr(ex.store.transfers, "submit", submit)
    with pytest.raises(trt.KvbmLoadError, match=r"request 2: engine block \d+: transfer failed: .*injected"):
        ex.step()
    monkeypatch.setattr(ex.store.transfers, "submit", real_submit)
    ex.settle()
    ex.index.check_invariants()
    c = Request(3, a.prompt[:8] + prompt(rng, 3))
    assert ex.add(c) == (8, True)
    ex.step()
    assert 3 in ex.running
    for i in range(2):
        assert ex.block_bytes(ex.blocks[3][i]) == ex.expected_block(a.prompt, i)


def test_unstarted_load_fails_its_request(make_executor):
    """A load bound for a step whose start_load_kv never ran is reported failed: the request raises KvbmLoadError
    once handed over, and the index releases the slots it held."""
    ex = make_executor()
    trt = sys.modules["kvbm.trtllm_integration.connector"]
    rng = np.random.default_rng(14)
    a = Request(1, prompt(rng, 9))
    ex.serve(a)
    assert ex.add(Request(2, a.prompt[:8] + prompt(rng, 2))) == (8, True)
    meta = ex.leader.build_connector_meta(standin.SchedulerOutput())
    assert [m.request_id for m in loads_of(meta)] == [2]
    ex.worker.bind_connector_meta(meta)
    assert ex.leader.request_finished(Request(2, []), ex.blocks[2]) is True  # its load is not reported yet
    ex.worker.bind_connector_meta(ex.leader.build_connector_meta(standin.SchedulerOutput()))
    with pytest.raises(trt.KvbmLoadError, match="request 2: its load never started"):
        ex.worker.get_finished([], [2])
    ex.settle()
    assert not ex.index.open_moves()
    ex.index.check_invariants()


def test_salt_and_multimodal(make_executor):
    """A different cache salt does not match; a multimodal request is neither matched nor saved."""
    ex = make_executor()
    rng = np.random.default_rng(7)
    a = Request(1, prompt(rng, 9), cache_salt_id=11)
    ex.serve(a)
    assert ex.leader.get_num_new_matched_tokens(Request(2, a.prompt, cache_salt_id=12), 0) == (0, False)
    assert ex.leader.get_num_new_matched_tokens(Request(3, a.prompt, cache_salt_id=11), 0) == (8, True)
    mm = Request(4, a.prompt, cache_salt_id=11, multimodal_hashes=[[1, 2]])
    assert ex.add(mm) == (0, False)
    ex.step()
    assert all(m.request_id != 4 for m in saves_of(ex.metas[-1]))


def test_many_requests_no_leaks(make_executor):
    """Dozens of requests with shared prefixes through a small G2: every block returns to the executor, every
    onboarded block holds the oracle bytes, the index's invariants hold."""
    ex = make_executor(host_blocks=12)
    rng = np.random.default_rng(8)
    prefixes = [prompt(rng, 8) for _ in range(3)]
    for i in range(40):
        req = Request(100 + i, prefixes[i % 3] + prompt(rng, int(rng.integers(1, 9))))
        matched, _ = ex.add(req)
        for _ in range(3):
            ex.step()
            if req.request_id in ex.running:
                break
        for k in range(matched // GEOM.block_size):
            assert ex.block_bytes(ex.blocks[req.request_id][k]) == ex.expected_block(req.prompt, k)
        ex.step()
        ex.finish(req)
        ex.step()
        ex.index.check_invariants()
    assert not ex.blocks and sorted(ex.free) == list(range(NUM_BLOCKS))
    hits = sum(len(loads_of(m)) for m in ex.metas)
    assert hits == 40 - 3, hits  # every request after the first of its prefix loads the prefix


def test_bad_setup_is_refused(trt):
    """A bad world size, a pool whose block size disagrees with the config, a non-pool tensor, a second worker."""
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        trt.DynamoKVBMConnectorLeader(llm_args(world_size=0))
    with pytest.raises(TypeError, match="kv_cache_config.tokens_per_block"):
        trt.DynamoKVBMConnectorLeader(SimpleNamespace(parallel_config=llm_args().parallel_config))
    pool = allocate("trtllm_pool", GEOM, 4, dtype=torch.bfloat16).tensors[0]
    w = trt.DynamoKVBMConnectorWorker(llm_args(tokens_per_block=8), config=config(host=4))
    with pytest.raises(ValueError, match="4 tokens per block"):
        w.register_kv_caches(pool)
    with pytest.raises(ValueError, match="trtllm_pool"):
        trt.DynamoKVBMConnectorWorker(llm_args(), config=config(host=4)).register_kv_caches(pool.transpose(3, 4))
    leader = trt.DynamoKVBMConnectorLeader(llm_args())
    with pytest.raises(RuntimeError, match="register_kv_caches"):
        leader.leader  # noqa: B018 - no worker registered yet
    w1 = trt.DynamoKVBMConnectorWorker(llm_args(), config=config(host=4))
    w1.register_kv_caches(pool)
    try:
        w2 = trt.DynamoKVBMConnectorWorker(llm_args(), config=config(host=4))
        with pytest.raises(RuntimeError, match="already registered"):
            w2.register_kv_caches(pool)
        with pytest.raises(TypeError, match="ConnectorMetadata"):
            w1.bind_connector_meta({"loads": []})
        with pytest.raises(ValueError, match="worker's KV cache has 4 tokens per block"):
            trt.DynamoKVBMConnectorLeader(llm_args(tokens_per_block=8)).get_num_new_matched_tokens(Request(1, [1]), 0)
    finally:
        w1.close()
    w3 = trt.DynamoKVBMConnectorWorker(llm_args(), config=config(host=4))
    w3.register_kv_caches(pool)  # the closed worker's registration is gone
    w3.close()


def test_leader_waits_for_its_worker_up_to_the_timeout(trt):
    """Before the worker registers, the leader matches and stores nothing (an empty plan each step, the engine keeps
    no block); registered within DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS it serves as usual; a worker still missing
    after that is an error naming rank 0."""
    from kvbm.connectors.registration import WorkersMissingError

    cfg = config(host=8, leader_worker_init_timeout_secs=1)
    leader = trt.DynamoKVBMConnectorLeader(llm_args(), config=cfg)
    assert leader.get_num_new_matched_tokens(Request(1, list(range(1, 10))), 0) == (0, False)
    meta = leader.build_connector_meta(standin.SchedulerOutput())
    assert meta.plan.is_empty() and leader.request_finished(Request(1, list(range(1, 10))), [0, 1, 2]) is False
    worker = trt.DynamoKVBMConnectorWorker(llm_args(), config=cfg)
    worker.register_kv_caches(allocate("trtllm_pool", GEOM, 4, dtype=torch.bfloat16).tensors[0])
    try:
        assert leader.get_num_new_matched_tokens(Request(2, list(range(1, 10))), 0) == (0, False)
        assert leader.workers.missing == [] and leader.leader.index.pool("G2").num_blocks == 8
        time.sleep(max(leader.workers.deadline - time.monotonic(), 0) + 0.05)
        assert leader.build_connector_meta(standin.SchedulerOutput()).plan.step == 1  # registered: no timeout
    finally:
        worker.close()
    late = trt.DynamoKVBMConnectorLeader(llm_args(), config=cfg)
    assert late.workers.timeout_s == 1
    time.sleep(max(late.workers.deadline - time.monotonic(), 0) + 0.05)
    with pytest.raises(WorkersMissingError, match=r"worker rank\(s\) 0 of 1 did not register .* "
                                                  r"DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS=1 s"):
        late.get_num_new_matched_tokens(Request(3, list(range(1, 10))), 0)


def test_import_without_tensorrt_llm_says_what_is_missing(tmp_path):
    """Without TensorRT-LLM (and no stand-in) the import fails with the package name and how to install it."""
    code = "import kvbm.trtllm_integration.connector"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode != 0
    assert "ImportError" in res.stderr
    assert "tensorrt_llm._torch.pyexecutor.kv_cache_connector" in res.stderr
    assert "pip install" in res.stderr and "tensorrt-llm" in res.stderr


# -- the leader's bookkeeping alone (no TensorRT-LLM involved) ----------------------------------------------------

def test_request_progress_hashes_incrementally_like_whole_prompt():
    """Blocks stored over many reports carry the hashes of all tokens hashed at once and the reported block ids;
    each block is planned once; drafts scheduled past the known tokens are not counted as valid."""
    from kvbm.config import KvbmConfig
    from kvbm.connectors.leader import ConnectorLeader
    from kvbm.hashing import salt_hash, sequence_hashes
    from kvbm.kernels.medium import Medium
    from kvbm.tiers import TierSpec
    from kvbm.trtllm_integration.metadata import RequestProgress

    rng = np.random.default_rng(10)
    tokens = prompt(rng, 23)
    salt = salt_hash("s", None)
    leader = ConnectorLeader([TierSpec("G2", Medium.HOST, 64)], KvbmConfig(), 4)
    t = RequestProgress(leader.track("5", salt), 4)

    def report(*args) -> None:
        t.report(*args)
        leader.plan_stores(t.state, t.tokens, t.valid_tokens // 4)

    report(tokens[:10], [9, 3, 7], 0, 6)
    report([], [], 6, 0)  # nothing new: nothing planned again
    report([], [], 6, 4)
    for p in range(10, 23):
        report([tokens[p]], [11 + p] if p % 4 == 0 else [], p, 3)  # 3 scheduled: 2 are drafts
        assert t.valid_tokens == p + 1
    moves = [m for job in leader.take_step().stores for m in job.moves]
    assert [h for m in moves for h in m.hashes] == sequence_hashes(tokens, 4, salt)
    assert [b for m in moves for b in m.src_ids] == [9, 3, 7, 23, 27]


def test_request_progress_rejects_bad_reports():
    from kvbm.connectors.leader import TrackedRequest
    from kvbm.trtllm_integration.metadata import RequestProgress

    t = RequestProgress(TrackedRequest("1", 0), 4)
    with pytest.raises(ValueError, match="computed_position must be >= 0, got -1"):
        t.report([1, 2], [0], -1, 1)
    with pytest.raises(TypeError, match="num_scheduled_tokens must be an int"):
        t.report([1, 2], [0], 0, 1.5)
    t = RequestProgress(TrackedRequest("1", 0), 4, valid_tokens=8, loaded=(4, 5))
    with pytest.raises(RuntimeError, match=r"loaded into cache blocks \[4, 5\] but the engine reports blocks "
                                           r"\[5, 4\]"):
        t.report(list(range(10)), [5, 4, 6], 0, 2)


def test_gb_sizes_give_both_sides_the_same_tiers(trt, monkeypatch):
    """Sized in GB, the leader's index and the worker's G2 hold the same number of blocks: the leader sizes its
    tiers for the block bytes the worker announced."""
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", str(GEOM.block_bytes * 10.5 / 1e9))
    w = trt.DynamoKVBMConnectorWorker(llm_args())
    w.register_kv_caches(allocate("trtllm_pool", GEOM, 4, dtype=torch.bfloat16).tensors[0])
    try:
        leader = trt.DynamoKVBMConnectorLeader(llm_args())
        assert leader.leader.index.pool("G2").num_blocks == w.worker.store.cache("G2").num_blocks == 10
    finally:
        w.close()


def test_worker_reads_dyn_kvbm_environment(trt, monkeypatch, tmp_path):
    """Built as TensorRT-LLM builds it (llm_args only), the worker sizes its tiers from DYN_KVBM_* variables."""
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "6")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "5")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path))
    w = trt.DynamoKVBMConnectorWorker(llm_args())
    w.register_kv_caches(allocate("trtllm_pool", GEOM, 4, dtype=torch.bfloat16).tensors[0])
    try:
        assert (w.worker.store.cache("G2").num_blocks, w.worker.store.cache("G3").num_blocks) == (6, 5)
        index = trt.DynamoKVBMConnectorLeader(llm_args()).leader.index  # the leader reads them too
        assert (index.pool("G2").num_blocks, index.pool("G3").num_blocks) == (6, 5)
        assert w.worker.store.cache("G3").file.directory == str(tmp_path)  # the G3 file (unnamed where allowed)
    finally:
        w.close()
    assert list(tmp_path.iterdir()) == []  # closing leaves nothing behind
