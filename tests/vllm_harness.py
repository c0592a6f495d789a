"""Harness that steps vLLM 0.33's real ``Scheduler`` with a KV connector on CPU.

What it builds, all from vLLM's own code paths (checked against the installed 0.33 source):

* a ``VllmConfig`` for a tiny Llama-like model whose ``config.json`` is written into a temporary
  folder (no weights, no tokenizer, no hub access), on the CPU platform;
* the ``KVCacheConfig`` the engine core would plan (``get_kv_cache_configs`` with
  ``num_gpu_blocks_override``), the KV cache layout the engine core would resolve (the connector's
  ``get_required_kvcache_layout`` honoured), and the real ``Scheduler`` / ``AsyncScheduler`` whose
  scheduler-side connector comes from ``KVConnectorFactory`` (``kv_connector_module_path``);
* a :class:`WorkerHarness` that owns the paged KV tensors exactly as ``allocate_kv_cache`` creates them
  (per-layer 4-D ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` views, K then V in the last
  dimension, strided into one int8 buffer; physically LBNHC or LBHNC), or the classic 5-D per-layer
  tensors of older vLLM versions, creates the worker-side connector and drives it in the call order of
  vLLM 0.33's V1 GPU model runner or of its V2 model runner;
* a deterministic "model": the KV of a token depends on the whole token prefix up to it, the layer and
  the request's cache salt / LoRA name, so a block recomputed anywhere has the same bytes and any
  onboarded byte can be checked.  Newly allocated blocks are poisoned (NaN) before the connector may
  load into them, and the context a request attends to is checked byte-exactly (by default when the
  request is (re)admitted, i.e. exactly where onboarded or prefix-cached KV is consumed);
* :class:`MultiTurnChatWorkload`, a multi-turn chat generator (users sharing a system prompt, growing
  history, answers produced by the harness), and :class:`HarnessCPUOffloadingSpec`, which lets vLLM's
  own ``OffloadingConnector`` run on CPU by replacing only its CUDA data mover.

Importing this module sets ``VLLM_TARGET_DEVICE=cpu`` (unless already set) before vLLM is imported,
and imports vLLM with the repository root hidden from ``sys.path`` (see :func:`_import_vllm`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def _import_vllm() -> None:
    """Import vLLM (and through it transformers) with the repository root off ``sys.path``.

    transformers probes for the Hugging Face ``kernels`` package by importing whatever module of that
    name is importable; with the repository root on ``sys.path`` (``python -m pytest`` run from it) that
    is this project's ``kernels/`` source folder, whose import fails outside an installed kvbm.  The probe
    runs once, when transformers is first imported, and its answer is cached.
    """
    repo_root = Path(__file__).resolve().parent.parent
    saved = list(sys.path)
    sys.path[:] = [entry for entry in saved if Path(entry or ".").resolve() != repo_root]
    try:
        import transformers.integrations.hub_kernels  # noqa: F401  (runs and caches the probe)
        import vllm  # noqa: F401
    finally:
        sys.path[:] = saved + [entry for entry in sys.path if entry not in saved]


_import_vllm()

# The imports below deliberately follow _import_vllm().
import contextlib
import copy
import hashlib
import json
import random
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.utils import copy_kv_blocks
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
)
from vllm.forward_context import (
    get_forward_context,
    is_forward_context_available,
    set_forward_context,
)
from vllm.lora.request import LoRARequest
from vllm.model_executor.layers.mamba.checkpoint import compute_mamba_prefill_checkpoints
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.attention.backend import AttentionMetadata
from vllm.v1.attention.backends.utils import (
    get_supported_kv_cache_layouts,
    resolve_kv_cache_layout,
)
from vllm.v1.core.kv_cache_planning import (
    get_global_kv_cache_groups,
    get_kv_cache_configs,
)
from vllm.v1.core.kv_cache_utils import (
    generate_scheduler_kv_cache_config,
    get_request_block_hasher,
    init_none_hash,
    resolve_cache_hit_alignment_tokens,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheSpec, MambaSpec, SlidingWindowSpec
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.utils import allocate_kv_cache

RunnerKind = Literal["v1", "v2"]
KVFormat = Literal["views", "flash5d", "flashinfer5d"]
VerifyMode = Literal["admission", "every_step", "off"]

#: Token id the tiny model treats as end of sequence (requests use ``ignore_eos``).
EOS_TOKEN_ID = 2
#: Smallest token id the harness samples or generates (0..2 are special).
FIRST_REGULAR_TOKEN = 3

_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------
# Tiny model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the Llama-like model whose ``config.json`` the harness writes (no weights needed)."""

    num_layers: int = 2
    num_kv_heads: int = 2
    num_attention_heads: int = 4
    head_dim: int = 16
    vocab_size: int = 4096
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    #: Per layer "full" (full attention), "sliding" (sliding-window attention of ``sliding_window`` tokens) or
    #: "mamba" (a recurrent state); empty: all full attention.  The specs are vLLM's own spec classes
    #: (`layer_specs`).
    layer_kinds: tuple[str, ...] = ()
    sliding_window: int = 0
    #: vLLM's ``mamba_cache_mode`` of the Mamba layers: "none" (one state block per request, which needs prefix
    #: caching off) or "align" (prefix caching of the state: blocks of the attention block size, block ``i`` of a
    #: request holding the state after ``(i + 1) * block_size`` tokens once they are computed).
    mamba_cache_mode: Literal["none", "align"] = "none"
    #: Align mode only: the Mamba backend exports the state at a prefill's last block boundary from inside the chunk
    #: that runs past it, into a block reserved one column before the chunk's last (vLLM's
    #: ``num_prefill_checkpoint_blocks=1``, ``prefill_checkpoint_alignment=1``, as ``MambaMixer2`` declares), so
    #: the scheduler need not end a chunk there.
    mamba_checkpoints: bool = False
    #: Per layer KV heads (empty: ``num_kv_heads`` in every layer). Layers of unlike page sizes make vLLM plan KV
    #: cache groups of different block sizes (layer-outer layouts: it scales the smaller page's block size up) or
    #: of different page bytes (block-outermost layouts; or a padded page where one page does not divide the other).
    layer_kv_heads: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.layer_kinds:
            if len(self.layer_kinds) != self.num_layers or set(self.layer_kinds) - {"full", "sliding", "mamba"}:
                raise ValueError(f"layer_kinds must give 'full', 'sliding' or 'mamba' for each of the "
                                 f"{self.num_layers} layers, got {self.layer_kinds!r}")
            if "sliding" in self.layer_kinds and self.sliding_window <= 1:
                raise ValueError(f"sliding layers need sliding_window > 1, got {self.sliding_window}")
        if self.mamba_cache_mode not in ("none", "align"):
            raise ValueError(f"mamba_cache_mode must be 'none' or 'align', got {self.mamba_cache_mode!r}")
        if self.mamba_checkpoints and self.mamba_cache_mode != "align":
            raise ValueError("mamba_checkpoints needs mamba_cache_mode='align'")
        if self.layer_kv_heads and (len(self.layer_kv_heads) != self.num_layers or not all(
                isinstance(h, int) and h > 0 for h in self.layer_kv_heads)):
            raise ValueError(f"layer_kv_heads must give a positive int for each of the {self.num_layers} layers, got "
                             f"{self.layer_kv_heads!r}")
        for name in ("num_layers", "num_kv_heads", "num_attention_heads", "head_dim", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TinyModelSpec.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.vocab_size <= FIRST_REGULAR_TOKEN + 1:
            raise ValueError(f"vocab_size must exceed {FIRST_REGULAR_TOKEN + 1}, got {self.vocab_size}")
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float16', got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the KV cache (vLLM's ``cache_dtype="auto"`` follows the model)."""
        return getattr(torch, self.dtype)

    def layer_names(self) -> list[str]:
        """Attention layer names in the form vLLM's Llama model registers them."""
        return [f"model.layers.{i}.self_attn.attn" for i in range(self.num_layers)]

    def kv_heads(self, layer: int) -> int:
        """The KV heads of ``layer``."""
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_kv_heads

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (tokens a position attends to, itself included), None for full."""
        return self.sliding_window if self.layer_kinds and self.layer_kinds[layer] == "sliding" else None

    def is_state(self, layer: int) -> bool:
        """Whether ``layer`` keeps a recurrent state (a Mamba layer) instead of per-token KV."""
        return bool(self.layer_kinds) and self.layer_kinds[layer] == "mamba"

    @property
    def state_bytes(self) -> int:
        """Bytes of one Mamba layer's state: as many as one attention block of 8 tokens, so it fits a page."""
        return 8 * self.num_kv_heads * 2 * self.head_dim * self.torch_dtype.itemsize

    @property
    def state_align(self) -> bool:
        """Whether the model has Mamba layers in vLLM's ``mamba_cache_mode="align"``."""
        return self.mamba_cache_mode == "align" and "mamba" in self.layer_kinds

    def layer_specs(self, block_size: int, max_model_len: int) -> dict[str, KVCacheSpec]:
        """Each layer's KV cache spec, as vLLM's layers declare them (``get_kv_cache_spec``); a Mamba layer's
        state page is padded to the attention page, as vLLM does for a hybrid model, and its blocks are of the
        attention block size in align mode (vLLM's ``mamba_block_size``), of ``max_model_len`` tokens without."""
        specs: dict[str, KVCacheSpec] = {}
        for layer, name in enumerate(self.layer_names()):
            common = dict(block_size=block_size, num_kv_heads=self.kv_heads(layer), head_size=self.head_dim,
                          dtype=self.torch_dtype)
            window = self.window(layer)
            if self.is_state(layer):
                page = FullAttentionSpec(**common).page_size_bytes
                tokens = block_size if self.mamba_cache_mode == "align" else max_model_len
                checkpoints = dict(num_prefill_checkpoint_blocks=1, prefill_checkpoint_alignment=1) \
                    if self.mamba_checkpoints else {}
                specs[name] = MambaSpec(block_size=tokens, shapes=((self.state_bytes,),), dtypes=(torch.int8,),
                                        page_size_padded=page, mamba_cache_mode=self.mamba_cache_mode, **checkpoints)
            else:
                specs[name] = (FullAttentionSpec(**common) if window is None
                               else SlidingWindowSpec(**common, sliding_window=window))
        return specs


