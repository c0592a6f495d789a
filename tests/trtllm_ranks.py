"""TEST HELPER: a TensorRT-LLM engine of several ranks, each rank's worker in a process of its own, on CPU tensors.

Plays what TensorRT-LLM's ``KvCacheConnectorManager`` does around the connector pair: the leader runs on rank 0
(this process, beside rank 0's worker); each step its metadata goes to every rank (pickled, as MPI's broadcast
sends it); every rank runs its worker in the executor's call order over its own pool and "forward pass"; a request
counts as finished saving or loading once every rank's ``get_finished`` has returned it (the all-gather and
intersection), each rank keeping the ids it returned until then. Ranks split the model as tensor parallelism does
(every rank all layers, its own heads: its own bytes) or pipeline parallelism does (each rank its stage's layers,
numbered globally). A token's KV is random, never zero, and differs per rank and layer; pools start poisoned and a
block is poisoned again whenever it is allocated.
"""
from __future__ import annotations

import importlib
import multiprocessing
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

import trtllm_standin as standin
from kvbm.layouts import KVGeometry, allocate

POISON = 0xA5
BLOCK_SIZE = 4
NUM_BLOCKS = 32


@dataclass(frozen=True)
class Split:
    """How the model's layers fall on the ranks: ``layers`` per rank and the global number of each rank's first."""

    layers: tuple[int, ...]
    first: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.layers)

    def geometry(self, rank: int) -> KVGeometry:
        return KVGeometry(num_layers=self.layers[rank], num_kv=2, block_size=BLOCK_SIZE, num_heads=2, head_dim=16,
                          itemsize=2)


TENSOR_PARALLEL = Split((3, 3), (0, 0))
PIPELINE_PARALLEL = Split((2, 1), (0, 2))


def llm_args(world_size: int) -> SimpleNamespace:
    """The parts of TorchLlmArgs the connector reads."""
    mapping = SimpleNamespace(world_size=world_size)
    return SimpleNamespace(kv_cache_config=SimpleNamespace(tokens_per_block=BLOCK_SIZE),
                           parallel_config=SimpleNamespace(to_mapping=lambda: mapping))


def token_kv(rank: int, prefix: tuple[int, ...], layer: int) -> torch.Tensor:
    """KV of the last token of ``prefix`` in global ``layer`` on ``rank``: [2, heads, head_dim] random bf16 bits."""
    rng = np.random.default_rng([rank, layer, len(prefix), *prefix])
    return torch.from_numpy(rng.integers(1, 2**15, (2, 2, 16), dtype=np.int16)).view(torch.bfloat16)


def expected_block(split: Split, rank: int, tokens: list[int], index: int) -> bytes:
    """The oracle bytes of block ``index`` on ``rank`` of a sequence starting with ``tokens``."""
    g = split.geometry(rank)
    out = torch.empty((g.num_layers, 2, g.num_heads, BLOCK_SIZE, g.head_dim), dtype=torch.bfloat16)
    for layer in range(g.num_layers):
        for slot in range(BLOCK_SIZE):
            p = index * BLOCK_SIZE + slot
            out[layer, :, :, slot, :] = token_kv(rank, tuple(tokens[:p + 1]), split.first[rank] + layer)
    return out.contiguous().view(torch.uint8).numpy().tobytes()


