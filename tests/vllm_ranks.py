"""Multi-rank harness: vLLM 0.33's real scheduler with N emulated worker ranks (tensor x pipeline parallel), on CPU.

vLLM's multiprocessing executor needs GPUs; this harness stands in for it. Each rank is a
``vllm_harness.WorkerHarness`` holding only its shard of the KV cache (its KV heads under tensor parallelism, its
layers under pipeline parallelism) with its own worker-role connector, built from its own ``VllmConfig``
(``parallel_config.rank`` set as vLLM's worker does). Every step each rank receives the same pickled
``SchedulerOutput`` (and connector metadata inside it), runs it in the V1 runner order, and its
``ModelRunnerOutput`` is aggregated by vLLM's own ``KVOutputAggregator`` (finished sets counted over ranks, invalid
block ids unioned, worker metadata ``aggregate``d), as ``MultiprocExecutor`` does. Every rank byte-checks the KV it
reads against the deterministic model restricted to its heads and layers. With ``mla`` the model's KV is one latent
per token (``MLAAttentionSpec``, ``2 * head_dim`` wide), the same on every tensor-parallel rank.

Ranks run in this process (``ranks="inline"``, one after the other) or as spawned OS processes (``"process"``,
each importing vLLM itself, ~15 s); processes are always stopped on close, with timeouts.
"""
from __future__ import annotations

import vllm_harness as H  # first: imports vLLM for the CPU platform, clear of the repo's kernels/ folder

