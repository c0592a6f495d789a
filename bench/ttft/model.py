"""A random-weight decoder whose prefill attends over a paged KV cache in vLLM's FlashAttention layout.

Per layer the cache is one tensor ``[2, num_blocks, BLOCK_SIZE, kv_heads, head_dim]`` (K blocks, then V blocks).
`DecoderModel.prefill` runs new tokens after ``num_cached`` tokens whose K/V already sit in the request's blocks:
it writes the new tokens' K/V into their slots, gathers the request's blocks and attends causally (the mask
offset by the cached prefix). RMSNorm, RoPE, SwiGLU MLP, grouped-query attention (SDPA reads each K/V head for
its group of query heads, as FlashAttention does, without copying it per head); Qwen3 shapes add the per-head q/k
RMSNorm. Weights are random but seeded, never zero. Only torch is imported, so the tests load this file on its own.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

__all__ = [
    "BLOCK_SIZE",
    "SHAPES",
    "DecoderModel",
    "ModelShape",
    "allocate_kv_caches",
    "dense_causal_attention",
    "paged_attention",
]

BLOCK_SIZE = 16


@dataclass(frozen=True)
class ModelShape:
    """A decoder's dimensions (``vocab`` kept small: only the prefill and the last token's logits matter)."""

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int = 32000
    qk_norm: bool = False
    rope_theta: float = 500000.0
    eps: float = 1e-5

    @property
    def block_bytes_per_element(self) -> int:
        """Elements of one KV block over all layers (K and V)."""
        return self.num_layers * 2 * BLOCK_SIZE * self.num_kv_heads * self.head_dim

    def with_layers(self, num_layers: int) -> ModelShape:
        """The same shape with another number of layers."""
        return ModelShape(**{**self.__dict__, "num_layers": num_layers, "name": f"{self.name}-{num_layers}l"})


SHAPES: dict[str, ModelShape] = {
    "llama-3.1-8b": ModelShape("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336),
    "qwen3-0.6b": ModelShape("qwen3-0.6b", 28, 1024, 16, 8, 128, 3072, qk_norm=True, rope_theta=1e6, eps=1e-6),
    "tiny": ModelShape("tiny", 2, 256, 4, 2, 64, 512, vocab=1000),
}


def allocate_kv_caches(shape: ModelShape, num_blocks: int, dtype: torch.dtype,
                       device: torch.device | str) -> list[torch.Tensor]:
    """One zeroed ``[2, num_blocks, BLOCK_SIZE, kv_heads, head_dim]`` tensor per layer (vLLM FlashAttention, NHD)."""
    return [torch.zeros(2, num_blocks, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim, dtype=dtype, device=device)
            for _ in range(shape.num_layers)]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, D]`` (halves rotated, as Llama/Qwen in Hugging Face)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _expand_kv(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[kv_heads, S, D]`` -> ``[num_heads, S, D]``: query head h reads K/V head h // (num_heads / kv_heads)."""
    group = num_heads // t.shape[0]
    return t if group == 1 else t.repeat_interleave(group, dim=0)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    block_table: torch.Tensor, num_cached: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of new tokens over a paged cache; writes the new tokens' K/V into their slots first.

    ``q`` ``[T, heads, D]``, ``k``/``v`` ``[T, kv_heads, D]`` at positions ``num_cached ..``; ``kv_cache`` one
    layer's ``[2, B, BLOCK_SIZE, kv_heads, D]``; ``block_table`` the request's block ids in token order (at least
    ``ceil((num_cached + T) / BLOCK_SIZE)``). ``mask`` (a `causal_mask` of these sizes) may be passed to
    share it between layers. Returns ``[T, heads, D]``.
    """
    num_new, num_heads, _ = q.shape
    total = num_cached + num_new
    pos = torch.arange(num_cached, total, device=q.device)
    blocks = block_table[pos // BLOCK_SIZE]
    offsets = pos % BLOCK_SIZE
    kv_cache[0, blocks, offsets] = k
    kv_cache[1, blocks, offsets] = v
    table = block_table[:-(-total // BLOCK_SIZE)]
    keys = kv_cache[0, table].flatten(0, 1)[:total].transpose(0, 1)  # [kv_heads, total, D]
    values = kv_cache[1, table].flatten(0, 1)[:total].transpose(0, 1)
    query = q.transpose(0, 1)
    grouped = num_heads != keys.shape[0]
    if num_cached == 0:
        out = F.scaled_dot_product_attention(query[None], keys[None], values[None], is_causal=True,
                                             enable_gqa=grouped)
    else:
        if mask is None:
            mask = causal_mask(num_new, num_cached, q.device)
        out = F.scaled_dot_product_attention(query[None], keys[None], values[None], attn_mask=mask,
                                             enable_gqa=grouped)
    return out[0].transpose(0, 1)


def causal_mask(num_new: int, num_cached: int, device: torch.device) -> torch.Tensor | CausalBias:
    """New token i attends keys ``0 .. num_cached + i``: on the GPU PyTorch's lower-right causal bias (SDPA then
    runs a fused kernel instead of materializing the scores), elsewhere a ``[num_new, num_cached + num_new]`` bool
    mask."""
    if torch.device(device).type == "cuda":
        return causal_lower_right(num_new, num_cached + num_new)
    keys = torch.arange(num_cached + num_new, device=device)
    return keys[None, :] <= (torch.arange(num_new, device=device) + num_cached)[:, None]


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: causal softmax attention written out, ``q`` ``[S, heads, D]``, ``k``/``v`` ``[S, kv_heads, D]``."""
    num_heads = q.shape[1]
    keys = _expand_kv(k.transpose(0, 1), num_heads)
    values = _expand_kv(v.transpose(0, 1), num_heads)
    scores = q.transpose(0, 1) @ keys.transpose(1, 2) / math.sqrt(q.shape[-1])
    s = q.shape[0]
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return (scores.softmax(-1) @ values).transpose(0, 1)