class RankWorker:
    """One rank's worker, pool and forward pass."""

    def __init__(self, trt, split: Split, rank: int, config, use_callable: bool) -> None:
        standin.set_rank(rank)
        self.split, self.rank = split, rank
        self.worker = trt.DynamoKVBMConnectorWorker(llm_args(split.world_size), config=config)
        self.pool = allocate("trtllm_pool", split.geometry(rank), NUM_BLOCKS, dtype=torch.bfloat16).tensors[0]
        self.pool.view(torch.uint8).fill_(POISON)
        self.worker.register_kv_caches(self.pool)
        self.callable = self.worker.register_forward_pass_callable() if use_callable else None
        self._real_submit = None

    def poison(self, blocks: list[int]) -> None:
        for b in blocks:
            self.pool[b].view(torch.uint8).fill_(POISON)

    def step(self, meta, computes: list[tuple[list[int], list[int], int, int]], saving: list[int],
             loading: list[int]) -> tuple[list[int], list[int]]:
        """One executor step on this rank: ``computes`` are (tokens, block ids, first position, tokens computed)."""
        w = self.worker
        w.bind_connector_meta(meta)
        w.start_load_kv(None)
        for local in range(self.split.layers[self.rank]):
            layer = self.split.first[self.rank] + local
            w.wait_for_layer_load(layer, None)
            for tokens, blocks, start, n in computes:
                for p in range(start, start + n):
                    self.pool[blocks[p // BLOCK_SIZE], local, :, :, p % BLOCK_SIZE, :] = token_kv(
                        self.rank, tuple(tokens[:p + 1]), layer)
            w.save_kv_layer(layer, None)
        if self.callable is not None:
            self.callable()
        w.wait_for_save(None)
        return w.get_finished(saving, loading)

    def settle(self) -> tuple[list[int], list[int]]:
        """Wait for this rank's moves in flight and post their results."""
        self.worker.worker.store.wait_all()
        return self.worker.get_finished([], [])

    def fail_loads(self, on: bool) -> None:
        """Make copies into the engine's pool fail on this rank (``on``), or work again."""
        transfers = self.worker.worker.store.transfers
        engine = self.worker.worker.store.cache("G1")
        if on:
            real = self._real_submit = transfers.submit

            def submit(src, dst, *args, **kw):
                if dst is engine:
                    raise RuntimeError(f"injected on rank {self.rank}")
                return real(src, dst, *args, **kw)

            transfers.submit = submit
        elif self._real_submit is not None:
            transfers.submit, self._real_submit = self._real_submit, None

    def block(self, block: int) -> bytes:
        return self.pool[block].contiguous().view(torch.uint8).numpy().tobytes()

    def g2_blocks(self) -> int:
        return self.worker.worker.store.cache("G2").num_blocks

    def close(self) -> None:
        self.worker.close()


def _import_connector():
    standin.install()
    sys.modules.pop("kvbm.trtllm_integration.connector", None)
    return importlib.import_module("kvbm.trtllm_integration.connector")


def _serve(conn, split: Split, rank: int, config, use_callable: bool) -> None:
    """A rank's process: runs the commands rank 0 sends; answers ("ok", result) or ("error", type, message)."""
    trt = _import_connector()
    rw = RankWorker(trt, split, rank, config, use_callable)
    conn.send(("ok", None))
    while True:
        name, args = conn.recv()
        try:
            result = getattr(rw, name)(*args)
        except Exception as e:
            conn.send(("error", type(e).__name__, str(e)))
            continue
        conn.send(("ok", result))
        if name == "close":
            return


class RemoteRank:
    """A rank's worker in a process of its own, driven over a pipe."""

    def __init__(self, split: Split, rank: int, config, use_callable: bool) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, split, rank, config, use_callable), daemon=True)
        self.process.start()
        child.close()
        self.answer()

    def send(self, name: str, *args: Any) -> None:
        self.conn.send((name, args))

    def answer(self, timeout_s: float = 300.0) -> tuple:
        if not self.conn.poll(timeout_s):
            raise AssertionError("a rank's process did not answer")
        return self.conn.recv()

    def call(self, name: str, *args: Any) -> Any:
        self.send(name, *args)
        reply = self.answer()
        if reply[0] != "ok":
            raise AssertionError(f"rank process: {reply[1]}: {reply[2]}")
        return reply[1]

    def close(self) -> None:
        try:
            self.call("close")
        finally:
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()


