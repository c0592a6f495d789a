"""A one-request-at-a-time engine around `DecoderModel` (or its `GraphedPrefill`): G1 blocks with a prefix cache,
and kvbm called in vLLM's order.

Per request (`Engine.run_request`): hash the prompt's full blocks; match the G1 prefix cache; look the rest up in
kvbm (`ConnectorLeader.lookup`); allocate G1 blocks; plan the load into them (`plan_load`, `take_step`); start it
(`ConnectorWorker.start_loads`) and poll until the request's load is done (``poll``, ``take_report`` -> ``apply``
each step); plan the stores of the blocks the forward completes (`plan_stores`, `take_step`); run the forward;
start the stores (`start_stores`, as vLLM's ``wait_for_save`` after the forward); sample the first token. TTFT
ends there. Every side the engine serves (`Engine.sides`) whose scheduler side has kvbm's cost rule is given that
step's prefilled tokens and seconds (the forward through the sampled token), from which the rule learns the prefill
rate: a served connector times every step of its engine, whichever requests the step serves (those without kvbm
hits, and those of the benchmark's other modes, included). Then, untimed: the answer's tokens
run through one teacher-forced forward (their KV exists, as after decoding), the finished request stores its
remaining full blocks and its G1 blocks are released (registered in the prefix cache) once its stores are done.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvbm.config import KvbmConfig
from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.messages import StepPlan
from kvbm.connectors.worker import ConnectorWorker
from kvbm.hashing import sequence_hashes
from kvbm.layouts.vllm_tensors import describe_vllm_kv_caches
from kvbm.tiers import DISK_TIER, kvbm_tiers

from .graphs import GraphedPrefill
from .model import BLOCK_SIZE, DecoderModel

__all__ = ["Engine", "G1Pool", "KvbmSide", "Reference", "RequestResult", "sync"]

POLL_SLEEP_S = 2e-5


def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stored_pairs(plan: StepPlan) -> list[tuple[int, int]]:
    """``(hash, G1 block)`` of every block a step's plan stores from the engine."""
    return [pair for store in plan.stores for move in store.moves for pair in zip(move.hashes, move.src_ids)]