import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.distributed.utils import get_pp_indices
from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups, get_kv_cache_configs
from vllm.v1.core.kv_cache_utils import (
    generate_scheduler_kv_cache_config,
    resolve_cache_hit_alignment_tokens,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, MLAAttentionSpec
from vllm.v1.outputs import ModelRunnerOutput

from kvbm.kernels.block_transfer import BlockTransfer
from kvbm.leader.plans import MoveKind

RankMode = Literal["inline", "process"]
_WorkerHarness = H.WorkerHarness  # the harness replaces the module's name while it builds its ranks
#: Seconds a rank process may take to start (it imports vLLM) and to answer one call.
START_TIMEOUT_S, CALL_TIMEOUT_S = 120.0, 60.0


# --------------------------------------------------------------------------------------------------
# One rank's shard of the model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankModelSpec(H.TinyModelSpec):
    """The shard of the tiny model one rank holds: its KV heads, and layers from ``first_layer`` (global names)."""

    first_layer: int = 0

    def layer_names(self) -> list[str]:
        """The global names of this rank's attention layers."""
        return [f"model.layers.{self.first_layer + i}.self_attn.attn" for i in range(self.num_layers)]


def rank_shard(model: H.TinyModelSpec, tp: int, pp: int, rank: int, mla: bool = False) -> tuple[RankModelSpec, int]:
    """``(rank's model shard, its first KV head)``: vLLM numbers ranks stage-major (``rank // tp`` is the stage);
    MLA's single latent "head" is whole on every rank."""
    if ((model.num_kv_heads % tp or any(h % tp for h in model.layer_kv_heads)) and not mla) \
            or model.num_attention_heads % tp:
        raise ValueError(f"{model.num_kv_heads} KV heads (per layer {model.layer_kv_heads}) / "
                         f"{model.num_attention_heads} heads do not split over tp={tp}")
    if mla and model.num_kv_heads != 1:
        raise ValueError(f"an MLA model has one latent per token (num_kv_heads=1), got {model.num_kv_heads}")
    start, stop = get_pp_indices(model.num_layers, rank // tp, pp)
    heads = model.num_kv_heads if mla else model.num_kv_heads // tp
    shard = RankModelSpec(num_layers=stop - start, num_kv_heads=heads, num_attention_heads=model.num_attention_heads
                          // tp, head_dim=model.head_dim, vocab_size=model.vocab_size, dtype=model.dtype,
                          layer_kinds=model.layer_kinds[start:stop], sliding_window=model.sliding_window,
                          mamba_cache_mode=model.mamba_cache_mode,
                          layer_kv_heads=tuple(h // tp for h in model.layer_kv_heads[start:stop]), first_layer=start)
    return shard, 0 if mla else (rank % tp) * heads


class RankOracle(H.KVOracle):
    """The full model's KV restricted to one rank's heads and layers (``first_head``: the rank's first head of a
    layer of ``shard.num_kv_heads`` heads; a layer of other heads starts at the same share of them)."""

    def __init__(self, model: H.TinyModelSpec, shard: RankModelSpec, first_head: int) -> None:
        super().__init__(model)
        self.shard, self.first_head = shard, first_head

    def kv(self, prefix_hashes: Sequence[int], layer: int) -> torch.Tensor:
        """KV ``[n, rank's heads, 2, head_dim]`` of the rank's ``layer``."""
        layer_key = np.uint64(((self.shard.first_layer + layer + 1) * 0x632BE59BD9B4E019) & H._MASK64)
        base = H._mix64_array(np.asarray(prefix_hashes, dtype=np.uint64) ^ layer_key)  # as KVOracle, any layer
        all_heads, shard_heads = self.model.kv_heads(self.shard.first_layer + layer), self.shard.kv_heads(layer)
        offsets = self._element_offsets[: all_heads * 2 * self.model.head_dim]
        bits = H._mix64_array(base[:, None] + offsets[None, :]) >> np.uint64(40)
        values = bits.astype(np.float32) * np.float32(2.0 ** -23) - np.float32(1.0)
        full = torch.from_numpy(values.reshape(len(prefix_hashes), all_heads, 2, self.model.head_dim))
        first = self.first_head // self.shard.num_kv_heads * shard_heads
        heads = full[:, first:first + shard_heads]
        return heads.to(self.model.torch_dtype).contiguous()


def set_parallel(vllm_config: H.VllmConfig, tp: int, pp: int, rank: int = 0) -> None:
    """Give a config the engine's parallel sizes and a worker's rank, as vLLM's executor and worker do."""
    parallel = vllm_config.parallel_config
    parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.rank = tp, pp, rank
    parallel.world_size = tp * pp


def kv_spec(block_size: int, shard: H.TinyModelSpec, mla: bool) -> FullAttentionSpec:
    """A layer's KV cache spec as vLLM's attention layer gives it: full attention, or MLA's latent cache (as
    ``MLAAttention.get_kv_cache_spec``: one head, replicated over tensor parallelism)."""
    if mla:
        return MLAAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=2 * shard.head_dim,
                                dtype=shard.torch_dtype, max_tp_shards=1)
    return FullAttentionSpec(block_size=block_size, num_kv_heads=shard.num_kv_heads, head_size=shard.head_dim,
                             dtype=shard.torch_dtype)


def plan_rank_caches(vllm_config: H.VllmConfig, model: H.TinyModelSpec, tp: int, pp: int, num_gpu_blocks: int,
                     mla: bool = False) -> tuple[H.PlannedKVCache, list[KVCacheConfig]]:
    """The engine core's KV cache plan over all ranks: the scheduler's config (rank 0's) and every rank's."""
    register_all_kvcache_specs(vllm_config)
    specs = []
    for rank in range(tp * pp):
        shard, _ = rank_shard(model, tp, pp, rank, mla)
        block_size = vllm_config.cache_config.block_size
        specs.append({name: kv_spec(block_size, shard, mla) for name in shard.layer_names()} if mla
                     else shard.layer_specs(block_size, vllm_config.model_config.max_model_len))
    supported = [layout.name for layout in get_supported_kv_cache_layouts([])]
    resolve_kv_cache_layout(vllm_config, [supported], list(specs[0].values()))
    groups = get_global_kv_cache_groups(vllm_config, specs)
    memory = [sum(s.page_size_bytes for s in spec.values()) * num_gpu_blocks for spec in specs]
    configs = get_kv_cache_configs(vllm_config, specs, memory, groups)
    for c in configs:
        c.kv_cache_layout = vllm_config.cache_config.kv_cache_layout
    scheduler = generate_scheduler_kv_cache_config(configs)
    vllm_config.cache_config.num_gpu_blocks = scheduler.num_blocks
    block_size, hash_block_size = resolve_kv_cache_block_sizes(scheduler, vllm_config)
    alignment = resolve_cache_hit_alignment_tokens(scheduler, vllm_config, block_size, hash_block_size)
    for c in (*configs, scheduler):
        c.hash_block_size, c.cache_hit_alignment_tokens = hash_block_size, alignment
    return H.PlannedKVCache(configs[0], scheduler, block_size, hash_block_size), configs


# --------------------------------------------------------------------------------------------------
# A rank (runs in this process or in its own)
# --------------------------------------------------------------------------------------------------


def fail_every_nth_load(worker: Any, every: int) -> None:
    """Make a ``ConnectorWorker`` fail every ``every``-th load move it runs (asynchronous or layer-wise): the move's
    transfers are not submitted (its engine blocks keep their poison) and all its blocks are reported failed."""
    store, chosen, seen = worker.store, {}, Counter()
    submit, submit_groups = store._submit, store._submit_groups

    def fails(move: Any) -> bool:
        if move.kind is not MoveKind.LOAD:
            return False
        if move.move_id not in chosen:  # (a layer-wise move may be submitted once per layer group)
            seen["loads"] += 1
            chosen[move.move_id] = seen["loads"] % every == 0
        return chosen[move.move_id]

    def failing_submit(move: Any, src: Any, dst: Any, ids: Any = None) -> BlockTransfer:
        if fails(move):
            return BlockTransfer.failed(move.num_blocks, "injected", "injected failure")
        return submit(move, src, dst, ids)

    def failing_submit_groups(move: Any, views: Any, ids: Any) -> list[BlockTransfer]:  # a layer-wise load's groups
        if fails(move):
            return [BlockTransfer.failed(move.num_blocks, "injected", "injected failure") for _ in views]
        return submit_groups(move, views, ids)

    store._submit, store._submit_groups = failing_submit, failing_submit_groups


@dataclass
class RankSetup:
    """What a rank needs to build itself (pickled to a rank process)."""

    config: H.HarnessConfig
    model_dir: str
    tp: int
    pp: int
    rank: int
    kv_cache_config: KVCacheConfig
    fail_every_nth_load: int = 0
    mla: bool = False
    instance_id: str = ""  #: the engine's (vLLM's workers get the engine's config)


class Rank:
    """One worker rank: a ``WorkerHarness`` over the rank's shard with the rank's worker-role connector."""

    def __init__(self, setup: RankSetup) -> None:
        self.rank = setup.rank
        self.vllm_config = H.build_vllm_config(setup.config, Path(setup.model_dir))
        set_parallel(self.vllm_config, setup.tp, setup.pp, setup.rank)
        self.vllm_config.instance_id = setup.instance_id or self.vllm_config.instance_id
        self.vllm_config.cache_config.kv_cache_layout = setup.kv_cache_config.kv_cache_layout
        shard, first_head = rank_shard(setup.config.model, setup.tp, setup.pp, setup.rank, setup.mla)
        self.seeds: dict[str, int] = {}
        config = dataclasses.replace(setup.config, model=shard)
        self.harness = _WorkerHarness(config, self.vllm_config, setup.kv_cache_config, self.seeds)
        self.harness.oracle = RankOracle(setup.config.model, shard, first_head)
        self.executed: Counter = Counter()  # moves the rank's store ran, by kind and by "source->destination"
        execute = self.worker.store.execute

        def counting_execute(moves: Sequence[Any]) -> None:
            moves = list(moves)
            self.count(moves)
            execute(moves)

        layered = self.worker.store.layered

        def counting_layered(moves: Sequence[Any]) -> Any:  # (layer-wise loads and stores both come this way)
            moves = list(moves)
            self.count(moves)
            return layered(moves)

        self.worker.store.execute = counting_execute
        self.worker.store.layered = counting_layered
        if setup.fail_every_nth_load:
            fail_every_nth_load(self.worker, setup.fail_every_nth_load)

    def count(self, moves: Sequence[Any]) -> None:
        """Note moves the rank's store runs."""
        self.executed.update(move.kind.name for move in moves)
        self.executed.update(f"{move.src_tier}->{move.dst_tier}" for move in moves)

    @property
    def worker(self) -> Any:
        """The rank's ``ConnectorWorker`` (tiers and store)."""
        return self.harness.connector.worker

    def step(self, payload: bytes) -> bytes:
        """Run one pickled ``(SchedulerOutput, new block ids, request seeds)``; the pickled output and counters."""
        so, new_blocks, seeds = pickle.loads(payload)
        self.seeds.update(seeds)
        output = self.harness.execute(so, new_blocks)
        kv = output.kv_connector_output
        info = {"verified": self.harness.last_report.verified_tokens,
                "invalid": set(kv.invalid_block_ids) if kv is not None else set()}
        return pickle.dumps((output, info))

    def handshake_metadata(self) -> dict[tuple[int, int], Any] | None:
        """The rank's handshake metadata keyed ``(pipeline rank, tensor rank)``, as its vLLM worker returns it."""
        meta = self.harness.connector.get_handshake_metadata()
        tp = self.harness.vllm_config.parallel_config.tensor_parallel_size
        return {(self.rank // tp, self.rank % tp): meta} if meta is not None else None

    def settle(self) -> dict[str, Any]:
        """Wait for the rank's transfers; what is left on it and how its tiers are sized."""
        worker = self.worker
        worker.store.wait_all()
        worker.poll()
        return {"leftover": bool(worker._moves or worker._loading or worker._storing or worker._held
                                 or worker.store.busy),
                "blocks": {name: cache.num_blocks for name, cache in worker.store.caches.items()},
                "block_bytes": worker.engine_cache.geometry.block_bytes,
                "executed": dict(self.executed), "host_mapping": host_mapping(worker.store.caches.get("G2")),
                "disk_file": disk_file(worker.store.caches.get("G3"))}

    def close(self) -> None:
        """Shut the rank's connector down."""
        self.harness.shutdown()


def host_mapping(cache: Any) -> dict[str, Any] | None:
    """What backs a host tier's memory, from this process's ``/proc/self/maps``: ``{path, inode, shared,
    bytes}`` of the mapping holding the cache's buffer."""
    buffer = getattr(cache, "__dict__", {}).get("_kvbm_buffer")
    if buffer is None:
        return None
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= buffer.host_ptr < hi:
            return {"path": fields[5] if len(fields) > 5 else "", "inode": int(fields[4]), "shared": "s" in fields[1],
                    "bytes": hi - lo}
    raise AssertionError(f"no mapping holds the host tier at {buffer.host_ptr:#x}")


def disk_file(cache: Any) -> dict[str, Any] | None:
    """The file behind a disk tier: ``{inode, bytes, read_only}`` (the device and inode identify it)."""
    if cache is None:
        return None
    st = os.fstat(cache.file.fileno())
    return {"inode": (st.st_dev, st.st_ino), "bytes": st.st_size, "read_only": cache.read_only}


def _rank_process(conn: Any, setup: RankSetup) -> None:
    """A rank process: build the rank, then answer ``(method, args)`` calls until ``None``."""
    rank = None
    try:
        rank = Rank(setup)
        conn.send(("ok", None))
        while (call := conn.recv()) is not None:
            try:
                conn.send(("ok", getattr(rank, call[0])(*call[1])))
            except BaseException:
                conn.send(("error", traceback.format_exc()))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
    finally:
        if rank is not None:
            rank.close()


class RankProcess:
    """A ``Rank`` in a spawned process, called through a pipe with timeouts."""

    def __init__(self, setup: RankSetup) -> None:
        context = multiprocessing.get_context("spawn")
        self.rank = setup.rank
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_rank_process, args=(child, setup), daemon=True,
                                       name=f"kvbm-rank-{setup.rank}")
        self.process.start()
        child.close()

    def _answer(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"rank {self.rank} did not answer within {timeout:.0f} s")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"rank {self.rank} failed:\n{value}")
        return value

    def started(self) -> None:
        """Wait until the rank is built."""
        self._answer(START_TIMEOUT_S)

    def send(self, method: str, *args: Any) -> None:
        """Start a call (answers come back in order)."""
        self._conn.send((method, args))

    def call(self, method: str, *args: Any) -> Any:
        """Call a ``Rank`` method and wait for its answer."""
        self.send(method, *args)
        return self._answer(CALL_TIMEOUT_S)

    def close(self) -> None:
        """Ask the process to stop; terminate it when it does not."""
        with contextlib.suppress(Exception):
            self._conn.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()


class InlineRank:
    """A ``Rank`` in this process, called like a ``RankProcess``."""

    def __init__(self, setup: RankSetup) -> None:
        self.rank = setup.rank
        self.local = Rank(setup)
        self._answers: list[Any] = []

    def started(self) -> None:
        """Built at construction."""

    def send(self, method: str, *args: Any) -> None:
        self._answers.append(getattr(self.local, method)(*args))

    def call(self, method: str, *args: Any) -> Any:
        self.send(method, *args)
        return self._answers.pop(0)

    def _answer(self, timeout: float) -> Any:
        return self._answers.pop(0)

    def close(self) -> None:
        self.local.close()


class RankGroup:
    """The engine's worker ranks behind the ``WorkerHarness`` interface the ``VllmHarness`` steps."""

    def __init__(self, ranks: list[InlineRank | RankProcess], tp: int, seeds: dict[str, int],
                 silent: frozenset[int] = frozenset()) -> None:
        """``silent``: ranks whose connector never reaches the scheduler side (no handshake metadata, no worker
        metadata), as a rank whose messages are lost."""
        self.ranks, self.tp, self._seeds, self.silent = ranks, tp, seeds, silent
        self.aggregator = KVOutputAggregator(expected_finished_count=len(ranks))
        self.counts: Counter = Counter()
        self.rank_invalid: list[set[int]] = [set() for _ in ranks]
        self.connector = None  # the scheduler side owns the connector the harness times

    def execute(self, so: H.SchedulerOutput, new_block_ids: Sequence[int]) -> ModelRunnerOutput:
        """Run the step on every rank (the same pickled input) and aggregate as vLLM's executor does."""
        payload = pickle.dumps((so, list(new_block_ids), dict(self._seeds)))
        for rank in self.ranks:
            rank.send("step", payload)
        outputs = []
        for rank in self.ranks:
            output, info = pickle.loads(rank._answer(CALL_TIMEOUT_S))
            if rank.rank in self.silent and output.kv_connector_output is not None:
                output.kv_connector_output.kv_connector_worker_meta = None
            outputs.append(output)
            self.counts[f"verified{rank.rank}"] += info["verified"]
            self.rank_invalid[rank.rank] |= info["invalid"]
        plan = so.kv_connector_metadata.plan
        self.counts["load_jobs"] += len(plan.loads)
        self.counts["loaded_blocks"] += sum(m.num_blocks for load in plan.loads for m in load.moves)
        output = self.aggregator.aggregate(outputs, output_rank=len(self.ranks) - self.tp)
        self.counts["load_errors"] += len(output.kv_connector_output.invalid_block_ids)
        return output

    def handshake_metadata(self) -> list[dict[tuple[int, int], Any] | None]:
        """Every rank's handshake metadata (None for a silent rank), as the executor gathers it."""
        return [None if rank.rank in self.silent else rank.call("handshake_metadata") for rank in self.ranks]

    def settle(self) -> list[dict[str, Any]]:
        """Every rank's ``Rank.settle``."""
        return [rank.call("settle") for rank in self.ranks]

    def shutdown(self) -> None:
        """Close every rank (processes are stopped, or terminated)."""
        for rank in self.ranks:
            with contextlib.suppress(Exception):
                rank.close()


@contextlib.contextmanager
def _patched(module: Any, **names: Any) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in names}
    for name, value in names.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class RankedVllmHarness(H.VllmHarness):
    """``VllmHarness`` with a ``RankGroup`` of ``tp x pp`` ranks as its worker (``worker``)."""

    def __init__(self, config: H.HarnessConfig, tp: int, pp: int = 1, ranks: RankMode = "inline",
                 faults: dict[int, int] | None = None, mla: bool = False, silent: Sequence[int] = ()) -> None:
        """``faults``: rank -> fail every n-th load move on that rank; ``mla``: the model's KV is MLA's latent;
        ``silent``: ranks whose connector never reaches the scheduler side (`RankGroup`)."""
        if config.runner != "v1" or config.use_async_scheduling:
            raise ValueError("the multi-rank harness steps the V1 runner with synchronous scheduling")
        self.tp, self.pp, self.rank_mode, self.faults, self.mla = tp, pp, ranks, dict(faults or {}), mla
        self.silent = frozenset(silent)
        self.rank_configs: list[KVCacheConfig] = []
        super().__init__(config)

    def _build(self, config: H.HarnessConfig) -> None:
        model_dir = str(Path(self._tmp.name) / "model")
        set_parallel(self.vllm_config, self.tp, self.pp)

        def plan(vllm_config: H.VllmConfig, model: H.TinyModelSpec, num_gpu_blocks: int) -> H.PlannedKVCache:
            planned, self.rank_configs = plan_rank_caches(vllm_config, model, self.tp, self.pp, num_gpu_blocks,
                                                          self.mla)
            return planned

        def workers(config: H.HarnessConfig, vllm_config: H.VllmConfig, _: Any, seeds: dict[str, int]) -> RankGroup:
            kind = InlineRank if self.rank_mode == "inline" else RankProcess
            ranks: list[Any] = []
            try:
                for r, kv_config in enumerate(self.rank_configs):
                    ranks.append(kind(RankSetup(config, model_dir, self.tp, self.pp, r, kv_config,
                                                self.faults.get(r, 0), self.mla, self.vllm_config.instance_id)))
                for rank in ranks:
                    rank.started()
            except BaseException:
                RankGroup(ranks, self.tp, seeds).shutdown()
                raise
            return RankGroup(ranks, self.tp, seeds, self.silent)

        with _patched(H, plan_kv_cache=plan, WorkerHarness=workers):
            super()._build(config)

    @property
    def leader(self) -> Any:
        """The scheduler side's ``ConnectorLeader``."""
        return self.scheduler.connector.scheduler_side.leader