class RankedExecutor:
    """The leader and rank 0's worker here, the other ranks in processes of their own (see the module docstring)."""

    def __init__(self, split: Split, config, *, use_callable: bool = True, seed: int = 0) -> None:
        self.trt = _import_connector()
        self.split = split
        standin.set_rank(0)
        self.leader = self.trt.DynamoKVBMConnectorLeader(llm_args(split.world_size), config=config)
        self.remotes = [RemoteRank(split, r, config, use_callable) for r in range(1, split.world_size)]
        self.local = RankWorker(self.trt, split, 0, config, use_callable)
        self.free = [int(b) for b in np.random.default_rng(seed).permutation(NUM_BLOCKS)]
        self.blocks: dict[int, list[int]] = {}
        self.position: dict[int, int] = {}
        self.reported: dict[int, tuple[int, int]] = {}
        self.external: dict[int, int] = {}
        self.running: dict[int, Any] = {}
        self.loading: dict[int, Any] = {}
        self.new_loading: list[int] = []
        self.new_saving: list[int] = []
        self.local_done = [(set(), set()) for _ in range(split.world_size)]  # per rank: returned, not by all yet
        self.metas: list = []

    def close(self) -> None:
        for remote in self.remotes:
            remote.close()
        self.local.close()
        standin.uninstall()
        sys.modules.pop("kvbm.trtllm_integration.connector", None)

    def add(self, req, num_computed_tokens: int = 0) -> tuple[int, bool]:
        """Admit a request (`trtllm_standin.admit`), its fresh blocks poisoned on every rank."""
        return standin.admit(self, req, num_computed_tokens, BLOCK_SIZE, self._poison)

    def _poison(self, blocks: list[int]) -> None:
        self.local.poison(blocks)
        for remote in self.remotes:
            remote.call("poison", blocks)

    def step(self) -> tuple[list[int], list[int], dict[int, str]]:
        """One step on every rank: (done saving, done loading) by all ranks, and the errors ranks raised (rank ->
        "Type: message"); nothing is done on any rank that raised."""
        out, computes = standin.SchedulerOutput(), []
        for req in self.running.values():
            rid, tokens = req.request_id, req.get_tokens(0)
            pos = self.position[rid]
            if pos == len(tokens):
                continue
            done_tokens, done_blocks = self.reported.get(rid, (0, 0))
            self.reported[rid] = (len(tokens), len(self.blocks[rid]))
            if pos < len(req.prompt):
                computed, scheduled = pos - self.external.get(rid, 0), len(req.prompt) - pos
            else:
                computed, scheduled = len(tokens) - 1, 1
            data = standin.RequestData(rid, tokens[done_tokens:], self.blocks[rid][done_blocks:], computed, scheduled)
            (out.new_requests if done_tokens == 0 else out.cached_requests).append(data)
            computes.append((list(tokens), list(self.blocks[rid]), pos, scheduled))
        self.external.clear()
        meta = self.leader.build_connector_meta(out)
        self.metas.append(meta)
        saving, self.new_saving = self.new_saving, []
        loading, self.new_loading = self.new_loading, []
        for remote in self.remotes:  # (they run while rank 0 does)
            remote.send("step", meta, computes, saving, loading)
        results: list[tuple] = []
        try:
            results.append(("ok", self.local.step(meta, computes, saving, loading)))
        except Exception as e:
            results.append(("error", type(e).__name__, str(e)))
        results += [remote.answer() for remote in self.remotes]
        for data in out.new_requests + out.cached_requests:
            self.position[data.request_id] += data.num_scheduled_tokens
        return self._gather(results)

    def settle(self, max_steps: int = 500) -> None:
        """Empty steps until every planned move is done and reported by every rank."""
        for _ in range(max_steps):
            self.local.settle()
            for remote in self.remotes:
                remote.call("settle")
            if not self.leader.leader.index.open_moves():
                return
            self.step()
        raise AssertionError(f"moves still open after {max_steps} steps")

    def _gather(self, results: list[tuple]) -> tuple[list[int], list[int], dict[int, str]]:
        errors = {}
        for rank, reply in enumerate(results):
            if reply[0] != "ok":
                errors[rank] = f"{reply[1]}: {reply[2]}"
                continue
            saving, loading = reply[1]
            self.local_done[rank][0].update(saving)
            self.local_done[rank][1].update(loading)
        done_saving = set.intersection(*(s for s, _ in self.local_done))
        done_loading = set.intersection(*(ld for _, ld in self.local_done))
        for s, ld in self.local_done:
            s -= done_saving
            ld -= done_loading
        for rid in done_loading:
            self.running[rid] = self.loading.pop(rid)
        for rid in done_saving:
            standin.free(self, rid)
        return sorted(done_saving), sorted(done_loading), errors

    def finish(self, req) -> bool:
        """The request is done (`trtllm_standin.finish`)."""
        return standin.finish(self, req)

    def rank_block(self, rank: int, block: int) -> bytes:
        return self.local.block(block) if rank == 0 else self.remotes[rank - 1].call("block", block)
