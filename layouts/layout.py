"""A paged KV cache described by shape, strides and dtype: `describe` builds one from real tensors.

Every element of a cache has logical coordinates (block, layer, kv, token, head, channel). A layout maps them to
memory as

    address(block, layer, kv, token, head, channel)
        = piece_address[layer, kv] + (block * s_block + token * s_token + head * s_head + channel * s_channel) * itemsize

where `piece_address` comes from the tensor that holds (layer, kv) plus an element offset inside it. This covers one
tensor per layer, one tensor for all layers, K and V in separate tensors, K and V fused in the channel dimension, and
per-layer views strided into one shared buffer. `describe` derives it from a dimension string, so a new engine layout
needs no code change:

    describe(kv_caches, "kv block token head channel", tensor_dims="layer")        # vLLM FlashAttention
    describe([pool], "block layer kv head token channel")                          # TensorRT-LLM pool
    describe(views, "block head token (kv channel)", tensor_dims="layer")          # vLLM 0.33 per-layer views
    describe(k_bufs + v_bufs, "(block token) head channel", tensor_dims="kv layer", block_size=64)  # SGLang pools
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .geometry import LOGICAL_DIMS, KVGeometry

#: Dimensions whose stride is shared by every (layer, kv) piece.
PIECE_DIMS: tuple[str, ...] = ("block", "token", "head", "channel")


class LayoutError(ValueError):
    """A cache's tensors do not match the layout asked for, or a layout description is malformed."""


@dataclass(frozen=True)
class KVLayout:
    """Pure description of how a paged KV cache sits in memory (no tensors, no device).

    `strides` holds the element strides of block, token, head and channel. Piece (layer, kv) lives in tensor
    `piece_tensor[layer * num_kv + kv]` at element offset `piece_offset[...]` from that tensor's first element.
    """

    name: str
    geometry: KVGeometry
    num_blocks: int
    dtype: torch.dtype
    strides: tuple[int, int, int, int]
    piece_tensor: tuple[int, ...]
    piece_offset: tuple[int, ...]

    @property
    def stride(self) -> dict[str, int]:
        """Strides by dimension name (block, token, head, channel), in elements."""
        return dict(zip(PIECE_DIMS, self.strides))