def write_tiny_model_config(directory: Path, spec: TinyModelSpec, max_position_embeddings: int) -> Path:
    """Write a Llama ``config.json`` for ``spec`` into ``directory`` and return the folder.

    ``ModelConfig(model=folder, skip_tokenizer_init=True)`` loads it without weights or hub access.
    """
    if max_position_embeddings <= 0:
        raise ValueError(f"max_position_embeddings must be positive, got {max_position_embeddings}")
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.num_attention_heads * spec.head_dim,
        "intermediate_size": 2 * spec.num_attention_heads * spec.head_dim,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "num_hidden_layers": spec.num_layers,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "torch_dtype": spec.dtype,
        "bos_token_id": 1,
        "eos_token_id": EOS_TOKEN_ID,
        "tie_word_embeddings": False,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def parse_connector(connector: str) -> tuple[str, str | None]:
    """Split ``"package.module:ClassName"`` into ``(ClassName, "package.module")``.

    A bare name (``"OffloadingConnector"``) is a connector registered in vLLM's factory and gives
    ``(name, None)``.
    """
    if not isinstance(connector, str) or not connector.strip():
        raise ValueError(f"connector must be 'module.path:ClassName' or a registered name, got {connector!r}")
    if ":" not in connector:
        return connector, None
    module_path, _, class_name = connector.partition(":")
    if not module_path or not class_name or ":" in class_name:
        raise ValueError(f"connector must look like 'package.module:ClassName', got {connector!r}")
    return class_name, module_path


