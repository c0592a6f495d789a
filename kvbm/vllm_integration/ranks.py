"""How the engine's KV is split over its worker ranks, computed alike on both connector sides from vLLM's config.

Tensor parallelism gives each rank its share of the KV heads of every layer, pipeline parallelism each stage its own
layers (vLLM's layer partition). As in Dynamo KVBM, ``DYN_KVBM_*_GB`` counts a block's bytes summed over all ranks
and every rank allocates the same number of blocks of its own size: one index slot names a block on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.distributed.utils import get_pp_indices
from vllm.v1.kv_cache_interface import FullAttentionSpec

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

__all__ = ["RankLayout", "check_supported", "rank_layout"]


@dataclass(frozen=True)
class RankLayout:
    """``page_bytes``: one layer of one block on one rank; ``stage_layers``: layers of each pipeline stage."""

    tensor_parallel: int
    page_bytes: int
    stage_layers: tuple[int, ...]

    @property
    def world_size(self) -> int:
        """Worker ranks (tensor x pipeline parallel): the reports a move waits for."""
        return self.tensor_parallel * len(self.stage_layers)

    @property
    def total_block_bytes(self) -> int:
        """One block's bytes summed over all ranks (what ``DYN_KVBM_*_GB`` is divided by)."""
        return self.page_bytes * sum(self.stage_layers) * self.tensor_parallel

    def rank_block_bytes(self, rank: int) -> int:
        """One block's bytes on ``rank`` (vLLM numbers ranks stage-major: rank // tensor_parallel is the stage)."""
        return self.page_bytes * self.stage_layers[(rank // self.tensor_parallel) % len(self.stage_layers)]


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
    """Refuse the setups the connector does not handle, with the reason."""
    parallel = vllm_config.parallel_config
    for name in ("prefill_context_parallel_size", "decode_context_parallel_size"):
        if getattr(parallel, name, 1) > 1:
            raise ValueError(f"DynamoConnector does not support context parallelism; got {name}="
                             f"{getattr(parallel, name)}")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"DynamoConnector supports models with one KV cache group (full attention only); this model "
                         f"has {len(groups)} groups (a hybrid model: sliding-window, Mamba or mixed layers)")
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec:  # MLA's latent cache (MLAAttentionSpec) included
        raise ValueError(f"DynamoConnector supports full-attention KV caches, got {type(spec).__name__}")


def rank_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, rank: int) -> RankLayout:
    """The split, from ``rank``'s KV cache config (the scheduler side has rank 0's) and vLLM's layer partition."""
    parallel = vllm_config.parallel_config
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    group = kv_cache_config.kv_cache_groups[0]
    layers = (len(group.layer_names),)
    if pp > 1:
        total = vllm_config.model_config.get_total_num_hidden_layers()
        layers = tuple(end - start for start, end in (get_pp_indices(total, s, pp) for s in range(pp)))
        stage = (rank // tp) % pp
        if layers[stage] != len(group.layer_names):
            raise ValueError(f"pipeline stage {stage} has {len(group.layer_names)} KV cache layers, but vLLM's layer "
                             f"partition of {total} layers gives it {layers[stage]}: cannot size the ranks' blocks")
    return RankLayout(tp, group.kv_cache_spec.page_size_bytes, layers)