class PagedKVCache:
    """A paged KV cache: the tensors that hold it and the `KVLayout` that maps logical coordinates into them."""

    def __init__(self, tensors: Sequence[torch.Tensor], layout: KVLayout):
        self.tensors: tuple[torch.Tensor, ...] = tuple(tensors)
        self.layout = layout
        self._addresses: tuple[int, ...] | None = None
        self._storages: frozenset[int] | None = None
        self._storage_ranges: np.ndarray | None = None
        self._runs: tuple[np.ndarray, int, bool] | None = None

    @property
    def geometry(self) -> KVGeometry:
        """Model dimensions of the cache (from its layout)."""
        return self.layout.geometry

    @property
    def num_blocks(self) -> int:
        """Blocks in the cache."""
        return self.layout.num_blocks

    @property
    def dtype(self) -> torch.dtype:
        """Element type of the cache."""
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        """Device of the cache's tensors."""
        return self.tensors[0].device

    @property
    def name(self) -> str:
        """The layout's name (a preset name, or the one given to describe)."""
        return self.layout.name

    def piece_index(self, layer: int, kv: int) -> int:
        """Index of piece (layer, kv) in the layout's piece tables."""
        return layer * self.geometry.num_kv + kv

    def piece_view(self, layer: int, kv: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A `[num_blocks, block_size, num_heads, head_dim]` strided view of piece (layer, kv).

        `dtype`, when given, must have the cache's element size: it reinterprets the same bytes (byte-exact copies
        use integer views, which every device supports).
        """
        p = self.piece_index(layer, kv)
        base = self.tensors[self.layout.piece_tensor[p]]
        if dtype is not None:
            base = base.view(dtype)
        g = self.geometry
        return torch.as_strided(
            base,
            (self.num_blocks, g.block_size, g.num_heads, g.head_dim),
            self.layout.strides,
            base.storage_offset() + self.layout.piece_offset[p],
        )

    def piece_addresses(self) -> list[int]:
        """Byte address of element (block 0, token 0, head 0, channel 0) of every piece, in piece order.

        Computed once: a cache's tensors never move (the transfer hot path asks for them on every call)."""
        return list(self._piece_address_table())

    def first_piece_address(self) -> int:
        """`piece_addresses()[0]` without copying the table (per-cache memos key on it on every transfer)."""
        return self._piece_address_table()[0]

    def _piece_address_table(self) -> tuple[int, ...]:
        if self._addresses is None:
            itemsize = self.geometry.itemsize
            ptrs = [t.data_ptr() for t in self.tensors]
            self._addresses = tuple(ptrs[t] + off * itemsize
                                    for t, off in zip(self.layout.piece_tensor, self.layout.piece_offset))
        return self._addresses

    def storage_addresses(self) -> frozenset[int]:
        """Addresses of the storages behind the cache's tensors (to detect two caches sharing memory)."""
        if self._storages is None:
            self._storages = frozenset(t.untyped_storage().data_ptr() for t in self.tensors)
        return self._storages

    def storage_ranges(self) -> np.ndarray:
        """Byte ranges `[start, end)` of the storages behind the cache's tensors, as an int64 array `[n, 2]`."""
        if self._storage_ranges is None:
            rows = {(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in (t.untyped_storage() for t in self.tensors)}
            self._storage_ranges = np.array(sorted(rows), dtype=np.int64).reshape(-1, 2)
        return self._storage_ranges

    def block_byte_ranges(self, ids: np.ndarray, max_ranges: int = 1 << 23
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The bytes blocks `ids` occupy, as ranges: `(starts, ends, owner)`, `owner[i]` the position in `ids` of the
        block range i belongs to.

        Exact (each piece split into its contiguous runs) unless that would exceed `max_ranges` ranges; then each
        piece of a block is one range from its first to its last byte, a superset of its bytes."""
        if self._runs is None:
            self._runs = _block_runs(self)
        starts0, run_bytes, exact = self._runs
        if not exact or ids.size * starts0.size > max_ranges:
            starts0, run_bytes = _piece_hulls(self)
        block_bytes = self.layout.strides[0] * self.geometry.itemsize
        starts = (ids.astype(np.int64) * block_bytes)[:, None] + starts0[None, :]
        owner = np.repeat(np.arange(ids.size), starts0.size)
        return starts.reshape(-1), starts.reshape(-1) + run_bytes, owner

    def __repr__(self) -> str:
        g = self.geometry
        return (
            f"PagedKVCache({self.name!r}, blocks={self.num_blocks}, layers={g.num_layers}, kv={g.num_kv}, "
            f"block_size={g.block_size}, heads={g.num_heads}, head_dim={g.head_dim}, dtype={self.dtype}, "
            f"device={self.device})"
        )


def _piece_dims(cache: PagedKVCache) -> list[tuple[int, int]]:
    """(size, stride) in elements of the token, head and channel dimensions of one block's piece."""
    g = cache.geometry
    return list(zip((g.block_size, g.num_heads, g.head_dim), cache.layout.strides[1:]))


def _block_runs(cache: PagedKVCache) -> tuple[np.ndarray, int, bool]:
    """Block 0's contiguous byte runs: absolute start addresses (every piece), the run length in bytes, and whether
    the runs are exact (False when a piece has more than 4096 runs: the caller then takes piece hulls)."""
    itemsize = cache.geometry.itemsize
    dims = sorted((d for d in _piece_dims(cache) if d[0] > 1), key=lambda d: d[1])
    run = 1
    while dims and dims[0][1] == run:  # dimensions dense inside the run merge into it
        run *= dims.pop(0)[0]
    if math.prod(size for size, _ in dims) > 4096:
        return np.zeros(0, dtype=np.int64), 0, False
    offsets = np.zeros(1, dtype=np.int64)
    for size, stride in dims:
        offsets = np.add.outer(offsets, np.arange(size, dtype=np.int64) * stride).reshape(-1)
    bases = np.array(cache.piece_addresses(), dtype=np.int64)
    return (bases[:, None] + offsets[None, :] * itemsize).reshape(-1), run * itemsize, True


def _piece_hulls(cache: PagedKVCache) -> tuple[np.ndarray, int]:
    """Block 0's pieces as one byte range each, first to last byte: start addresses and the common length."""
    span = sum((size - 1) * stride for size, stride in _piece_dims(cache))
    return np.array(cache.piece_addresses(), dtype=np.int64), (span + 1) * cache.geometry.itemsize


def ranges_overlap(a_starts: np.ndarray, a_ends: np.ndarray, b_starts: np.ndarray, b_ends: np.ndarray
                   ) -> tuple[int, int] | None:
    """Indices `(i, j)` of a range of set a and a range of set b that share a byte, or None when none do.

    Sorts a by start and keeps the running maximum of its ends, so each range of b is tested with one binary search
    (O((n + m) log n))."""
    if not a_starts.size or not b_starts.size:
        return None
    order = np.argsort(a_starts, kind="stable")
    starts, reach = a_starts[order], np.maximum.accumulate(a_ends[order])
    before = np.searchsorted(starts, b_ends, side="left")  # ranges of a that start before each b range ends
    hit = (before > 0) & (reach[np.maximum(before - 1, 0)] > b_starts)
    if not hit.any():
        return None
    j = int(np.argmax(hit))
    i = int(np.argmax((a_starts < b_ends[j]) & (a_ends > b_starts[j])))
    return i, j


def _parse_dims(spec: str) -> list[tuple[str, ...]]:
    """Parse 'block head token (kv channel)' into [('block',), ('head',), ('token',), ('kv', 'channel')]."""
    groups: list[tuple[str, ...]] = []
    rest = spec.replace("(", " ( ").replace(")", " ) ").split()
    i = 0
    while i < len(rest):
        if rest[i] == "(":
            try:
                j = rest.index(")", i)
            except ValueError:
                raise LayoutError(f"unbalanced '(' in dims {spec!r}") from None
            if j == i + 1 or "(" in rest[i + 1 : j]:
                raise LayoutError(f"empty or nested group in dims {spec!r}")
            groups.append(tuple(rest[i + 1 : j]))
            i = j + 1
        elif rest[i] == ")":
            raise LayoutError(f"unbalanced ')' in dims {spec!r}")
        else:
            groups.append((rest[i],))
            i += 1
    return groups


def _check_tensors(tensors: Sequence[torch.Tensor]) -> None:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)) or not tensors:
        raise LayoutError(f"expected a non-empty list of tensors, got {type(tensors).__name__}")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise LayoutError(f"tensor {i}: expected a torch.Tensor, got {type(t).__name__}")
        for what, expected, actual in (
            ("shape", tuple(first.shape), tuple(t.shape)),
            ("strides", first.stride(), t.stride()),
            ("dtype", first.dtype, t.dtype),
            ("device", first.device, t.device),
        ):
            if expected != actual:
                raise LayoutError(f"tensor {i}: {what} expected {expected} (as tensor 0), got {actual}")