class DecoderModel:
    """Random-weight decoder of ``shape`` (see the module docstring)."""

    def __init__(self, shape: ModelShape, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> None:
        self.shape = shape
        self.device = torch.device(device)
        self.dtype = dtype
        s = shape
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def weight(rows: int, cols: int) -> torch.Tensor:
            return torch.randn(rows, cols, generator=gen, device=self.device, dtype=dtype).mul_(cols ** -0.5)

        def norm(n: int) -> torch.Tensor:
            return torch.randn(n, generator=gen, device=self.device, dtype=dtype).mul_(0.1).add_(1.0)

        q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.embed = torch.randn(s.vocab, s.hidden, generator=gen, device=self.device, dtype=dtype)
        self.layers = []
        for _ in range(s.num_layers):
            layer = {
                "ln1": norm(s.hidden), "qkv": weight(q_out + 2 * kv_out, s.hidden), "o": weight(s.hidden, q_out),
                "ln2": norm(s.hidden), "gate_up": weight(2 * s.intermediate, s.hidden),
                "down": weight(s.hidden, s.intermediate),
            }
            if s.qk_norm:
                layer["q_norm"], layer["k_norm"] = norm(s.head_dim), norm(s.head_dim)
            self.layers.append(layer)
        self.final_norm = norm(s.hidden)
        self.lm_head = weight(s.vocab, s.hidden)
        self.inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=self.device,
                                                              dtype=torch.float32) / s.head_dim))

    def num_parameters(self) -> int:
        """Weights held (embedding and head included)."""
        tensors = [self.embed, self.final_norm, self.lm_head] + [t for layer in self.layers for t in layer.values()]
        return sum(t.numel() for t in tensors)

    def rope_tables(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[count, 1, head_dim]`` for positions ``start ..``."""
        pos = torch.arange(start, start + count, device=self.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    def prefill(self, tokens: torch.Tensor, kv_caches: list[torch.Tensor], block_table: torch.Tensor,
                num_cached: int, before_attention: Callable[[int], None] | None = None,
                after_attention: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run ``tokens`` (positions ``num_cached ..``) writing their K/V into ``block_table``'s blocks; the first
        ``num_cached`` positions' K/V must be there by each layer's attention (``before_attention(layer)`` is called
        just before it, as vLLM calls a connector's ``wait_for_layer_load``; ``after_attention(layer)`` once the
        layer's K/V is written, as vLLM calls ``save_kv_layer``). Returns the last token's logits (fp32)."""
        num_new = tokens.shape[0]
        cos, sin = self.rope_tables(num_cached, num_new)
        mask = causal_mask(num_new, num_cached, self.device) if num_cached else None
        x = self.embed[tokens]
        for index, cache in enumerate(kv_caches):
            q, k, v = self.layer_in(index, x, cos, sin)
            if before_attention is not None:
                before_attention(index)
            attn = paged_attention(q, k, v, cache, block_table, num_cached, mask)
            if after_attention is not None:
                after_attention(index)
            x = self.layer_out(index, x, attn)
        return self.logits(x[-1:])

    def layer_in(self, index: int, x: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``index`` up to its attention: ``q`` ``[T, heads, D]``, ``k`` and ``v`` ``[T, kv_heads, D]`` of the
        hidden states ``x`` ``[T, hidden]`` (normed, projected, q/k-normed where the shape says, rotated)."""
        s, layer = self.shape, self.layers[index]
        num_new = x.shape[0]
        q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        h = _rms_norm(x, layer["ln1"], s.eps)
        q, k, v = (h @ layer["qkv"].T).split((q_out, kv_out, kv_out), dim=-1)
        q = q.reshape(num_new, s.num_heads, s.head_dim)
        k = k.reshape(num_new, s.num_kv_heads, s.head_dim)
        v = v.reshape(num_new, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = _rms_norm(q, layer["q_norm"], s.eps), _rms_norm(k, layer["k_norm"], s.eps)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def layer_out(self, index: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Layer ``index`` after its attention: the hidden states after the output projection and the MLP, each
        added to the residual ``x``; ``attn`` ``[T, heads, D]``."""
        s, layer = self.shape, self.layers[index]
        x = x + attn.reshape(x.shape[0], s.num_heads * s.head_dim) @ layer["o"].T
        h = _rms_norm(x, layer["ln2"], s.eps)
        gate, up = (h @ layer["gate_up"].T).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ layer["down"].T

    def logits(self, x_last: torch.Tensor) -> torch.Tensor:
        """The logits (fp32) of one token's final hidden states ``x_last`` ``[1, hidden]``."""
        return (_rms_norm(x_last, self.final_norm, self.shape.eps) @ self.lm_head.T)[0].float()