class G1Pool:
    """The engine's G1 blocks with vLLM-style prefix caching: a block computed in full is registered under its
    sequence hash and matched by later prompts while in use or free; free blocks are reused least recently freed
    first, dropping their hash."""

    def __init__(self, block_ids: Sequence[int]) -> None:
        self.block_ids = list(block_ids)
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in self.block_ids)
        self.hash_of: dict[int, int] = {}
        self.block_of: dict[int, int] = {}
        self.refs: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated (cached ones included)."""
        return len(self.free)

    def match(self, hashes: Sequence[int]) -> list[int]:
        """Blocks holding the longest cached run of ``hashes`` (taken by the caller)."""
        out = []
        for h in hashes:
            b = self.block_of.get(h)
            if b is None:
                break
            out.append(b)
        for b in out:
            self.free.pop(b, None)
            self.refs[b] = self.refs.get(b, 0) + 1
        return out

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks, evicting the least recently freed cached ones; RuntimeError when too few are free."""
        if n > len(self.free):
            raise RuntimeError(f"G1 has {len(self.free)} free blocks, {n} needed")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.hash_of.pop(b, None)
            if h is not None:
                del self.block_of[h]
            self.refs[b] = 1
            out.append(b)
        return out

    def register(self, blocks: Sequence[int], hashes: Sequence[int]) -> None:
        """Full blocks now computed: ``blocks[i]`` holds ``hashes[i]`` (a hash already cached keeps its block)."""
        for b, h in zip(blocks, hashes):
            if b not in self.hash_of and h not in self.block_of:
                self.hash_of[b], self.block_of[h] = h, b

    def release(self, blocks: Sequence[int]) -> None:
        """Give back a request's blocks; the tail is freed first, so it is evicted first (as vLLM does)."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if not self.refs[b]:
                del self.refs[b]
                self.free[b] = None

    def reset(self) -> None:
        """Forget every cached block (vLLM's ``reset_prefix_cache``); needs no block in use."""
        if self.refs:
            raise RuntimeError(f"{len(self.refs)} G1 blocks are in use")
        self.hash_of.clear()
        self.block_of.clear()


class KvbmSide:
    """One kvbm instance over the engine's G1 caches: the scheduler side (``leader``) and one rank's worker side."""

    def __init__(self, name: str, config: KvbmConfig, kv_caches: Sequence[torch.Tensor], *,
                 layer_stores_by_default: bool) -> None:
        self.name = name
        cache = describe_vllm_kv_caches({f"model.layers.{i}.self_attn": t for i, t in enumerate(kv_caches)})
        self.block_bytes = cache.geometry.block_bytes
        self.tiers = kvbm_tiers(config, self.block_bytes)
        self.config = config
        #: Whether requests store per layer group when not told (``DYN_KVBM_LAYERWISE_STORE``, as the library's
        #: vLLM connector does); the side's own config has layer-wise stores available either way.
        self.layer_stores_by_default = layer_stores_by_default
        # With the block's bytes the leader keeps the cost rule's estimates, as the library's connectors do; they
        # size the layer groups of layer-wise loads. Its hit decisions are off here: the cost-rule rows turn a rule
        # on (`bench.ttft.cost_rule`), every other row loads what it finds.
        self.leader = ConnectorLeader(self.tiers, config, BLOCK_SIZE, block_bytes=self.block_bytes)
        self.leader.cost.enabled = False
        self.worker = ConnectorWorker(cache, self.tiers, config)
        self.worker.prepare_transfers()  # as the library's vLLM connector does once the caches are registered

    @classmethod
    def create(cls, name: str, kv_caches: Sequence[torch.Tensor], *, host_blocks: int = 0, disk_blocks: int = 0,
               disk_io: str = "posix", disk_dir: Path | None = None) -> KvbmSide:
        """A G2-only (``host_blocks``) or G3-only (``disk_blocks``) instance; other settings from ``DYN_KVBM_*``,
        with layer-wise stores available (used by requests run with ``layer_stores``)."""
        base = KvbmConfig.from_env()
        config = dataclasses.replace(
            base, layerwise_store=True, cpu_cache_gb=None, disk_cache_gb=None,
            cpu_cache_override_num_blocks=host_blocks or None,
            disk_cache_override_num_blocks=disk_blocks or None, disk_io=disk_io,
            disk_cache_dir=Path(tempfile.mkdtemp(prefix="kvbm-ttft-", dir=disk_dir)) if disk_blocks else
            base.disk_cache_dir)
        return cls(name, config, kv_caches, layer_stores_by_default=base.layerwise_store)

    @property
    def tier(self) -> str:
        """The tier blocks are loaded from."""
        return self.tiers[0].name

    @property
    def disk_note(self) -> str:
        """How the disk tier's file does I/O ("" without a disk tier)."""
        disk = self.worker.store.caches.get(DISK_TIER)
        if disk is None:
            return ""
        if getattr(disk.file, "o_direct", False):
            return "O_DIRECT"
        return "buffered I/O (the filesystem refused O_DIRECT: reads may come from the page cache)"

    def step(self) -> tuple[set[str], set[str]]:
        """One engine step's connector output: ``(finished sending, finished receiving)``, results applied."""
        sending, recving = self.worker.poll()
        report = self.worker.take_report()
        if report is not None:
            self.leader.apply(report)
        return sending, recving

    def close(self) -> None:
        """Finish transfers, release the tiers, remove the disk tier's folder."""
        self.worker.close()
        if DISK_TIER in (t.name for t in self.tiers):
            directory = self.config.disk_cache_dir
            for path in directory.glob("*"):
                path.unlink(missing_ok=True)
            directory.rmdir()


class Reference:
    """Bytes of blocks as stored, by sequence hash, to check loaded blocks against (byte-exact)."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], capacity: int) -> None:
        self.caches = kv_caches
        # the working set can outgrow G1: each store has room for ``capacity`` blocks, however many G1 holds
        self.store = [t.new_empty((t.shape[0], capacity, *t.shape[2:])) for t in kv_caches]
        self.slot_of: dict[int, int] = {}
        self.capacity = capacity

    def record(self, hashes: Sequence[int], blocks: Sequence[int], *, replace: bool = False) -> None:
        """Keep the bytes of ``blocks`` (holding ``hashes``) not recorded yet; with ``replace``, also of those
        recorded already (a block stored again holds its new computation's bytes: a prefill of another shape
        rounds differently)."""
        pairs = dict(zip(hashes, blocks))  # (a hash twice: one block's bytes)
        new = [(h, b) for h, b in pairs.items() if replace or h not in self.slot_of]
        if not new:
            return
        fresh = [h for h, _ in new if h not in self.slot_of]
        if len(self.slot_of) + len(fresh) > self.capacity:
            raise RuntimeError(f"reference store full ({self.capacity} blocks)")
        for h in fresh:
            self.slot_of[h] = len(self.slot_of)
        src = torch.tensor([b for _, b in new], device=self.caches[0].device)
        dst = torch.tensor([self.slot_of[h] for h, _ in new], device=self.caches[0].device)
        for ref, cache in zip(self.store, self.caches):
            ref[:, dst] = cache[:, src]

    def check(self, hashes: Sequence[int], blocks: Sequence[int]) -> tuple[int, int]:
        """``(blocks identical to their recorded bytes, blocks with no record)``."""
        known = [(self.slot_of[h], b) for h, b in zip(hashes, blocks) if h in self.slot_of]
        if not known:
            return 0, len(blocks)
        dev = self.caches[0].device
        slots = torch.tensor([s for s, _ in known], device=dev)
        ids = torch.tensor([b for _, b in known], device=dev)
        same = torch.ones(len(known), dtype=torch.bool, device=dev)
        for ref, cache in zip(self.store, self.caches):
            a = cache[:, ids].transpose(0, 1).reshape(len(known), -1).view(torch.uint8)
            r = ref[:, slots].transpose(0, 1).reshape(len(known), -1).view(torch.uint8)
            same &= (a == r).all(dim=1)
        return int(same.sum()), len(blocks) - len(known)


@dataclass
class RequestResult:
    """What one request measured: TTFT and its parts, where its prompt's KV came from, the byte check."""

    request_id: str
    prompt_tokens: int
    ttft_s: float
    load_wait_s: float = 0.0
    block_wait_s: float = 0.0  #: of ``load_wait_s``: waiting for free G1 blocks that stores still read
    forward_s: float = 0.0
    g1_hit_tokens: int = 0
    loaded_tokens: int = 0
    computed_tokens: int = 0
    load_errors: int = 0
    checked_blocks: int = 0
    bad_blocks: int = 0
    unchecked_blocks: int = 0
    tier: str | None = None
    notes: list[str] = field(default_factory=list)


class Engine:
    """The model, its G1 caches and pool, and the kvbm sides it offloads to (see the module docstring)."""

    def __init__(self, model: DecoderModel | GraphedPrefill, kv_caches: list[torch.Tensor], pool: G1Pool) -> None:
        self.model = model
        self.caches = kv_caches
        self.pool = pool
        self.device = model.device
        self._held: dict[str, tuple[KvbmSide, list[int]]] = {}
        self._count = 0
        #: The kvbm sides whose cost rules learn from every prefill step the engine runs (see the module docstring).
        self.sides: list[KvbmSide] = []

    def poison(self) -> None:
        """Overwrite every free G1 block (NaN), so a block the load did not write cannot pass the byte check."""
        free = list(self.pool.free)
        if free:
            ids = torch.tensor(free, device=self.device)
            for cache in self.caches:
                cache[:, ids] = float("nan")

    def evict_all(self) -> None:
        """Drop the G1 prefix cache and poison the freed blocks (a prefix must then come from kvbm or compute)."""
        self.finish_held()
        self.pool.reset()
        self.poison()

    def abandon(self, side: KvbmSide) -> None:
        """Forget ``side`` after it failed mid-request: drop what it holds and start from an empty G1 pool."""
        self.sides = [s for s in self.sides if s is not side]
        self._held = {rid: held for rid, held in self._held.items() if held[0] is not side}
        if self._held:
            self.finish_held()
        self.pool = G1Pool(self.pool.block_ids)
        self.poison()

    def _release_sent(self, side: KvbmSide, sending: set[str]) -> None:
        for rid in sending:
            held = self._held.get(rid)
            if held is not None and held[0] is side:
                del self._held[rid]
                self.pool.release(held[1])

    def _step_held(self, sides: Sequence[KvbmSide]) -> None:
        for side in sides:
            self._release_sent(side, side.step()[0])

    def finish_held(self) -> None:
        """Wait for the stores of finished requests, then release their G1 blocks."""
        while self._held:
            self._step_held({id(s): s for s, _ in self._held.values()}.values())
            time.sleep(POLL_SLEEP_S)

    def drain(self, sides: Sequence[KvbmSide]) -> None:
        """Step ``sides`` until every move is done and reported, and finished requests' blocks are released."""
        while self._held or not all(s.worker.idle() for s in sides):
            for side in sides:
                self._release_sent(side, side.step()[0])
            time.sleep(POLL_SLEEP_S)

    def _allocate(self, n: int, sides: Sequence[KvbmSide]) -> tuple[list[int], float]:
        """``n`` free G1 blocks, and the seconds spent waiting for blocks that stores still read to come back."""
        t0 = time.perf_counter()
        waited = False
        while self.pool.num_free < n and self._held:
            waited = True
            self._step_held({id(s): s for s, _ in self._held.values()}.values())
            time.sleep(POLL_SLEEP_S)
        return self.pool.allocate(n), (time.perf_counter() - t0 if waited else 0.0)

    def _table(self, blocks: Sequence[int]) -> torch.Tensor:
        return torch.tensor(blocks, dtype=torch.long, device=self.device)

    def _tokens(self, tokens: Sequence[int]) -> torch.Tensor:
        return torch.tensor(tokens, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def run_request(self, prompt: Sequence[int], sides: Sequence[KvbmSide] = (), *, answer: Sequence[int] = (),
                    reference: Reference | None = None, record: Reference | None = None,
                    request_id: str | None = None, layerwise: bool = False, salt: int = 0,
                    layer_stores: bool | None = None) -> RequestResult:
        """Serve one request (see the module docstring); loads come from ``sides[0]`` only, stores go to every
        side; ``layerwise``: the load runs beside the forward, each layer's attention waiting for its own layers
        (as vLLM's ``wait_for_layer_load``); ``layer_stores``: the stores of the prompt's blocks start per group of
        layers as the forward saves each layer (as vLLM's ``save_kv_layer``, for sides with
        ``DYN_KVBM_LAYERWISE_STORE``; None: as that variable says for every side). ``salt`` seeds the block hashes
        (as a request's cache salt does), so requests of different salts share no block. After TTFT, loaded blocks
        are checked against ``reference``, and the bytes of every block the request stored are recorded in
        ``record``."""
        self._count += 1
        rid = request_id or f"req-{self._count}"
        n = len(prompt)
        prompt = list(prompt)
        for side in sides:  # the previous step's connector output, as vLLM's runner reports it after every step
            self._release_sent(side, side.step()[0])
        sync(self.device)
        t0 = time.perf_counter()
        full = n // BLOCK_SIZE
        hashes = sequence_hashes(prompt[:full * BLOCK_SIZE], BLOCK_SIZE, salt)
        states = [side.leader.track(rid, salt) for side in sides]
        for state in states:
            state.hashes = list(hashes)
        local = self.pool.match(hashes[:(n - 1) // BLOCK_SIZE])
        found = 0
        side = sides[0] if sides else None
        if side is not None and full > len(local):
            found, _ = side.leader.lookup(hashes[len(local):full], whole_prompt=n == full * BLOCK_SIZE)
        fresh, block_wait_s = self._allocate(-(-n // BLOCK_SIZE) - len(local), sides)
        blocks = local + fresh
        first, valid = len(local), len(local)
        load_errors: set[int] = set()
        before_attention = None
        if found:
            side.leader.plan_load(rid, hashes[first:first + found], blocks[first:first + found], layerwise=layerwise)
            states[0].loading = not layerwise
            plan = side.leader.take_step(step_tokens=n - (first + found) * BLOCK_SIZE if layerwise else 0)
            side.worker.start_loads(plan.loads, plan.layer_ratio)
            side.worker.start_cascades(plan.cascades)
            if layerwise:
                before_attention = side.worker.wait_for_layer
                valid = first + found
        if found and not layerwise:
            while True:
                sending, recving = side.step()
                self._release_sent(side, sending)
                if rid in recving:
                    break
                time.sleep(POLL_SLEEP_S)
            states[0].loading = False
            load_errors = side.worker.take_load_errors()
            side.worker.take_failed_loads()
            bad = [i for i in range(first, first + found) if blocks[i] in load_errors]
            valid = bad[0] if bad else first + found
        t_loaded = time.perf_counter()
        num_cached = valid * BLOCK_SIZE
        plans = []
        for s, state in zip(sides, states):
            state.block_ids, state.saved = list(blocks), 0
            s.leader.plan_stores(state, prompt, full)
            plans.append(s.leader.take_step())
        stored = [pair for plan in plans for pair in _stored_pairs(plan)]
        table = self._table(blocks)
        after_attention = None
        if layer_stores is None:
            layer_stores = bool(sides) and all(s.layer_stores_by_default for s in sides)
        if layer_stores:
            for s, plan in zip(sides, plans):
                s.worker.begin_layer_stores(plan.stores)

            def after_attention(layer: int) -> None:
                for s in sides:
                    s.worker.save_layer(layer)
        logits = self.model.prefill(self._tokens(prompt[num_cached:]), self.caches, table, num_cached,
                                    before_attention, after_attention)
        for s, plan in zip(sides, plans):
            s.worker.start_stores(plan.stores)
        if before_attention is not None:  # (as vLLM's get_block_ids_with_load_errors after the forward)
            side.worker.finish_layerwise_loads()
            load_errors = side.worker.take_load_errors()
            side.worker.take_failed_loads()
            self._release_sent(side, side.step()[0])
        int(logits.argmax())
        t1 = time.perf_counter()
        for s in dict.fromkeys([*sides, *self.sides]):  # as a served connector times each step that prefills
            if s.leader.cost is not None:
                s.leader.cost.observe_prefill(n - num_cached, t1 - t_loaded)
        result = RequestResult(rid, n, t1 - t0, load_wait_s=t_loaded - t0, block_wait_s=block_wait_s,
                               forward_s=t1 - t_loaded,
                               g1_hit_tokens=first * BLOCK_SIZE, loaded_tokens=(valid - first) * BLOCK_SIZE,
                               computed_tokens=n - num_cached, load_errors=len(load_errors),
                               tier=side.tier if found else None)
        if found and reference is not None:
            ok, unknown = reference.check(hashes[first:valid], blocks[first:valid])
            result.checked_blocks = valid - first - unknown
            result.bad_blocks = result.checked_blocks - ok
            result.unchecked_blocks = unknown
        tokens = prompt + list(answer)
        if answer:
            more = -(-len(tokens) // BLOCK_SIZE) - len(blocks)
            blocks += self._allocate(more, sides)[0]
            table = self._table(blocks)
            self.model.prefill(self._tokens(list(answer)), self.caches, table, n)
        all_hashes = sequence_hashes(tokens[:len(tokens) // BLOCK_SIZE * BLOCK_SIZE], BLOCK_SIZE, salt)
        self.pool.register(blocks, all_hashes)
        stored += self._finish(rid, sides, states, tokens, blocks)
        if record is not None:  # (the blocks released by _finish are not reused before the next request)
            sync(self.device)
            record.record([h for h, _ in stored], [b for _, b in stored], replace=True)
        return result

    def _finish(self, rid: str, sides: Sequence[KvbmSide], states: list, tokens: list[int],
                blocks: list[int]) -> list[tuple[int, int]]:
        """vLLM's ``request_finished``: store the remaining full blocks, hold the G1 blocks while stores run; the
        ``(hash, G1 block)`` pairs it stored."""
        busy_sides, stored = [], []
        for s, state in zip(sides, states):
            state.block_ids = list(blocks)
            s.leader.plan_stores(state, tokens, len(tokens) // BLOCK_SIZE)
            busy = s.leader.busy(rid)
            s.leader.forget(rid)
            plan = s.leader.take_step(held=[rid] if busy else [])
            stored += _stored_pairs(plan)
            s.worker.start_stores(plan.stores)
            s.worker.hold(plan.held)
            if busy:
                busy_sides.append(s)
        if not busy_sides:
            self.pool.release(blocks)
            return stored
        for s in busy_sides[1:]:  # the G1 blocks wait for every side's stores: all but one are waited for here
            while True:
                sending = s.step()[0]
                self._release_sent(s, sending)
                if rid in sending:
                    break
                time.sleep(POLL_SLEEP_S)
        self._held[rid] = (busy_sides[0], blocks)
        return stored
