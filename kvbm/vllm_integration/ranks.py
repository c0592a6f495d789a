"""The engine's split over worker ranks (`RankLayout`) from vLLM's config, alike on both connector sides: tensor
parallelism gives each rank its KV heads of every layer, pipeline parallelism each stage its layers (vLLM's
partition); MLA's latent cache is the same on every tensor-parallel rank (vLLM's ``kv_tp_replicas``), stored once
in a host pool and a disk file the ranks of one host share; a hybrid model's KV cache groups (`kv_groups`:
attention, and the recurrent state of Mamba / linear-attention layers in vLLM's ``mamba_cache_mode="align"``); which
setups the connector refuses."""
from __future__ import annotations

import logging

from vllm.config import VllmConfig
from vllm.distributed.utils import get_pp_indices
from vllm.v1.kv_cache_interface import (
    AttentionSpec,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheSpec,
    MambaSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
    UniformTypeKVCacheSpecs,
)

from kvbm.connectors.groups import FULL, STATE, WINDOW, KVGroup
from kvbm.connectors.leader import RankLayout

__all__ = ["check_supported", "group_block_bytes", "group_spec", "kv_groups", "rank_layout", "ranks_apart",
           "state_refusal"]

log = logging.getLogger(__name__)


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
    """Refuse the setups the connector does not handle, with the reason."""
    for name in ("prefill_context_parallel_size", "decode_context_parallel_size"):
        if (size := getattr(vllm_config.parallel_config, name, 1)) > 1:
            raise ValueError(f"DynamoConnector does not support context parallelism; got {name}={size}")
    groups, pp = kv_cache_config.kv_cache_groups, vllm_config.parallel_config.pipeline_parallel_size
    if len(groups) > 1 and pp > 1:
        raise ValueError(
            f"DynamoConnector does not support a hybrid model ({len(groups)} KV cache groups) with pipeline "
            f"parallelism (pipeline_parallel_size={pp}): vLLM gives each stage's workers the model's groups with only "
            f"that stage's layers (this config: {[len(g.layer_names) for g in groups]} layers per group; a stage may "
            f"hold none of a group) and the scheduler a copy of stage 0's, so no rank and not the scheduler knows "
            f"the other stages' block bytes, while kvbm sizes the tiers of every rank, alike on both sides, by one "
            f"block's bytes summed over all ranks")
    kv_groups(kv_cache_config)


def kv_groups(kv_cache_config: KVCacheConfig) -> tuple[tuple[KVGroup, ...], str | None]:
    """The model's KV cache groups, and why its KV is not offloaded (None when it is). A group of recurrent state
    (vLLM's ``MambaSpec``: Mamba, linear attention) is a `STATE` group in ``mamba_cache_mode="align"``, where vLLM
    keeps the state after every ``block_size`` tokens in a block of its own (`state_refusal` says which state groups
    are refused, and why); a model of state groups only is refused (hits are found by their attention blocks), and
    so is a group whose layers have unlike specs (vLLM's ``UniformTypeKVCacheSpecs`` of several page sizes), whose
    blocks no one geometry describes. Groups may differ in block size, page bytes, layer count and dtype. Raises
    for groups the connector cannot handle (other attention kinds)."""
    groups = kv_cache_config.kv_cache_groups
    if not groups:
        raise ValueError("DynamoConnector needs at least one KV cache group; the KV cache config has none")
    out, refusal = [], None
    for k, group in enumerate(groups):
        spec = group_spec(group.kv_cache_spec)
        if spec is None:
            kinds = sorted({f"{type(s).__name__} of {s.page_size_bytes}-byte pages"
                            for s in group.kv_cache_spec.kv_cache_specs.values()})
            refusal = refusal or (f"KV cache group {k} ({len(group.layer_names)} layers from {group.layer_names[0]}) "
                                  f"mixes layers of unlike specs ({', '.join(kinds)}): kvbm describes a group's "
                                  f"blocks with one geometry, so no request of this model is matched or stored")
            continue
        if isinstance(spec, MambaSpec):
            why = state_refusal(spec, kv_cache_config)
            if why is not None:
                refusal = refusal or (f"KV cache group {k} holds recurrent state ({type(spec).__name__}, "
                                      f"mamba_cache_mode={spec.mamba_cache_mode!r}, {len(group.layer_names)} layers "
                                      f"from {group.layer_names[0]}): {why}, so no request of this model is matched "
                                      f"or stored")
                continue
        if not group.enable_kv_transfer:
            raise ValueError(f"KV cache group {k} is not transferable (enable_kv_transfer=False); DynamoConnector "
                             f"needs every group")
        if isinstance(spec, MambaSpec):
            out.append(KVGroup(k, STATE, spec.block_size, _spec_key(spec)))
        elif type(spec) in (FullAttentionSpec, MLAAttentionSpec):  # (not their sliding-window or sparse variants)
            out.append(KVGroup(k, FULL, spec.block_size, _spec_key(spec)))
        elif type(spec) is SlidingWindowSpec:
            out.append(KVGroup(k, WINDOW, spec.block_size, _spec_key(spec), window=spec.sliding_window - 1,
                               retained=spec.extra_retained_tokens))
        else:
            raise ValueError(f"DynamoConnector supports full-attention, MLA and sliding-window KV caches, got "
                             f"{type(spec).__name__} in KV cache group {k}")
    if refusal is None and all(g.kind == STATE for g in out):
        refusal = (f"every KV cache group holds recurrent state ({len(out)} groups): kvbm finds a hit by its "
                   f"attention blocks, so no request of this model is matched or stored")
    return tuple(out), refusal


