"""Model geometry of a paged KV cache: the sizes every layout of the same model shares.

Two caches can exchange blocks only when their geometries are equal; the number of blocks and the memory layout
may differ. Coordinates of one element are (block, layer, kv, token, head, channel); `num_kv` is 2 for K/V caches
and 1 for MLA latent caches, which have no K/V split and one "head".
"""
from __future__ import annotations

from dataclasses import dataclass

#: The logical coordinates of one KV element, outermost first.
LOGICAL_DIMS: tuple[str, ...] = ("block", "layer", "kv", "token", "head", "channel")


@dataclass(frozen=True)
class KVGeometry:
    """Sizes of a model's paged KV cache, independent of memory layout.

    `head_dim` is the channel count per head (the latent width for MLA; raw bytes per token for byte-typed caches
    such as vLLM's 656-byte fp8_ds_mla). `itemsize` is the element size in bytes.
    """

    num_layers: int
    num_kv: int
    block_size: int
    num_heads: int
    head_dim: int
    itemsize: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_heads", "head_dim", "itemsize"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVGeometry.{name} must be a positive int, got {value!r}")
        if self.num_kv not in (1, 2):
            raise ValueError(f"KVGeometry.num_kv must be 1 (MLA latent) or 2 (K and V), got {self.num_kv!r}")

    @property
    def num_pieces(self) -> int:
        """Number of (layer, kv) pieces one block is made of."""
        return self.num_layers * self.num_kv

    @property
    def piece_elems(self) -> int:
        """Elements in one (block, layer, kv) piece: tokens x heads x channels."""
        return self.block_size * self.num_heads * self.head_dim

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers and K/V."""
        return self.num_pieces * self.piece_elems * self.itemsize

    def describe_mismatch(self, other: "KVGeometry") -> str:
        """Name every field that differs from `other` as 'field: self vs other' (empty when equal)."""
        diffs = [
            f"{f}: {getattr(self, f)} vs {getattr(other, f)}"
            for f in ("num_layers", "num_kv", "block_size", "num_heads", "head_dim", "itemsize")
            if getattr(self, f) != getattr(other, f)
        ]
        return ", ".join(diffs)
