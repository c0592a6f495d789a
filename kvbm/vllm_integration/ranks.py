"""The engine's split over worker ranks (`RankLayout`) from vLLM's config, alike on both connector sides: tensor
parallelism gives each rank its KV heads of every layer, pipeline parallelism each stage its layers (vLLM's
partition); MLA's latent cache is the same on every tensor-parallel rank (vLLM's ``kv_tp_replicas``), stored once
in a host pool the ranks of one host share; a hybrid model's KV cache groups (`kv_groups`); which setups the
connector refuses."""
from __future__ import annotations

import logging

from vllm.config import VllmConfig
from vllm.distributed.utils import get_pp_indices
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheSpec,
    MambaSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

from kvbm.connectors.groups import FULL, WINDOW, KVGroup
from kvbm.connectors.leader import RankLayout

__all__ = ["check_supported", "kv_groups", "rank_layout"]

log = logging.getLogger(__name__)


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
    """Refuse the setups the connector does not handle, with the reason."""
    for name in ("prefill_context_parallel_size", "decode_context_parallel_size"):
        if (size := getattr(vllm_config.parallel_config, name, 1)) > 1:
            raise ValueError(f"DynamoConnector does not support context parallelism; got {name}={size}")
    kv_groups(kv_cache_config)
    groups = kv_cache_config.kv_cache_groups
    if len(groups) > 1 and vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError(f"DynamoConnector does not support a hybrid model ({len(groups)} KV cache groups) with "
                         f"pipeline parallelism (pipeline_parallel_size="
                         f"{vllm_config.parallel_config.pipeline_parallel_size})")


def kv_groups(kv_cache_config: KVCacheConfig) -> tuple[tuple[KVGroup, ...], str | None]:
    """The model's KV cache groups, and why its KV is not offloaded (None when it is): a group holding recurrent
    state (vLLM's ``MambaSpec``: Mamba, linear attention) is refused, as kvbm offloads attention KV blocks only and a
    hit is of no use without the state at its end. Raises for groups the connector cannot describe (other attention
    kinds, groups of unlike block geometry)."""
    groups = kv_cache_config.kv_cache_groups
    if not groups:
        raise ValueError("DynamoConnector needs at least one KV cache group; the KV cache config has none")
    out, refusal, first = [], None, None
    for k, group in enumerate(groups):
        spec = group.kv_cache_spec
        if isinstance(spec, MambaSpec):
            refusal = refusal or (f"KV cache group {k} holds recurrent state ({type(spec).__name__}, "
                                  f"mamba_cache_mode={spec.mamba_cache_mode!r}, {len(group.layer_names)} layers "
                                  f"from {group.layer_names[0]}): "
                                  f"kvbm offloads attention KV blocks only, so no request of this model is matched "
                                  f"or stored")
            continue
        if not group.enable_kv_transfer:
            raise ValueError(f"KV cache group {k} is not transferable (enable_kv_transfer=False); DynamoConnector "
                             f"needs every group")
        if type(spec) in (FullAttentionSpec, MLAAttentionSpec):  # (not their sliding-window or sparse variants)
            out.append(KVGroup(k, FULL, spec.block_size, _spec_key(spec)))
        elif type(spec) is SlidingWindowSpec:
            out.append(KVGroup(k, WINDOW, spec.block_size, _spec_key(spec), window=spec.sliding_window - 1,
                               retained=spec.extra_retained_tokens))
        else:
            raise ValueError(f"DynamoConnector supports full-attention, MLA and sliding-window KV caches, got "
                             f"{type(spec).__name__} in KV cache group {k}")
        first = first or group
        base = first.kv_cache_spec
        if (spec.block_size, spec.page_size_bytes, len(group.layer_names)) != (
                base.block_size, base.page_size_bytes, len(first.layer_names)):
            raise ValueError(f"KV cache group {k} has blocks of {spec.block_size} tokens, pages of "
                             f"{spec.page_size_bytes} bytes and {len(group.layer_names)} layers; group "
                             f"{out[0].index} has {base.block_size}, {base.page_size_bytes} and "
                             f"{len(first.layer_names)}: DynamoConnector needs groups of one block geometry")
    return tuple(out), refusal


def _spec_key(spec: KVCacheSpec) -> str:
    """A text naming what a group's blocks hold (it enters the group's block hashes)."""
    window = getattr(spec, "sliding_window", None)
    return f"{type(spec).__name__}:tokens={spec.block_size}:page={spec.page_size_bytes}:window={window}"


def rank_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, rank: int) -> RankLayout:
    """The split, from ``rank``'s KV cache config (the scheduler side has rank 0's) and vLLM's layer partition; a
    hybrid model's blocks are those of one attention group (all alike)."""
    tp, pp = vllm_config.parallel_config.tensor_parallel_size, vllm_config.parallel_config.pipeline_parallel_size
    groups = kv_cache_config.kv_cache_groups
    group = next((g for g in groups if not isinstance(g.kv_cache_spec, MambaSpec)), groups[0])
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
    return RankLayout(tp, group.kv_cache_spec.page_size_bytes, layers, replicas)