def state_refusal(spec: MambaSpec, kv_cache_config: KVCacheConfig) -> str | None:
    """Why a group of recurrent state cannot be offloaded, or None. kvbm finds a state block by its place in the
    group's block table (block ``i``: the state after ``(i + 1) * block_size`` tokens), which holds in vLLM's
    ``mamba_cache_mode="align"`` (a prefill checkpoint a backend exports from inside a chunk goes to the column of
    its boundary too) unless speculative blocks are relocated in the table or hits may end inside a state block
    (sub-block prefix-cache hits, which vLLM serves from copies of partial states); a page must be one state of one
    head, as vLLM's Mamba layers bind it."""
    if spec.mamba_cache_mode != "align":
        return ("without prefix caching of the state (vLLM's mamba_cache_mode='align') a request keeps one running "
                "state, never the state at a block boundary that a later request could load")
    if spec.num_speculative_blocks:
        return (f"speculative decoding ({spec.num_speculative_blocks} speculative state blocks) moves state blocks "
                f"within the block table, so a block's place does not name the tokens its state follows")
    alignment = kv_cache_config.cache_hit_alignment_tokens
    if alignment is not None and alignment < spec.block_size:
        return (f"prefix-cache hits land every {alignment} tokens, inside the {spec.block_size}-token state blocks "
                f"(vLLM serves them from copies of partial states), while kvbm stores and loads whole state blocks")
    if spec.num_heads != 1 or spec.num_states != 1:
        return (f"a state page of {spec.num_heads} heads and {spec.num_states} states per block is not one state "
                f"of one head, as kvbm describes a state block")
    return None


def group_spec(spec: KVCacheSpec) -> KVCacheSpec | None:
    """The one spec of a KV cache group's layers (vLLM wraps a group of block-outermost packing in
    ``UniformTypeKVCacheSpecs``), None when its layers' specs differ."""
    if not isinstance(spec, UniformTypeKVCacheSpecs):
        return spec
    specs = set(spec.kv_cache_specs.values())
    return specs.pop() if len(specs) == 1 else None


def group_block_bytes(group: KVCacheGroupSpec) -> int:
    """One block of a KV cache group over its layers, in the bytes its KV or state takes (a padded page's padding
    left out: vLLM pads pages to one size, the blocks kvbm moves are the KV or state only)."""
    spec = group_spec(group.kv_cache_spec)
    page = spec.real_page_size_bytes if isinstance(spec, (AttentionSpec, MambaSpec)) else spec.page_size_bytes
    return page * len(group.layer_names)


def _spec_key(spec: KVCacheSpec) -> str:
    """A text naming what a group's blocks hold (it enters the group's block hashes); for a state group also its
    state kind, shapes and dtypes."""
    if isinstance(spec, MambaSpec):
        return (f"{type(spec).__name__}:tokens={spec.block_size}:page={spec.page_size_bytes}:"
                f"type={spec.mamba_type.name}:shapes={spec.shapes}:dtypes={[str(d) for d in spec.dtypes]}")
    window = getattr(spec, "sliding_window", None)
    return f"{type(spec).__name__}:tokens={spec.block_size}:page={spec.page_size_bytes}:window={window}"


def rank_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, rank: int) -> RankLayout:
    """The split, from ``rank``'s KV cache config (the scheduler side has rank 0's) and vLLM's layer partition; a
    hybrid model's blocks are those of its attention or state group of the largest blocks (the tiers' slots hold
    one block of any group)."""
    tp, pp = vllm_config.parallel_config.tensor_parallel_size, vllm_config.parallel_config.pipeline_parallel_size
    groups = kv_cache_config.kv_cache_groups
    group, page = groups[0], groups[0].kv_cache_spec.page_size_bytes
    offloaded = [g for g in groups if isinstance(group_spec(g.kv_cache_spec), (AttentionSpec, MambaSpec))]
    if len(groups) > 1 and offloaded:  # a hybrid model: its largest blocks, their pages without padding
        group = max(offloaded, key=group_block_bytes)
        page = group_block_bytes(group) // len(group.layer_names)
    layers = (len(group.layer_names),)
    if pp > 1:
        total, stage = vllm_config.model_config.get_total_num_hidden_layers(), (rank // tp) % pp
        layers = tuple(end - start for start, end in (get_pp_indices(total, s, pp) for s in range(pp)))
        if layers[stage] != len(group.layer_names):
            raise ValueError(f"pipeline stage {stage} has {len(group.layer_names)} KV cache layers, but vLLM's layer "
                             f"partition of {total} layers gives it {layers[stage]}: cannot size the ranks' blocks")
    replicas = getattr(kv_cache_config, "kv_tp_replicas", 1)
    if replicas > 1 and vllm_config.parallel_config.nnodes_within_dp > 1:
        log.info("kvbm: %d tensor-parallel ranks hold identical KV, but the engine spans %d hosts: every rank "
                 "stores its own copy", replicas, vllm_config.parallel_config.nnodes_within_dp)
        replicas = 1
    return RankLayout(tp, page, layers, replicas)


def ranks_apart(vllm_config: VllmConfig) -> bool:
    """Whether the worker ranks run apart from the scheduler side, each then serving its own metrics
    (`kvbm.connectors.process_metrics`): more than one rank, or one that vLLM's executor runs in a process of its own
    (every executor but ``uni`` and ``external_launcher``, which run the worker in the engine core's process)."""
    parallel = vllm_config.parallel_config
    return parallel.world_size > 1 or parallel.distributed_executor_backend not in (None, "uni", "external_launcher")