def _check_injective(dims: list[tuple[int, int]], what: str) -> None:
    """Raise unless distinct coordinates of these (size, stride) dims reach distinct elements."""
    span = 0
    for size, stride in sorted((d for d in dims if d[0] > 1), key=lambda d: d[1]):
        if stride <= span:
            raise LayoutError(f"{what}: dimensions overlap in memory (sizes/strides {dims}); a cache must not alias")
        span += stride * (size - 1)


def _reaches(delta: int, dims: list[tuple[int, int]]) -> bool:
    """Whether `delta` = sum(stride * z) for some integers |z| < size: two index vectors of these (size, stride)
    dims (strides ascending, each larger than the reach of the smaller ones, as `_check_injective` ensures) that are
    `delta` elements apart. At most two choices per dimension: a few dozen steps."""
    if not dims:
        return delta == 0
    (size, stride), rest = dims[-1], dims[:-1]
    below = sum((n - 1) * s for n, s in rest)
    lo = max(-(size - 1), -((below - delta) // stride))  # ceil((delta - below) / stride)
    hi = min(size - 1, (delta + below) // stride)
    return any(_reaches(delta - z * stride, rest) for z in range(lo, hi + 1))


def _check_tensors_disjoint(tensors: Sequence[torch.Tensor], dims: list[tuple[int, int]], outer: list[str],
                            sizes: dict[str, int], name: str) -> None:
    """Raise LayoutError if two of the tensors (same shape and strides) share an element. Tensors whose byte ranges
    are apart are passed by their ranges; for the others the offset between them is tested against the strides."""
    itemsize = tensors[0].element_size()
    dims = sorted((d for d in dims if d[0] > 1), key=lambda d: d[1])
    length = (sum((n - 1) * s for n, s in dims) + 1) * itemsize
    order = sorted(range(len(tensors)), key=lambda i: tensors[i].data_ptr())
    ptrs = [tensors[i].data_ptr() for i in order]
    verdicts: dict[int, bool] = {}
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            delta = ptrs[b] - ptrs[a]
            if delta >= length:
                break
            if delta not in verdicts:
                verdicts[delta] = delta % itemsize != 0 or _reaches(delta // itemsize, dims)
            if verdicts[delta]:
                i, j = sorted((order[a], order[b]))
                raise LayoutError(f"layout {name!r}: tensors {i} ({_outer_label(i, outer, sizes)}) and {j} "
                                  f"({_outer_label(j, outer, sizes)}) share memory ({delta} bytes apart); "
                                  f"the pieces of a cache must not alias")


def _outer_label(index: int, outer: list[str], sizes: dict[str, int]) -> str:
    coords = []
    for n in reversed(outer):
        index, c = divmod(index, sizes[n])
        coords.append(f"{n} {c}")
    return ", ".join(reversed(coords))


def describe(
    tensors: Sequence[torch.Tensor],
    dims: str,
    *,
    tensor_dims: str = "",
    block_size: int | None = None,
    num_kv: int | None = None,
    name: str = "custom",
) -> PagedKVCache:
    """Describe a paged KV cache from its tensors and the logical name of each tensor dimension.

    `dims` names each tensor dimension with one of block, layer, kv, token, head, channel, or a parenthesised group
    such as `(kv channel)` for dimensions fused row-major into one. `tensor_dims` names what the index into
    `tensors` runs over ("layer", "kv layer", "layer kv", or "" for a single tensor). Sizes inside a group are taken
    from the other dimensions, from `block_size` / `num_kv`, or inferred when only one is unknown. A dimension that
    appears nowhere has size 1 (no "kv": an MLA latent cache; no "head": one head). Strides come from the tensors.
    """
    _check_tensors(tensors)
    t0 = tensors[0]
    groups = _parse_dims(dims)
    if len(groups) != t0.dim():
        raise LayoutError(f"dims {dims!r} name {len(groups)} dimensions, but the tensors have {t0.dim()} "
                          f"(shape {tuple(t0.shape)})")
    outer = tensor_dims.split()
    names = [n for g in groups for n in g] + outer
    for n in names:
        if n not in LOGICAL_DIMS:
            raise LayoutError(f"unknown dimension {n!r} in {dims!r} / {tensor_dims!r}; expected one of {LOGICAL_DIMS}")
    if len(set(names)) != len(names):
        raise LayoutError(f"a dimension is named twice in dims {dims!r} / tensor_dims {tensor_dims!r}")
    if "block" not in names or "token" not in names or "channel" not in names:
        raise LayoutError(f"dims {dims!r} must name block, token and channel")

    sizes: dict[str, int] = {}
    for g, n in zip(groups, t0.shape):
        if len(g) == 1:
            sizes[g[0]] = int(n)
    for key, value in (("token", block_size), ("kv", num_kv)):
        if value is not None:
            if key in sizes and sizes[key] != value:
                raise LayoutError(f"{key} size expected {value}, but the tensors have {sizes[key]}")
            sizes.setdefault(key, value)
    if "kv" in names and "kv" not in sizes:  # K and V fused into a group or split across tensors
        sizes["kv"] = 2
    for group, total, label in [(g, int(n), f"dimension {g}") for g, n in zip(groups, t0.shape) if len(g) > 1] + (
        [(tuple(outer), len(tensors), f"tensor list over {tuple(outer)}")] if outer else []
    ):
        unknown = [n for n in group if n not in sizes]
        known = math.prod(sizes[n] for n in group if n in sizes)
        if len(unknown) > 1:
            raise LayoutError(f"{label}: sizes of {unknown} are unknown; pass block_size / num_kv or name them "
                              f"elsewhere")
        if unknown:
            if known == 0 or total % known:
                raise LayoutError(f"{label}: size {total} is not divisible by the known part {known}")
            sizes[unknown[0]] = total // known
        elif known != total:
            raise LayoutError(f"{label}: size expected {known} from the other dimensions, got {total}")
    if not outer and len(tensors) != 1:
        raise LayoutError(f"{len(tensors)} tensors given but tensor_dims is empty; name what the tensor list indexes")

    strides: dict[str, int] = {}
    in_tensor: list[tuple[int, int]] = []
    for g, stride in zip(groups, t0.stride()):
        for n in reversed(g):
            strides[n] = stride
            in_tensor.append((sizes[n], stride))
            stride *= sizes[n]
    _check_injective(in_tensor, f"layout {name!r}")
    if len(tensors) > 1 and t0.device.type != "meta":  # (meta tensors have no addresses)
        _check_tensors_disjoint(tensors, in_tensor, outer, sizes, name)

    num_layers, kv_count = sizes.get("layer", 1), sizes.get("kv", 1)
    try:
        geometry = KVGeometry(num_layers, kv_count, sizes["token"], sizes.get("head", 1), sizes["channel"],
                              t0.element_size())
    except ValueError as e:
        raise LayoutError(str(e)) from None
    piece_tensor, piece_offset = [], []
    for layer in range(num_layers):
        for kv in range(kv_count):
            coord = {"layer": layer, "kv": kv}
            index = 0
            for n in outer:
                index = index * sizes[n] + coord[n]
            piece_tensor.append(index)
            piece_offset.append(sum(coord[n] * strides[n] for n in ("layer", "kv") if n in strides))
    layout = KVLayout(
        name=name,
        geometry=geometry,
        num_blocks=sizes["block"],
        dtype=t0.dtype,
        strides=tuple(strides.get(n, 0) for n in PIECE_DIMS),
        piece_tensor=tuple(piece_tensor),
        piece_offset=tuple(piece_offset),
    )
    cache = PagedKVCache(tensors, layout)
    for p in range(geometry.num_pieces):  # as_strided raises if a view would reach outside its tensor's storage
        try:
            cache.piece_view(*divmod(p, kv_count))
        except RuntimeError as e:
            raise LayoutError(f"layout {name!r}: piece {p} reaches outside tensor {piece_tensor[p]}: {e}") from None
    return cache
