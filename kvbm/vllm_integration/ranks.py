"""The engine's split over worker ranks (`RankLayout`) from vLLM's config, alike on both connector sides: tensor
parallelism gives each rank its KV heads of every layer, pipeline parallelism each stage its layers (vLLM's
partition); MLA's latent cache is the same on every tensor-parallel rank (vLLM's ``kv_tp_replicas``), stored once
in a host pool the ranks of one host share; which setups the connector refuses."""
from __future__ import annotations

import logging

from vllm.config import VllmConfig
from vllm.distributed.utils import get_pp_indices
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, MLAAttentionSpec

from kvbm.connectors.leader import RankLayout

__all__ = ["check_supported", "rank_layout"]

log = logging.getLogger(__name__)


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
    """Refuse the setups the connector does not handle, with the reason."""
    for name in ("prefill_context_parallel_size", "decode_context_parallel_size"):
        if (size := getattr(vllm_config.parallel_config, name, 1)) > 1:
            raise ValueError(f"DynamoConnector does not support context parallelism; got {name}={size}")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"DynamoConnector supports models with one KV cache group (full attention only); this model "
                         f"has {len(groups)} groups (a hybrid model: sliding-window, Mamba or mixed layers)")
    spec = groups[0].kv_cache_spec
    if type(spec) not in (FullAttentionSpec, MLAAttentionSpec):  # not their sliding-window or sparse variants
        raise ValueError(f"DynamoConnector supports full-attention and MLA KV caches, got {type(spec).__name__}")


def rank_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, rank: int) -> RankLayout:
    """The split, from ``rank``'s KV cache config (the scheduler side has rank 0's) and vLLM's layer partition."""
    tp, pp = vllm_config.parallel_config.tensor_parallel_size, vllm_config.parallel_config.pipeline_parallel_size
    group = kv_cache_config.kv_cache_groups[0]
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