@dataclass
class HarnessConfig:
    """Everything that shapes one harness instance.

    ``connector`` is ``"module.path:ClassName"`` (loaded through ``kv_connector_module_path``), a name
    registered in vLLM's ``KVConnectorFactory``, or ``None`` for a scheduler without KV transfer.
    ``runner`` picks the worker-side call order (``"v1"``: ``GPUModelRunner``; ``"v2"``: the V2 model
    runner), ``async_scheduling`` the engine loop (``None``: on for V2, off for V1, which is what vLLM
    0.33 does on a GPU).  ``kv_layout`` forces a standardized layout (``"LBNHC"``, ``"LBHNC"``, ...);
    ``None`` resolves it as the engine core does for a GPU backend with no layout preference
    (FlashAttention), honouring the connector's ``get_required_kvcache_layout``.  ``kv_format`` picks the
    worker tensors: vLLM 0.33's 4-D views, or classic 5-D per-layer tensors (``"flash5d"``:
    ``[2, B, N, H, D]``; ``"flashinfer5d"``: ``[B, 2, N, H, D]``).
    """

    connector: str | None = None
    connector_extra_config: dict[str, Any] = field(default_factory=dict)
    kv_role: Literal["kv_both", "kv_producer", "kv_consumer"] = "kv_both"
    kv_load_failure_policy: Literal["recompute", "fail"] = "recompute"
    model: TinyModelSpec = field(default_factory=TinyModelSpec)
    num_gpu_blocks: int = 64
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256
    enable_prefix_caching: bool = True
    #: vLLM's ``prefix_cache_retention_interval``: which sliding-window and Mamba blocks its prefix cache keeps
    #: (0, vLLM's default: the prompt's replay boundary and junctions only; None: every block).
    prefix_cache_retention_interval: int | None = 0
    runner: RunnerKind = "v1"
    async_scheduling: bool | None = None
    kv_layout: str | None = None
    kv_format: KVFormat = "views"
    verify: VerifyMode = "admission"
    run_worker_connector: bool = True
    #: Hand the workers' handshake metadata to the scheduler-side connector once they are built, as vLLM's
    #: ``EngineCore`` does after KV cache registration (``_set_kv_connector_handshake_metadata``).
    handshake: bool = True

    def __post_init__(self) -> None:
        if self.runner not in ("v1", "v2"):
            raise ValueError(f"runner must be 'v1' or 'v2', got {self.runner!r}")
        if self.kv_format not in ("views", "flash5d", "flashinfer5d"):
            raise ValueError(f"kv_format must be 'views', 'flash5d' or 'flashinfer5d', got {self.kv_format!r}")
        if self.verify not in ("admission", "every_step", "off"):
            raise ValueError(f"verify must be 'admission', 'every_step' or 'off', got {self.verify!r}")
        if self.kv_format != "views" and self.kv_layout is not None:
            raise ValueError(f"kv_layout applies to kv_format='views' only, got {self.kv_layout!r}")
        for name in ("num_gpu_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"HarnessConfig.{name} must be a positive int, got {value!r}")
        if self.num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks must be >= 2 (one is vLLM's null block), got {self.num_gpu_blocks}")
        if self.connector is not None:
            parse_connector(self.connector)

    @property
    def use_async_scheduling(self) -> bool:
        """Whether the engine loop overlaps scheduling with execution (vLLM's batch queue)."""
        return self.runner == "v2" if self.async_scheduling is None else self.async_scheduling

    @property
    def resolved_max_model_len(self) -> int:
        """``max_model_len``, by default the largest that the usable GPU blocks can hold."""
        if self.max_model_len is not None:
            return self.max_model_len
        return (self.num_gpu_blocks - 1) * self.block_size


@contextlib.contextmanager
def _env_var(name: str, value: str) -> Iterator[None]:
    """Set one environment variable for the duration of a block, then restore it."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def build_vllm_config(config: HarnessConfig, model_dir: Path) -> VllmConfig:
    """Build the ``VllmConfig`` of a CPU engine for the tiny model in ``model_dir``.

    For ``runner="v2"`` the config is built with ``VLLM_USE_V2_MODEL_RUNNER=1`` (the CPU platform
    would otherwise pick V1 because Triton is missing); async scheduling is switched on afterwards
    when asked for, because the CPU platform's ``check_and_update_config`` always turns it off.
    """
    max_model_len = config.resolved_max_model_len
    model_config = ModelConfig(
        model=str(model_dir),
        skip_tokenizer_init=True,
        dtype=config.model.dtype,
        max_model_len=max_model_len,
        seed=0,
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=max_model_len,
        is_encoder_decoder=False,
    )
    align = dict(mamba_cache_mode="align", mamba_block_size=config.block_size) if config.model.state_align else {}
    cache_config = CacheConfig(
        block_size=config.block_size,
        enable_prefix_caching=config.enable_prefix_caching,
        prefix_cache_retention_interval=config.prefix_cache_retention_interval,
        **align,
    )
    cache_config.num_gpu_blocks_override = config.num_gpu_blocks
    kv_transfer_config = None
    if config.connector is not None:
        class_name, module_path = parse_connector(config.connector)
        kv_transfer_config = KVTransferConfig(
            kv_connector=class_name,
            kv_connector_module_path=module_path,
            kv_role=config.kv_role,
            kv_connector_extra_config=dict(config.connector_extra_config),
            kv_load_failure_policy=config.kv_load_failure_policy,
        )
    with _env_var("VLLM_USE_V2_MODEL_RUNNER", "1" if config.runner == "v2" else "0"):
        vllm_config = VllmConfig(
            model_config=model_config,
            scheduler_config=scheduler_config,
            cache_config=cache_config,
            kv_transfer_config=kv_transfer_config,
            device_config=DeviceConfig("cpu"),
        )
        vllm_config.scheduler_config.async_scheduling = config.use_async_scheduling
        if config.kv_layout is not None:
            vllm_config.cache_config.kv_cache_layout = config.kv_layout
    return vllm_config


@dataclass
class PlannedKVCache:
    """The KV cache plan as vLLM's engine core makes it (``EngineCore._initialize_kv_caches``)."""

    worker_config: KVCacheConfig
    scheduler_config: KVCacheConfig
    scheduler_block_size: int
    hash_block_size: int


def plan_kv_cache(vllm_config: VllmConfig, model: TinyModelSpec, num_gpu_blocks: int) -> PlannedKVCache:
    """Resolve the layout and plan ``num_gpu_blocks`` blocks for the model's layers (full attention, or a hybrid
    of full and sliding-window attention: vLLM's hybrid KV cache manager puts each kind in its own groups)."""
    register_all_kvcache_specs(vllm_config)
    block_size = vllm_config.cache_config.block_size
    specs = model.layer_specs(block_size, vllm_config.model_config.max_model_len)
    supported = [layout.name for layout in get_supported_kv_cache_layouts([])]
    resolve_kv_cache_layout(vllm_config, [supported], list(specs.values()))
    groups = get_global_kv_cache_groups(vllm_config, [specs])
    # Memory for the blocks of every layer (a hybrid plan needs less: its groups share tensors); the block count
    # is num_gpu_blocks_override's either way.
    bytes_per_block = sum(spec.page_size_bytes for spec in specs.values())
    worker_configs = get_kv_cache_configs(vllm_config, [specs], [bytes_per_block * num_gpu_blocks], groups)
    for kv_cache_config in worker_configs:
        kv_cache_config.kv_cache_layout = vllm_config.cache_config.kv_cache_layout
    scheduler_config = generate_scheduler_kv_cache_config(worker_configs)
    vllm_config.cache_config.num_gpu_blocks = scheduler_config.num_blocks
    scheduler_block_size, hash_block_size = resolve_kv_cache_block_sizes(scheduler_config, vllm_config)
    alignment = resolve_cache_hit_alignment_tokens(
        scheduler_config, vllm_config, scheduler_block_size, hash_block_size
    )
    for kv_cache_config in (*worker_configs, scheduler_config):
        kv_cache_config.hash_block_size = hash_block_size
        kv_cache_config.cache_hit_alignment_tokens = alignment
    if scheduler_config.num_blocks != num_gpu_blocks:
        raise ValueError(f"vLLM planned {scheduler_config.num_blocks} blocks, expected {num_gpu_blocks}")
    return PlannedKVCache(worker_configs[0], scheduler_config, scheduler_block_size, hash_block_size)


# --------------------------------------------------------------------------------------------------
# Deterministic "model": KV bytes as a function of (prefix, layer, salt/LoRA)
# --------------------------------------------------------------------------------------------------


def _mix64(value: int) -> int:
    """SplitMix64 finaliser on a Python int (64-bit wrap-around)."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _mix64_array(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrap-around arithmetic, no warnings)."""
    values = values + np.uint64(0x9E3779B97F4A7C15)
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def request_seed(cache_salt: str | None, lora_name: str | None) -> int:
    """64-bit seed of a request's KV stream.

    Salt and LoRA name both enter, so KV that a connector wrongly shares across salts or adapters
    shows up as a byte mismatch (a real model gives different KV for a different adapter; salt only
    isolates caches, but treating it as content is what makes a salt leak detectable).
    """
    text = f"salt={cache_salt!r};lora={lora_name!r}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


class KVOracle:
    """Computes the KV a token position holds, for every layer, from its prefix hash.

    ``prefix_hash[p] = mix(prefix_hash[p - 1] ^ token[p])`` starting from the request seed, so the KV of
    position ``p`` depends on every token up to ``p``.  Values are uniform in [-1, 1) on a 2**-23 grid,
    rounded to the cache dtype: always finite, never NaN (the poison), never all-zero.
    """

    def __init__(self, model: TinyModelSpec) -> None:
        self.model = model
        heads = max([model.num_kv_heads, *model.layer_kv_heads])
        self._element_offsets = np.arange(heads * 2 * model.head_dim, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)

    @staticmethod
    def extend_prefix_hashes(hashes: list[int], seed: int, tokens: Sequence[int]) -> None:
        """Append the prefix hashes of ``tokens[len(hashes):]`` to ``hashes``."""
        state = hashes[-1] if hashes else seed
        for token in tokens[len(hashes):]:
            state = _mix64(state ^ token)
            hashes.append(state)

    def kv(self, prefix_hashes: Sequence[int], layer: int) -> torch.Tensor:
        """KV of the given positions in ``layer``: tensor ``[n, the layer's kv_heads, 2, head_dim]`` (K, V)."""
        n, heads = len(prefix_hashes), self.model.kv_heads(layer)
        offsets = self._element_offsets[: heads * 2 * self.model.head_dim]
        base = _mix64_array(np.asarray(prefix_hashes, dtype=np.uint64) ^ np.uint64((layer + 1) * 0x632BE59BD9B4E019 & _MASK64))
        bits = _mix64_array(base[:, None] + offsets[None, :]) >> np.uint64(40)
        values = bits.astype(np.float32) * np.float32(2.0 ** -23) - np.float32(1.0)
        tensor = torch.from_numpy(values.reshape(n, heads, 2, self.model.head_dim))
        return tensor.to(self.model.torch_dtype)


def state_bytes(prefix_hash: int, layer: int, nbytes: int) -> torch.Tensor:
    """The recurrent state (``nbytes`` int8) of a Mamba ``layer`` after the token whose prefix hash is given."""
    words = -(-nbytes // 8)
    key = np.uint64(((layer + 1) * 0x9E6C63D0676A9A99) & _MASK64)
    values = _mix64_array(np.uint64(prefix_hash) ^ (key + np.arange(words, dtype=np.uint64)))
    return torch.from_numpy(values.view(np.int8)[:nbytes].copy())


def sample_token(seed: int, request_id: str, position: int, vocab_size: int) -> int:
    """Deterministic "sampled" token of ``request_id`` at ``position`` (never a special token)."""
    digest = hashlib.blake2b(f"{request_id}@{position}".encode(), digest_size=8).digest()
    value = _mix64(int.from_bytes(digest, "little") ^ seed)
    return FIRST_REGULAR_TOKEN + value % (vocab_size - FIRST_REGULAR_TOKEN)


# --------------------------------------------------------------------------------------------------
# Worker-side KV tensors
# --------------------------------------------------------------------------------------------------


def canonical_token_view(tensor: torch.Tensor, kv_format: KVFormat, head_dim: int) -> torch.Tensor:
    """View one layer's KV tensor as ``[num_blocks, block_size, kv_heads, 2, head_dim]`` (no copy).

    Writing through the view writes the engine tensor; the harness reads and writes KV only this way.
    """
    if kv_format == "views":
        if tensor.dim() != 4 or tensor.shape[-1] != 2 * head_dim:
            raise ValueError(f"expected a [B, H, N, {2 * head_dim}] view, got shape {tuple(tensor.shape)}")
        return tensor.unflatten(-1, (2, head_dim)).permute(0, 2, 1, 3, 4)
    if kv_format == "flash5d":
        if tensor.dim() != 5 or tensor.shape[0] != 2:
            raise ValueError(f"expected a [2, B, N, H, D] tensor, got shape {tuple(tensor.shape)}")
        return tensor.permute(1, 2, 3, 0, 4)
    if kv_format == "flashinfer5d":
        if tensor.dim() != 5 or tensor.shape[1] != 2:
            raise ValueError(f"expected a [B, 2, N, H, D] tensor, got shape {tuple(tensor.shape)}")
        return tensor.permute(0, 2, 3, 1, 4)
    raise ValueError(f"unknown kv_format {kv_format!r}")


def allocate_worker_kv_caches(
    kv_cache_config: KVCacheConfig, vllm_config: VllmConfig, model: TinyModelSpec, kv_format: KVFormat
) -> dict[str, torch.Tensor]:
    """Allocate the per-layer KV tensors a worker hands to ``register_kv_caches``.

    ``"views"`` calls vLLM 0.33's own ``allocate_kv_cache`` (what both model runners do); the 5-D
    formats allocate one tensor per layer as vLLM versions before the standardized layout did.
    """
    if kv_format == "views":
        layout = vllm_config.cache_config.get_resolved_kv_cache_layout()
        return allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout)
    if model.layer_kv_heads:
        raise ValueError(f"kv_format {kv_format!r} allocates one shape for every layer; layer_kv_heads needs 'views'")
    blocks, tokens = kv_cache_config.num_blocks, vllm_config.cache_config.block_size
    heads, dim = model.num_kv_heads, model.head_dim
    shape = (2, blocks, tokens, heads, dim) if kv_format == "flash5d" else (blocks, 2, tokens, heads, dim)
    return {name: torch.zeros(shape, dtype=model.torch_dtype) for name in model.layer_names()}


@dataclass
class HarnessAttentionMetadata(AttentionMetadata):
    """Per-layer attention metadata the harness puts in the forward context.

    ``slot_mapping[i]`` is the flat slot (``block_id * block_size + offset``) of the i-th scheduled token.
    """

    slot_mapping: torch.Tensor
    num_actual_tokens: int


class HarnessAttentionLayer:
    """Stand-in for an attention layer in ``static_forward_context`` (what connectors look up)."""

    def __init__(self, layer_name: str, kv_cache: torch.Tensor) -> None:
        self.layer_name = layer_name
        self.kv_cache = kv_cache


class KVMismatchError(AssertionError):
    """KV read by the emulated attention differs from the KV the deterministic model computed."""


# --------------------------------------------------------------------------------------------------
# Worker harness
# --------------------------------------------------------------------------------------------------


@dataclass
class _WorkerRequest:
    """What the emulated model runner keeps per request."""

    request_id: str
    seed: int
    tokens: list[int]
    block_ids: list[list[int]]  #: per KV cache group
    prefix_hashes: list[int] = field(default_factory=list)
    needs_verify: bool = True
    num_prompt: int = 0


@dataclass
class WorkerStepReport:
    """Counters of one worker step (for tests)."""

    verified_tokens: int = 0
    verified_states: int = 0
    computed_tokens: int = 0
    poisoned_blocks: int = 0


class WorkerHarness:
    """Emulates one vLLM 0.33 worker: KV tensors, the worker-side connector, and the model runner order.

    ``execute(scheduler_output, new_block_ids)`` runs one engine step and returns the
    ``ModelRunnerOutput`` the scheduler's ``update_from_output`` expects.  ``new_block_ids`` are the
    blocks the scheduler handed out since the previous step; they are poisoned right after
    ``handle_preemptions`` (the point where a connector has flushed stores that still read them).
    """

    def __init__(
        self,
        config: HarnessConfig,
        vllm_config: VllmConfig,
        kv_cache_config: KVCacheConfig,
        seeds: dict[str, int],
    ) -> None:
        self.config = config
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.model = config.model
        self.block_size = vllm_config.cache_config.block_size
        self.oracle = KVOracle(config.model)
        self.layer_names = config.model.layer_names()
        # KV cache group of each layer (a hybrid model's groups each have their own block table).
        self.layer_groups = [
            next(k for k, group in enumerate(kv_cache_config.kv_cache_groups) if name in group.layer_names)
            for name in self.layer_names
        ]
        self.num_groups = len(kv_cache_config.kv_cache_groups)
        # Tokens per block of each KV cache group (vLLM scales a group's block size up to even out page sizes).
        self.group_block_sizes = [group.kv_cache_spec.block_size for group in kv_cache_config.kv_cache_groups]
        self._seeds = seeds
        self.kv_caches = allocate_worker_kv_caches(kv_cache_config, vllm_config, config.model, config.kv_format)
        # Per layer, the engine tensor seen as [num_blocks, block_size, kv_heads, 2, head_dim] (no copy).
        self.token_views = {
            name: canonical_token_view(self.kv_caches[name], config.kv_format, config.model.head_dim)
            for layer, name in enumerate(self.layer_names) if not self.model.is_state(layer)
        }
        # Per Mamba layer, its int8 ``[num_blocks, page]`` view: a block's state is its first bytes.
        self.state_views = {
            name: self.kv_caches[name].reshape(self.kv_caches[name].shape[0], -1)
            for layer, name in enumerate(self.layer_names) if self.model.is_state(layer)
        }
        for view in self.token_views.values():
            view.fill_(float("nan"))
        self.layers = {name: HarnessAttentionLayer(name, self.kv_caches[name]) for name in self.layer_names}
        vllm_config.compilation_config.static_forward_context.update(self.layers)
        self.requests: dict[str, _WorkerRequest] = {}
        self.connector: KVConnectorBase_V1 | None = None
        self.call_log: list[str] = []
        self.last_report = WorkerStepReport()
        self._mismatches: list[tuple[_WorkerRequest, set[int], str]] = []
        if vllm_config.kv_transfer_config is not None and config.run_worker_connector:
            with set_current_vllm_config(vllm_config):
                connector = KVConnectorFactory.create_connector(
                    config=vllm_config, role=KVConnectorRole.WORKER, kv_cache_config=kv_cache_config
                )
            if not isinstance(connector, KVConnectorBase_V1):
                raise TypeError(f"worker connector must be a KVConnectorBase_V1, got {type(connector).__name__}")
            self.connector = connector
            self._call("register_kv_caches", dict(self.kv_caches))
            self._call("set_host_xfer_buffer_ops", copy_kv_blocks)

    # -- connector calls, logged by name so tests can check the order -------------------------------

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        assert self.connector is not None
        self.call_log.append(name)
        return getattr(self.connector, name)(*args, **kwargs)

    # -- request state ------------------------------------------------------------------------------

    def _adopt_tokens(self, state: _WorkerRequest, tokens: Sequence[int]) -> None:
        """Take the scheduler's token list, keeping tokens this worker sampled beyond it."""
        known = state.tokens
        common = min(len(known), len(tokens))
        if list(tokens[:common]) != known[:common]:
            raise KVMismatchError(f"request {state.request_id}: scheduler tokens diverge from the worker's")
        if len(tokens) > len(known):
            state.tokens = list(tokens)

    def _update_states(self, so: SchedulerOutput) -> list[tuple[_WorkerRequest, int, int]]:
        """Apply the scheduler output to the request table; return (state, first position, count)."""
        finished = set(so.finished_req_ids)
        if self.config.runner == "v2" and so.preempted_req_ids:
            finished |= so.preempted_req_ids
        for request_id in finished:
            self.requests.pop(request_id, None)
        scheduled: list[tuple[_WorkerRequest, int, int]] = []
        for new in so.scheduled_new_reqs:
            tokens = new.prefill_token_ids if new.prefill_token_ids is not None else new.prompt_token_ids
            if tokens is None:
                raise ValueError(f"request {new.req_id} carries neither prompt nor prefill token ids")
            state = self.requests.get(new.req_id)
            if state is None:
                prompt = new.prompt_token_ids if new.prompt_token_ids is not None else tokens
                state = _WorkerRequest(new.req_id, self._seeds[new.req_id], list(tokens), [], num_prompt=len(prompt))
                self.requests[new.req_id] = state
            else:
                self._adopt_tokens(state, tokens)
            state.block_ids = [list(ids) for ids in new.block_ids]
            state.needs_verify = True
            scheduled.append((state, new.num_computed_tokens, so.num_scheduled_tokens[new.req_id]))
        cached = so.scheduled_cached_reqs
        for i, request_id in enumerate(cached.req_ids):
            state = self.requests.get(request_id)
            if state is None:
                raise ValueError(f"scheduled request {request_id} is unknown to the worker")
            if request_id in cached.all_token_ids:
                self._adopt_tokens(state, cached.all_token_ids[request_id])
            if not self.config.use_async_scheduling:  # (there the count includes tokens still in flight)
                # tokens the scheduler discarded (a sync load failed on some rank) are dropped, as V1's runner does
                del state.tokens[state.num_prompt + cached.num_output_tokens[i]:]
            new_blocks = cached.new_block_ids[i]
            if request_id in cached.resumed_req_ids:
                if new_blocks is None:
                    raise ValueError(f"resumed request {request_id} came without its block ids")
                state.block_ids = [list(ids) for ids in new_blocks]
                state.needs_verify = True
            elif new_blocks is not None:
                for table, ids in zip(state.block_ids, new_blocks):
                    table.extend(ids)
            scheduled.append((state, cached.num_computed_tokens[i], so.num_scheduled_tokens[request_id]))
        return scheduled

    def _slots(
        self, state: _WorkerRequest, start: int, stop: int, group: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block indices, in-block offsets) of positions ``[start, stop)`` of a request in KV cache ``group``."""
        table_ids, block_size = state.block_ids[group], self.group_block_sizes[group]
        last_block = (stop - 1) // block_size if stop > start else -1
        if last_block >= len(table_ids):
            raise ValueError(
                f"request {state.request_id}: position {stop - 1} needs block #{last_block} of group {group}, "
                f"but only {len(table_ids)} blocks are assigned"
            )
        positions = torch.arange(start, stop)
        table = torch.tensor(table_ids, dtype=torch.long)
        blocks = table[positions // block_size]
        if stop > start and bool((blocks == 0).any()):
            raise KVMismatchError(
                f"request {state.request_id}: positions [{start}, {stop}) of group {group} fall in vLLM's null block"
            )
        return blocks, positions % block_size

    def attended_start(self, layer: int, stop: int) -> int:
        """The first cached position the token at ``stop`` reads in ``layer`` (its window's start)."""
        window = self.model.window(layer)
        return 0 if window is None else max(0, stop - window + 1)

    def _prefix_hashes(self, state: _WorkerRequest, stop: int) -> list[int]:
        if stop > len(state.tokens):
            raise ValueError(
                f"request {state.request_id}: position {stop - 1} scheduled but only "
                f"{len(state.tokens)} tokens are known"
            )
        KVOracle.extend_prefix_hashes(state.prefix_hashes, state.seed, state.tokens[:stop])
        return state.prefix_hashes[:stop]

    # -- per-step work ------------------------------------------------------------------------------

    def poison_blocks(self, block_ids: Sequence[int]) -> None:
        """Fill whole blocks of every layer with NaN (never a value the oracle produces)."""
        if not block_ids:
            return
        index = torch.tensor(sorted(set(block_ids)), dtype=torch.long)
        for view in self.token_views.values():
            view[index] = float("nan")
        for view in self.state_views.values():
            view[index] = -91  # 0xA5, a byte pattern the oracle's states do not take block-wide
        self.last_report.poisoned_blocks += len(index)

    def expected_kv(self, request_id: str, layer: int, start: int, stop: int) -> torch.Tensor:
        """The KV ``[n, H, 2, D]`` positions ``[start, stop)`` of a running request must hold."""
        state = self.requests[request_id]
        return self.oracle.kv(self._prefix_hashes(state, stop)[start:stop], layer)

    def read_kv(self, request_id: str, layer: int, start: int, stop: int) -> torch.Tensor:
        """The KV ``[n, H, 2, D]`` the cache holds for positions ``[start, stop)`` of a request."""
        state = self.requests[request_id]
        blocks, offsets = self._slots(state, start, stop, self.layer_groups[layer])
        return self.token_views[self.layer_names[layer]][blocks, offsets]

    def mismatched_positions(self, request_id: str, layer: int, stop: int) -> list[int]:
        """Positions of ``[0, stop)`` that the token at ``stop`` attends to in ``layer`` (all of them, or those of
        its sliding window) whose cached bytes differ from the oracle's."""
        start = self.attended_start(layer, stop)
        if stop <= start:
            return []
        actual = self.read_kv(request_id, layer, start, stop)
        expected = self.expected_kv(request_id, layer, start, stop)
        width = actual.element_size() * actual[0].numel()
        bad = (
            actual.contiguous().view(torch.uint8).reshape(stop - start, width)
            != expected.contiguous().view(torch.uint8).reshape(stop - start, width)
        ).any(dim=1)
        return (torch.nonzero(bad).flatten() + start).tolist()

    def verify_context(self, request_id: str, layer: int, stop: int) -> int:
        """Check the positions before ``stop`` that ``layer`` attends to byte-exactly (returns how many); raise
        :class:`KVMismatchError`."""
        positions = self.mismatched_positions(request_id, layer, stop)
        if positions:
            raise KVMismatchError(self._mismatch_message(request_id, layer, stop, positions))
        return max(stop - self.attended_start(layer, stop), 0)

    def _mismatch_message(self, request_id: str, layer: int, stop: int, positions: list[int]) -> str:
        first, group = positions[0], self.layer_groups[layer]
        block_size = self.group_block_sizes[group]
        block = self.requests[request_id].block_ids[group][first // block_size]
        return (
            f"request {request_id} layer {layer}: {len(positions)} of {stop} context positions hold "
            f"wrong KV; first at position {first} (block {block}, offset {first % block_size})"
        )

    def _check_admitted_context(self, state: _WorkerRequest, layer: int, stop: int) -> None:
        """Verify the context an attention layer reads; keep mismatches for :meth:`_settle_mismatches`."""
        positions = self.mismatched_positions(state.request_id, layer, stop)
        self.last_report.verified_tokens += max(stop - self.attended_start(layer, stop), 0)
        if positions:
            group = self.layer_groups[layer]
            blocks = {state.block_ids[group][p // self.group_block_sizes[group]] for p in positions}
            message = self._mismatch_message(state.request_id, layer, stop, positions)
            self._mismatches.append((state, blocks, message))

    def _settle_mismatches(self, invalid_block_ids: set[int]) -> None:
        """Raise for wrong KV, unless it lies in blocks the connector reported as failed loads.

        vLLM recomputes from the first failed block, so such a request's context is checked again
        when it next runs.
        """
        mismatches, self._mismatches = self._mismatches, []
        for state, blocks, message in mismatches:
            if not blocks <= invalid_block_ids:
                raise KVMismatchError(f"{message}; not reported by get_block_ids_with_load_errors")
            state.needs_verify = True

    def state_blocks(self, state: _WorkerRequest, layer: int, start: int, count: int) -> tuple[int, int]:
        """(block read, block written) by a Mamba ``layer`` in a step computing ``count`` tokens after ``start``:
        block 0 of the table without prefix caching; in align mode, as both of vLLM's model runners place it
        (``preprocess_mamba``, the V2 ``MambaHybridModelState``), the state after ``start`` tokens is in column
        ``(start - 1) // block_size`` and the step's state goes to column ``cdiv(start + count, block_size) - 1``
        (copied there first when the columns differ)."""
        group = self.layer_groups[layer]
        table, block_size = state.block_ids[group], self.group_block_sizes[group]
        if self.model.mamba_cache_mode != "align":
            src = dst = 0
        else:
            src, dst = max(start - 1, 0) // block_size, -(-(start + count) // block_size) - 1
        if max(src, dst) >= len(table) or table[dst] == 0 or (start > 0 and table[src] == 0):
            raise KVMismatchError(f"request {state.request_id}: Mamba layer {layer} reads column {src} and writes "
                                  f"column {dst} of its state blocks {table} (0 is vLLM's null block)")
        return table[src], table[dst]

    def checkpoint_block(self, state: _WorkerRequest, layer: int, start: int, count: int) -> tuple[int, int] | None:
        """``(tokens, block)``: where a Mamba backend with prefill checkpoints (``mamba_checkpoints``) exports the
        state after ``tokens`` in a step computing ``count`` tokens after ``start``, or None; the rule is vLLM's
        own (``compute_mamba_prefill_checkpoints``, which backends call to decline in lockstep with the
        scheduler). The block is whatever the table holds at the checkpoint's column: vLLM's null block (0) where
        the scheduler reserved none (it reserves one only in a prefill's last chunk, unless its prefix cache keeps
        every state), as the backend's gather of the block table gives."""
        if not self.model.mamba_checkpoints:
            return None
        group = self.layer_groups[layer]
        block_size, spec = self.group_block_sizes[group], self.kv_cache_config.kv_cache_groups[group].kv_cache_spec
        offsets, columns = compute_mamba_prefill_checkpoints(
            [start + count], [count], hash_block_size=self.kv_cache_config.hash_block_size,
            mamba_block_size=block_size, checkpoint_alignment=spec.prefill_checkpoint_alignment,
            drop_eagle_block=False, cache_hit_alignment_tokens=self.kv_cache_config.cache_hit_alignment_tokens)
        if offsets[0] <= 0:
            return None
        table = state.block_ids[group]
        return start + offsets[0], table[columns[0]] if columns[0] < len(table) else 0

    def _step_state(self, state: _WorkerRequest, layer: int, start: int, count: int) -> None:
        """A Mamba layer's step: read the state after ``start`` tokens (checked byte-exactly unless verification is
        off: every step reads it), write the state after ``start + count`` (`state_blocks` says where) and, with
        prefill checkpoints, the state at the checkpoint (`checkpoint_block`)."""
        src, dst = self.state_blocks(state, layer, start, count)
        view, nbytes = self.state_views[self.layer_names[layer]], self.model.state_bytes
        hashes = self._prefix_hashes(state, start + count)
        if start > 0 and self.config.verify != "off":
            self.last_report.verified_states += 1
            if not torch.equal(view[src, :nbytes], state_bytes(hashes[start - 1], layer, nbytes)):
                self._mismatches.append((state, {src}, f"request {state.request_id} Mamba layer {layer}: the "
                                         f"state after {start} tokens in block {src} is wrong"))
        checkpoint = self.checkpoint_block(state, layer, start, count)
        if checkpoint is not None:
            tokens, block = checkpoint
            view[block, :nbytes] = state_bytes(hashes[tokens - 1], layer, nbytes)
        view[dst, :nbytes] = state_bytes(hashes[start + count - 1], layer, nbytes)

    def _write_kv(self, state: _WorkerRequest, layer: int, start: int, stop: int) -> None:
        blocks, offsets = self._slots(state, start, stop, self.layer_groups[layer])
        values = self.oracle.kv(self._prefix_hashes(state, stop)[start:stop], layer)
        self.token_views[self.layer_names[layer]][blocks, offsets] = values

    def _attn_metadata(self, work: list[tuple[_WorkerRequest, int, int]]) -> dict[str, HarnessAttentionMetadata]:
        per_group = []
        state_groups = {g for layer, g in enumerate(self.layer_groups) if self.model.is_state(layer)}
        for group in range(self.num_groups):
            slots = []
            for state, start, count in work if group not in state_groups else ():
                blocks, offsets = self._slots(state, start, start + count, group)
                slots.append(blocks * self.group_block_sizes[group] + offsets)
            slot_mapping = torch.cat(slots) if slots else torch.empty(0, dtype=torch.long)
            per_group.append(HarnessAttentionMetadata(slot_mapping=slot_mapping,
                                                      num_actual_tokens=int(slot_mapping.numel())))
        return {name: per_group[group] for name, group in zip(self.layer_names, self.layer_groups)}

    def _forward(self, work: list[tuple[_WorkerRequest, int, int]], attn: dict[str, HarnessAttentionMetadata]) -> None:
        """Each attention layer: wait_for_layer_load, read (verify) context, write new KV, save_kv_layer."""
        hooks = self.connector is not None and self.connector.has_connector_metadata()
        for layer, name in enumerate(self.layer_names):
            if hooks:
                self._call("wait_for_layer_load", name)
            for state, start, count in work:
                if self.model.is_state(layer):
                    self._step_state(state, layer, start, count)
                    continue
                if self.config.verify == "every_step" or (self.config.verify == "admission" and state.needs_verify):
                    self._check_admitted_context(state, layer, start)
                self._write_kv(state, layer, start, start + count)
            if hooks:
                self._call("save_kv_layer", name, self.kv_caches[name], attn[name])
        for state, _, count in work:
            state.needs_verify = False
            self.last_report.computed_tokens += count

    def _sample(
        self, work: list[tuple[_WorkerRequest, int, int]], invalid_block_ids: set[int] | None = None
    ) -> tuple[list[str], list[list[int]]]:
        """One token for each request whose known tokens are all computed now.

        Requests holding a block the connector failed to load sample nothing: vLLM drops their output
        and recomputes them.
        """
        request_ids, sampled = [], []
        for state, start, count in work:
            request_ids.append(state.request_id)
            if invalid_block_ids and any(not invalid_block_ids.isdisjoint(ids) for ids in state.block_ids):
                sampled.append([])
            elif start + count >= len(state.tokens):
                token = sample_token(state.seed, state.request_id, len(state.tokens), self.model.vocab_size)
                state.tokens.append(token)
                sampled.append([token])
            else:
                sampled.append([])
        return request_ids, sampled

    def _collect(self, so: SchedulerOutput, none_if_empty: bool) -> KVConnectorOutput:
        """wait_for_save ... clear_connector_metadata, as both runners do after the forward."""
        self._call("wait_for_save")
        results = self._call("get_transfer_results", so.finished_req_ids)
        output = KVConnectorOutput(
            finished_sending=(results.finished_sending or None) if none_if_empty else results.finished_sending,
            finished_recving=(results.finished_recving or None) if none_if_empty else results.finished_recving,
            failed_recving=results.failed_recving,
        )
        output.invalid_block_ids = self._call("get_block_ids_with_load_errors")
        self._settle_mismatches(set(output.invalid_block_ids))
        output.kv_connector_stats = self._call("get_kv_connector_stats")
        output.kv_cache_events = self._call("get_kv_connector_kv_cache_events")
        output.kv_connector_worker_meta = self._call("build_connector_worker_meta")
        self._call("clear_connector_metadata")
        return output

    def execute(self, so: SchedulerOutput, new_block_ids: Sequence[int]) -> ModelRunnerOutput:
        """Run one step in the configured runner's order and return the model runner output."""
        self.last_report = WorkerStepReport()
        if self.connector is None:
            work = self._update_states(so)
            self.poison_blocks(new_block_ids)
            if not work:
                return ModelRunnerOutput(req_ids=[], req_id_to_index={})
            self._forward(work, self._attn_metadata(work))
            self._settle_mismatches(set())
            return self._output(*self._sample(work), kv_output=None)
        if so.kv_connector_metadata is None:
            raise ValueError("a scheduler with a KV connector must attach kv_connector_metadata")
        if self.config.runner == "v1":
            return self._execute_v1(so, new_block_ids)
        return self._execute_v2(so, new_block_ids)

    def _output(self, request_ids: list[str], sampled: list[list[int]], kv_output: KVConnectorOutput | None) -> ModelRunnerOutput:
        return ModelRunnerOutput(
            req_ids=request_ids,
            req_id_to_index={rid: i for i, rid in enumerate(request_ids)},
            sampled_token_ids=sampled,
            kv_connector_output=kv_output,
        )

    def _execute_v1(self, so: SchedulerOutput, new_block_ids: Sequence[int]) -> ModelRunnerOutput:
        """``GPUModelRunner.execute_model`` + ``sample_tokens`` (``KVConnectorModelRunnerMixin``)."""
        self._call("handle_preemptions", so.kv_connector_metadata)
        self.poison_blocks(new_block_ids)
        work = self._update_states(so)
        attn = self._attn_metadata(work) if work else None
        with set_forward_context(attn, self.vllm_config):
            self._call("bind_connector_metadata", so.kv_connector_metadata)
            if so.has_sync_kv_loads:
                self._call("start_load_kv", get_forward_context())
            if work:
                self._forward(work, attn)
            if not so.has_sync_kv_loads:
                self._call("start_load_kv", get_forward_context())
            kv_output = self._collect(so, none_if_empty=False)
        if not work:
            return ModelRunnerOutput.with_kv_conn_output_only(kv_output)
        return self._output(*self._sample(work, kv_output.invalid_block_ids), kv_output=kv_output)

    def _execute_v2(self, so: SchedulerOutput, new_block_ids: Sequence[int]) -> ModelRunnerOutput:
        """V2 ``GPUModelRunner.execute_model`` + ``sample_tokens`` (``ActiveKVConnector``)."""
        work = self._update_states(so)
        attn = self._attn_metadata(work) if work else None
        load_kwargs: dict[str, Any] | None = {}
        if work:
            load_kwargs = dict(
                scheduler_output=so,
                request_state_indices=torch.arange(len(work), dtype=torch.int32),
                request_ids=[state.request_id for state, _, _ in work],
                num_tokens=sum(count for _, _, count in work),
            )
        context = set_forward_context(attn, self.vllm_config) if work else contextlib.nullcontext()
        with context:
            self._call("handle_preemptions", so.kv_connector_metadata)
            self.poison_blocks(new_block_ids)
            self._call("bind_connector_metadata", so.kv_connector_metadata)
            if so.has_sync_kv_loads:
                self._start_load_v2(load_kwargs)
                load_kwargs = None  # started; post_forward has nothing left to start
            if work:
                self._forward(work, attn)
        self._call("finish_forward")
        # What follows is post_forward (called from sample_tokens, or from no_forward).
        if load_kwargs is not None:
            self._start_load_v2(load_kwargs)
        kv_output = self._collect(so, none_if_empty=True)
        if not work:
            return ModelRunnerOutput.with_kv_conn_output_only(kv_output)
        return self._output(*self._sample(work, kv_output.invalid_block_ids), kv_output=kv_output)

    def _start_load_v2(self, load_kwargs: dict[str, Any]) -> None:
        if is_forward_context_available():
            self._call("start_load_kv", get_forward_context(), **load_kwargs)
            return
        with set_forward_context(None, self.vllm_config):
            self._call("start_load_kv", get_forward_context(), **load_kwargs)

    def handshake_metadata(self) -> list[dict[tuple[int, int], Any] | None]:
        """What ``Executor.get_kv_connector_handshake_metadata`` returns: per worker, ``{(pipeline rank, tensor
        rank): metadata}`` or None (``Worker.get_kv_connector_handshake_metadata``)."""
        meta = self.connector.get_handshake_metadata() if self.connector is not None else None
        return [{(0, 0): meta} if meta is not None else None]

    def shutdown(self) -> None:
        """Shut the worker-side connector down and drop the layers from the forward context."""
        if self.connector is not None:
            self.connector.shutdown()
        for name in self.layer_names:
            self.vllm_config.compilation_config.static_forward_context.pop(name, None)


# --------------------------------------------------------------------------------------------------
# vLLM's OffloadingConnector on CPU: the real connector with a CPU data mover
# --------------------------------------------------------------------------------------------------


class HarnessCPUOffloadWorker(OffloadingWorker):
    """CPU data mover for vLLM's ``OffloadingConnector`` (its worker otherwise needs CUDA streams).

    Copies pages between the engine's KV blocks (``CanonicalKVCaches``) and a CPU chunk store at
    submit time; completions are reported by ``get_finished`` after ``completion_delay`` calls, so the
    connector's asynchronous paths (requests waiting for loads, deferred stores) are exercised.
    Supports one KV cache group with one GPU block per chunk.
    """

    def __init__(self, kv_caches: CanonicalKVCaches, num_chunks: int, blocks_per_chunk: int, completion_delay: int) -> None:
        if blocks_per_chunk != 1:
            raise ValueError(f"HarnessCPUOffloadWorker supports blocks_per_chunk=1, got {blocks_per_chunk}")
        if len(kv_caches.group_data_refs) != 1:
            raise ValueError(f"HarnessCPUOffloadWorker supports one KV cache group, got {len(kv_caches.group_data_refs)}")
        if completion_delay < 0:
            raise ValueError(f"completion_delay must be >= 0, got {completion_delay}")
        self._gpu = [entry.tensor for entry in kv_caches.tensors]
        self._cpu = [torch.empty((num_chunks, entry.tensor.shape[1]), dtype=torch.int8) for entry in kv_caches.tensors]
        self._delay = completion_delay
        self._pending: deque[tuple[int, TransferResult]] = deque()
        self._calls = 0

    def _copy(self, job_id: int, src: list[torch.Tensor], src_ids: np.ndarray, dst: list[torch.Tensor], dst_ids: np.ndarray) -> bool:
        if len(src_ids) != len(dst_ids):
            raise ValueError(f"job {job_id}: {len(src_ids)} source blocks for {len(dst_ids)} destination blocks")
        start = time.perf_counter()
        src_index = torch.from_numpy(src_ids.astype(np.int64))
        dst_index = torch.from_numpy(dst_ids.astype(np.int64))
        size = 0
        for source, destination in zip(src, dst):
            destination[dst_index] = source[src_index]
            size += int(src_index.numel()) * source.shape[1]
        result = TransferResult(job_id, True, transfer_size=size, transfer_time=time.perf_counter() - start)
        self._pending.append((self._calls + self._delay, result))
        return True

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        """Copy GPU blocks into CPU chunks now; report completion later."""
        return self._copy(job_id, self._gpu, src_spec.block_ids, self._cpu, dst_spec.block_ids)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec, expedited: bool = False) -> bool:
        """Copy CPU chunks into GPU blocks now; report completion later (``wait`` makes it immediate)."""
        return self._copy(job_id, self._cpu, src_spec.block_ids, self._gpu, dst_spec.block_ids)

    def get_finished(self) -> list[TransferResult]:
        """Results whose delay has elapsed."""
        done = []
        while self._pending and self._pending[0][0] <= self._calls:
            done.append(self._pending.popleft()[1])
        self._calls += 1
        return done

    def wait(self, job_ids: set[int]) -> None:
        """Make the given jobs due now (their bytes were copied at submit time)."""
        self._pending = deque(
            (self._calls if result.job_id in job_ids else due, result) for due, result in self._pending
        )


class HarnessCPUOffloadingSpec(CPUOffloadingSpec):
    """vLLM's ``CPUOffloadingSpec`` (scheduler side untouched) with :class:`HarnessCPUOffloadWorker`.

    Selected through the connector's extra config: ``{"spec_name": "HarnessCPUOffloadingSpec",
    "spec_module_path": "vllm_harness", "cpu_bytes_to_use": ..., "harness_completion_delay": 0}``.
    """

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        """The CPU data mover instead of the CUDA one."""
        if self._worker is None:
            delay = int(self.extra_config.get("harness_completion_delay", 0))
            self._worker = HarnessCPUOffloadWorker(kv_caches, self.num_chunks, self.blocks_per_chunk, delay)
        return self._worker


def offloading_connector_config(cpu_bytes: int, completion_delay: int = 0, **extra: Any) -> dict[str, Any]:
    """Extra config that runs vLLM's ``OffloadingConnector`` on CPU through this harness."""
    if cpu_bytes <= 0:
        raise ValueError(f"cpu_bytes must be positive, got {cpu_bytes}")
    return {
        "cpu_bytes_to_use": cpu_bytes,
        "spec_name": HarnessCPUOffloadingSpec.__name__,
        "spec_module_path": __name__,
        "harness_completion_delay": completion_delay,
        **extra,
    }


# --------------------------------------------------------------------------------------------------
# Scheduler + worker + engine loop
# --------------------------------------------------------------------------------------------------

#: Scheduler-side connector methods vLLM 0.33's Scheduler calls (timed by :class:`ConnectorTimer`).
SCHEDULER_SIDE_METHODS = (
    "on_new_request",
    "get_num_new_matched_tokens",
    "get_loaded_kv_cache_group_ids",
    "get_external_cache_hit_sources",
    "update_state_after_alloc",
    "build_connector_meta",
    "update_connector_output",
    "request_finished",
    "request_finished_all_groups",
    "register_finished_partial_tail",
    "take_events",
    "get_kv_connector_stats",
    "has_pending_block_frees",
    "has_pending_push_work",
)


class ConnectorTimer:
    """Wraps a scheduler-side connector's methods to add up the time spent inside them.

    Only the outermost call counts (a method calling another is not counted twice).
    """

    def __init__(self, connector: KVConnectorBase_V1, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.clock = clock
        self.total_ns = 0
        self.calls: dict[str, int] = {}
        self.per_method_ns: dict[str, int] = {}
        self._depth = 0
        for name in SCHEDULER_SIDE_METHODS:
            method = getattr(connector, name, None)
            if method is not None:
                setattr(connector, name, self._wrap(name, method))

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return method(*args, **kwargs)
            self._depth += 1
            start = self.clock()
            try:
                return method(*args, **kwargs)
            finally:
                elapsed = self.clock() - start
                self._depth -= 1
                self.total_ns += elapsed
                self.per_method_ns[name] = self.per_method_ns.get(name, 0) + elapsed
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed


@dataclass
class CacheHitCounter:
    """Prompt tokens queried / hit in vLLM's GPU prefix cache and in the connector, summed over steps.

    Read from the ``SchedulerStats`` that ``update_from_output`` attaches (``log_stats=True``).
    """

    gpu_queries: int = 0
    gpu_hits: int = 0
    external_queries: int = 0
    external_hits: int = 0

    def add(self, stats: Any) -> None:
        """Accumulate one ``SchedulerStats`` (``None`` is ignored)."""
        if stats is None:
            return
        self.gpu_queries += stats.prefix_cache_stats.queries
        self.gpu_hits += stats.prefix_cache_stats.hits
        if stats.connector_prefix_cache_stats is not None:
            self.external_queries += stats.connector_prefix_cache_stats.queries
            self.external_hits += stats.connector_prefix_cache_stats.hits


@dataclass
class StepResult:
    """One engine step: what was scheduled, and (when processed) what finished."""

    scheduler_output: SchedulerOutput | None
    processed: bool
    scheduled_tokens: int
    schedule_ns: int
    update_ns: int
    new_tokens: dict[str, list[int]]
    finished: dict[str, str]


class VllmHarness:
    """The real vLLM 0.33 scheduler and an emulated worker, stepped like ``EngineCore``.

    Sync scheduling mirrors ``EngineCore.step`` (schedule, execute, update_from_output); async
    scheduling mirrors ``EngineCore.step_with_batch_queue`` with vLLM's queue depth
    (``max_concurrent_batches``), so step N+1 is scheduled and executed before step N's output is
    processed.
    """

    def __init__(self, config: HarnessConfig) -> None:
        self.config = config
        self._tmp = tempfile.TemporaryDirectory(prefix="vllm-harness-")
        model_dir = write_tiny_model_config(Path(self._tmp.name) / "model", config.model, config.resolved_max_model_len)
        try:
            self.vllm_config = build_vllm_config(config, model_dir)
            with _env_var("VLLM_USE_V2_MODEL_RUNNER", "1" if config.runner == "v2" else "0"):
                self._build(config)
        except BaseException:
            self._tmp.cleanup()
            raise

    def _build(self, config: HarnessConfig) -> None:
        vllm_config = self.vllm_config
        with set_current_vllm_config(vllm_config):
            self.plan = plan_kv_cache(vllm_config, config.model, config.num_gpu_blocks)
            scheduler_cls = vllm_config.scheduler_config.get_scheduler_cls()
            self.scheduler = scheduler_cls(
                vllm_config=vllm_config,
                kv_cache_config=self.plan.scheduler_config,
                structured_output_manager=StructuredOutputManager(vllm_config),
                block_size=self.plan.scheduler_block_size,
                hash_block_size=self.plan.hash_block_size,
                log_stats=True,
            )
        self.use_v2_model_runner = vllm_config.use_v2_model_runner
        self.batch_queue_size = vllm_config.max_concurrent_batches if config.use_async_scheduling else 1
        hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self._block_hasher = get_request_block_hasher(self.plan.hash_block_size, hash_fn)
        self._seeds: dict[str, int] = {}
        self.worker = WorkerHarness(config, vllm_config, copy.deepcopy(self.plan.worker_config), self._seeds)
        self._new_blocks: list[int] = []
        pool = self.scheduler.kv_cache_manager.block_pool
        allocate = pool.get_new_blocks

        def recording_get_new_blocks(num_blocks: int):
            blocks = allocate(num_blocks)
            self._new_blocks.extend(block.block_id for block in blocks)
            return blocks

        pool.get_new_blocks = recording_get_new_blocks
        if config.handshake:
            self._set_handshake_metadata()
        self.timer = ConnectorTimer(self.scheduler.connector) if self.scheduler.connector is not None else None
        self._queue: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
        self.outputs: dict[str, list[int]] = {}
        self.finish_reasons: dict[str, str] = {}
        self.cache_stats = CacheHitCounter()
        self.steps = 0

    def _set_handshake_metadata(self) -> None:
        """``EngineCore._set_kv_connector_handshake_metadata``: the workers' metadata, merged, to the scheduler's
        connector (called whenever the executor answered, even when every worker said None)."""
        connector = self.scheduler.connector
        gathered = self.worker.handshake_metadata()
        if connector is None or not gathered:
            return
        content: dict[tuple[int, int], Any] = {}
        for worker_dict in gathered:
            if worker_dict is not None:
                content.update(worker_dict)
        connector.set_xfer_handshake_metadata_pp_aware(content)

    # -- requests -----------------------------------------------------------------------------------

    def make_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        cache_salt: str | None = None,
        lora_name: str | None = None,
    ) -> Request:
        """A ``vllm.v1.request.Request`` as the engine core builds it (block hasher attached)."""
        if not prompt_token_ids:
            raise ValueError(f"request {request_id}: prompt_token_ids must not be empty")
        vocab = self.config.model.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id}: token ids must be ints in [0, {vocab}), got e.g. {bad[0]!r}")
        if max_tokens <= 0:
            raise ValueError(f"request {request_id}: max_tokens must be positive, got {max_tokens}")
        lora = None
        if lora_name is not None:
            lora_id = 1 + int.from_bytes(hashlib.blake2b(lora_name.encode(), digest_size=3).digest(), "little")
            lora = LoRARequest(lora_name=lora_name, lora_int_id=lora_id, lora_path=f"/nonexistent/{lora_name}")
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        return Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            pooling_params=None,
            lora_request=lora,
            cache_salt=cache_salt,
            block_hasher=self._block_hasher,
        )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        cache_salt: str | None = None,
        lora_name: str | None = None,
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> Request:
        """Create a request (with P/D ``kv_transfer_params``, as vLLM takes them from the sampling params'
        ``extra_args``) and hand it to the scheduler."""
        if request_id in self._seeds:
            raise ValueError(f"request id {request_id!r} was already used in this harness")
        request = self.make_request(request_id, prompt_token_ids, max_tokens, cache_salt, lora_name)
        request.kv_transfer_params = kv_transfer_params
        self._seeds[request_id] = request_seed(cache_salt, lora_name)
        self.outputs[request_id] = []
        self.scheduler.add_request(request)
        return request

    def abort(self, request_id: str) -> None:
        """Abort a request as the engine does for a client disconnect."""
        self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)

    # -- stepping -----------------------------------------------------------------------------------

    def _schedule_and_execute(self) -> tuple[SchedulerOutput, ModelRunnerOutput, int]:
        start = time.perf_counter_ns()
        so = self.scheduler.schedule()
        schedule_ns = time.perf_counter_ns() - start
        new_blocks, self._new_blocks = self._new_blocks, []
        return so, self.worker.execute(so, new_blocks), schedule_ns

    def _update(self, so: SchedulerOutput, mro: ModelRunnerOutput) -> tuple[int, dict[str, list[int]], dict[str, str]]:
        start = time.perf_counter_ns()
        engine_outputs = self.scheduler.update_from_output(so, mro)
        update_ns = time.perf_counter_ns() - start
        new_tokens: dict[str, list[int]] = {}
        finished: dict[str, str] = {}
        for outputs in engine_outputs.values():
            self.cache_stats.add(outputs.scheduler_stats)
            for output in outputs.outputs:
                if output.new_token_ids:
                    new_tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
                    self.outputs.setdefault(output.request_id, []).extend(output.new_token_ids)
                if output.finish_reason is not None:
                    finished[output.request_id] = str(output.finish_reason)
                    self.finish_reasons[output.request_id] = str(output.finish_reason)
        return update_ns, new_tokens, finished

    def step(self) -> StepResult:
        """One ``EngineCore`` step (sync) or one ``step_with_batch_queue`` call (async)."""
        self.steps += 1
        if self.batch_queue_size == 1:
            so, mro, schedule_ns = self._schedule_and_execute()
            update_ns, tokens, finished = self._update(so, mro)
            return StepResult(so, True, so.total_num_scheduled_tokens, schedule_ns, update_ns, tokens, finished)
        so, schedule_ns = None, 0
        if self.scheduler.has_requests():
            so, mro, schedule_ns = self._schedule_and_execute()
            self._queue.appendleft((so, mro))
            executed = so.total_num_scheduled_tokens > 0
            if len(self._queue) < self.batch_queue_size and (executed or self.scheduler.has_requests()):
                return StepResult(so, False, so.total_num_scheduled_tokens, schedule_ns, 0, {}, {})
        elif not self._queue:
            return StepResult(None, False, 0, 0, 0, {}, {})
        done_so, done_mro = self._queue.pop()
        update_ns, tokens, finished = self._update(done_so, done_mro)
        scheduled = so.total_num_scheduled_tokens if so is not None else 0
        return StepResult(so, True, scheduled, schedule_ns, update_ns, tokens, finished)

    def busy(self) -> bool:
        """Whether the engine loop would keep stepping (requests, connector work or queued batches)."""
        return self.scheduler.has_requests() or bool(self._queue)

    def run_until_idle(self, max_steps: int = 10_000) -> int:
        """Step until nothing is left to do; raise if that takes more than ``max_steps``."""
        steps = 0
        while self.busy():
            if steps >= max_steps:
                raise RuntimeError(f"engine still busy after {max_steps} steps: {self.describe()}")
            self.step()
            steps += 1
        return steps

    def run_workload(self, workload: MultiTurnChatWorkload, max_steps: int = 100_000) -> int:
        """Drive a multi-turn workload to completion; returns the number of steps taken."""
        for turn in workload.start():
            self.add_turn(turn)
        steps = 0
        while self.busy() or not workload.done:
            if steps >= max_steps:
                raise RuntimeError(f"workload unfinished after {max_steps} steps: {self.describe()}")
            result = self.step()
            steps += 1
            for request_id in result.finished:
                for turn in workload.complete(request_id, self.outputs[request_id]):
                    self.add_turn(turn)
            if not self.busy() and not workload.done:
                raise RuntimeError(f"workload stalled with {workload.pending} turns outstanding")
        return steps

    def add_turn(self, turn: ChatTurn) -> Request:
        """Submit one workload turn."""
        return self.add_request(turn.request_id, turn.prompt_token_ids, turn.max_tokens, turn.cache_salt, turn.lora_name)

    def describe(self) -> str:
        """One line about the scheduler's queues, for error messages."""
        s = self.scheduler
        return (
            f"requests={len(s.requests)} running={len(s.running)} waiting={len(s.waiting)} "
            f"queued_batches={len(self._queue)} free_blocks={s.kv_cache_manager.block_pool.get_num_free_blocks()}"
        )

    def free_block_count(self) -> int:
        """Free blocks in the GPU block pool (all but the null block once everything is released)."""
        return self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()

    def close(self) -> None:
        """Shut both connector sides down and remove the temporary model folder."""
        try:
            self.worker.shutdown()
            if self.scheduler.connector is not None:
                self.scheduler.connector.shutdown()
        finally:
            self._tmp.cleanup()

    def __enter__(self) -> VllmHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Workload: multi-turn chats
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTurn:
    """One request of a chat: the whole history so far plus the new user message."""

    request_id: str
    user: int
    round: int
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    cache_salt: str | None = None
    lora_name: str | None = None


class MultiTurnChatWorkload:
    """Users chatting in rounds over a shared system prompt; each round's prompt is the full history.

    Round ``r`` of a user starts when round ``r - 1`` finished; its prompt is the previous prompt, the
    answer the engine produced, and a new user message.  At most ``max_active_users`` users chat at
    once (others start when one finishes all rounds), which with few GPU blocks forces eviction.
    ``salts`` / ``lora_names`` (cycled over users) put cache salts / LoRA adapters on the requests.
    """

    def __init__(
        self,
        num_users: int = 12,
        num_rounds: int = 6,
        system_prompt_tokens: int = 64,
        user_tokens: tuple[int, int] = (16, 48),
        answer_tokens: tuple[int, int] = (8, 24),
        vocab_size: int = 4096,
        seed: int = 0,
        max_active_users: int | None = None,
        salts: Sequence[str | None] = (None,),
        lora_names: Sequence[str | None] = (None,),
    ) -> None:
        if num_users <= 0 or num_rounds <= 0:
            raise ValueError(f"num_users and num_rounds must be positive, got {num_users}, {num_rounds}")
        for name, (low, high) in (("user_tokens", user_tokens), ("answer_tokens", answer_tokens)):
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(low, high)}")
        if system_prompt_tokens < 0 or vocab_size <= FIRST_REGULAR_TOKEN + 1:
            raise ValueError(f"bad system_prompt_tokens={system_prompt_tokens} or vocab_size={vocab_size}")
        if not salts or not lora_names:
            raise ValueError("salts and lora_names must each hold at least one entry (None for none)")
        self.num_users, self.num_rounds = num_users, num_rounds
        self._seed = seed
        self._vocab = vocab_size
        self._user_tokens, self._answer_tokens = user_tokens, answer_tokens
        self.system_prompt = self._tokens(random.Random(f"{seed}:system"), system_prompt_tokens)
        self._history: dict[int, list[int]] = {}
        self._salts, self._loras = list(salts), list(lora_names)
        self._active_limit = num_users if max_active_users is None else max_active_users
        if self._active_limit <= 0:
            raise ValueError(f"max_active_users must be positive, got {max_active_users}")
        self._next_user = 0
        self._open: dict[str, ChatTurn] = {}
        self.completed: list[ChatTurn] = []

    def _tokens(self, rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(FIRST_REGULAR_TOKEN, self._vocab) for _ in range(n)]

    def _turn(self, user: int, round_index: int) -> ChatTurn:
        # One generator per (user, round): the workload does not depend on the engine's finish order.
        rng = random.Random(f"{self._seed}:{user}:{round_index}")
        history = self._history.setdefault(user, list(self.system_prompt))
        history.extend(self._tokens(rng, rng.randint(*self._user_tokens)))
        turn = ChatTurn(
            request_id=f"u{user}-r{round_index}",
            user=user,
            round=round_index,
            prompt_token_ids=tuple(history),
            max_tokens=rng.randint(*self._answer_tokens),
            cache_salt=self._salts[user % len(self._salts)],
            lora_name=self._loras[user % len(self._loras)],
        )
        self._open[turn.request_id] = turn
        return turn

    def start(self) -> list[ChatTurn]:
        """First turns of the first ``max_active_users`` users."""
        turns = []
        while self._next_user < min(self._active_limit, self.num_users):
            turns.append(self._turn(self._next_user, 0))
            self._next_user += 1
        return turns

    def complete(self, request_id: str, output_token_ids: Sequence[int]) -> list[ChatTurn]:
        """Record a finished turn's answer; return the turns that start now."""
        turn = self._open.get(request_id)
        if turn is None:
            raise ValueError(f"{request_id!r} is not an open turn of this workload")
        if len(output_token_ids) != turn.max_tokens:
            raise ValueError(f"{request_id}: expected {turn.max_tokens} answer tokens, got {len(output_token_ids)}")
        del self._open[request_id]
        self.completed.append(turn)
        self._history[turn.user].extend(output_token_ids)
        if turn.round + 1 < self.num_rounds:
            return [self._turn(turn.user, turn.round + 1)]
        if self._next_user < self.num_users:
            user = self._next_user
            self._next_user += 1
            return [self._turn(user, 0)]
        return []

    @property
    def pending(self) -> int:
        """Turns submitted but not completed."""
        return len(self._open)

    @property
    def done(self) -> bool:
        """Whether every round of every user has completed."""
        return len(self.completed) == self.num_users * self.num_rounds
