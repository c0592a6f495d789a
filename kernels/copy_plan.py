"""Host-side plan of a block copy between two layouts, shared by every kernel backend.

A copy moves, for each of `n` block pairs and each (layer, kv) piece, a `[token, head, channel]` box from the
source to the destination. The plan reduces that box to at most three dimensions by merging those that are
contiguous in both caches (so a piece that is one dense run in both becomes one long row), and widens the element
to the largest integer unit (up to 8 bytes) that every address, stride and row length allows, so kernels move
8-byte words and the compiler can emit 16-byte vector accesses. Addresses are kept as unit offsets from one base
pointer per cache plus a per-piece offset table built once per cache pair (no per-transfer pointer arrays).
"""
from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Hashable, TypeVar

import torch

from kvbm.layouts import PagedKVCache
from kvbm.layouts.conversion import INT_VIEW


T = TypeVar("T")
#: Entries an `IdentityMemo` keeps by default before it starts afresh (entries also go when their objects die).
MEMO_LIMIT = 64


class IdentityMemo(dict):
    """Values kept per live object (or tuple of objects), found by identity.

    An entry holds only weak references to its objects: it is dropped when one of them dies, and `find` checks that
    they are the very objects asked about, so a new object that got a dead one's id never finds the old entry. A
    lookup costs a dict get and a weakref call per object (hashing a layout costs more than a small kernel launch).
    The values must not refer to the objects (or the entry would keep them alive).

    ``limit``: entries kept before the memo starts afresh (None: no limit, for memos whose entries are as many as
    the live objects they key, or whose values must live as long as those objects: tables that kernels queued
    later still read).
    """

    __slots__ = ("__weakref__", "limit")

    def __init__(self, limit: int | None = MEMO_LIMIT) -> None:
        super().__init__()
        self.limit = limit

    def find(self, key: Hashable, a: Any, b: Any = None, c: Any = None, d: Any = None) -> Any:
        """The value kept under `key` for exactly the objects `a` (`b`, `c`, `d`), else None."""
        entry = self.get(key)
        if entry is not None and entry[1]() is a and entry[2]() is b and entry[3]() is c and entry[4]() is d:
            return entry[0]
        return None

    def keep(self, key: Hashable, value: T, a: Any, b: Any = None, c: Any = None, d: Any = None) -> T:
        """Keep `value` under `key` (ids of the objects, typically) until one of the objects `a` (`b`, `c`, `d`)
        dies; returns `value`."""
        if self.limit is not None and len(self) >= self.limit:
            self.clear()
        forget = functools.partial(_forget, weakref.ref(self), key)
        self[key] = (value, *(_absent if obj is None else weakref.ref(obj, forget) for obj in (a, b, c, d)))
        return value


def _absent() -> None:
    """Stands for the reference of an object not given: calling it gives None, as a dead reference would not."""
    return None


def _forget(memo_ref: weakref.ref, key: Hashable, dead: weakref.ref) -> None:
    """Weakref callback: drop the entry under `key` if it is still the one that held `dead`."""
    memo = memo_ref()
    entry = None if memo is None else memo.get(key)
    if entry is not None and any(ref is dead for ref in entry[1:]):
        del memo[key]


class IdentitySequenceMemo(dict):
    """`IdentityMemo` for any number of objects: values kept per sequence of live objects (e.g. every cache of a
    layer-wise load's groups), found by identity, each entry dropped when one of its objects dies. A lookup costs a
    dict get and a weakref call per object."""

    __slots__ = ("__weakref__",)

    def find(self, objects: Sequence[Any]) -> Any:
        """The value kept for exactly ``objects``, in order, else None."""
        entry = self.get(tuple(map(id, objects)))
        if entry is None:
            return None
        for ref, obj in zip(entry[1:], objects):
            if ref() is not obj:
                return None
        return entry[0]

    def keep(self, objects: Sequence[Any], value: T) -> T:
        """Keep ``value`` for ``objects`` until one of them dies; returns ``value``."""
        if len(self) >= MEMO_LIMIT:
            self.clear()
        key = tuple(map(id, objects))
        forget = functools.partial(_forget, weakref.ref(self), key)  # (entries laid out as `IdentityMemo`'s)
        self[key] = (value, *(weakref.ref(obj, forget) for obj in objects))
        return value


def memo_on(owner: Any, name: str) -> IdentityMemo:
    """The `IdentityMemo` kept on `owner` (a cache) under attribute `name`, made on first use."""
    memo = owner.__dict__.get(name)
    if memo is None:
        memo = owner.__dict__[name] = IdentityMemo()
    return memo


@dataclass(frozen=True)
class CopyPlan:
    """Everything a kernel needs beyond the block ids; sizes and strides in units of `unit` bytes.

    `dims` are (size, src_stride, dst_stride) for three inner dimensions, innermost last. `src_base` / `dst_base`
    are tensors whose first element sits at the address all offsets count from.
    """

    unit: int
    dims: tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]
    src_block_stride: int
    dst_block_stride: int
    src_offsets_host: tuple[int, ...]  # unit offset of each (layer, kv) piece from the base
    dst_offsets_host: tuple[int, ...]
    src_offsets_aligned: torch.Tensor  # the same offsets in units of `align` units, on the kernel's device
    dst_offsets_aligned: torch.Tensor
    src_base: torch.Tensor
    dst_base: torch.Tensor
    align: int  # units every piece offset, block stride and outer row stride is a multiple of (for vector hints)

    @property
    def num_pieces(self) -> int:
        """(layer, kv) pieces per block."""
        return len(self.src_offsets_host)

    @property
    def rows(self) -> int:
        """Rows per piece: the two outer dimensions merged."""
        return self.dims[0][0] * self.dims[1][0]

    @property
    def row_len(self) -> int:
        """Units per row (the innermost dimension)."""
        return self.dims[2][0]

    def memo(self, name: str, compute: Callable[[CopyPlan], T]) -> T:
        """`compute(self)`, computed once and kept on the plan: for values derived from a plan on hot paths."""
        if name not in self.__dict__:
            self.__dict__[name] = compute(self)  # a frozen dataclass still has its own __dict__
        return self.__dict__[name]


def _merge_inner_dims(src: PagedKVCache, dst: PagedKVCache) -> list[tuple[int, int, int]]:
    g = src.geometry
    sizes = (g.block_size, g.num_heads, g.head_dim)
    s_str = (src.layout.stride["token"], src.layout.stride["head"], src.layout.stride["channel"])
    d_str = (dst.layout.stride["token"], dst.layout.stride["head"], dst.layout.stride["channel"])
    dims = [(n, a, b) for n, a, b in zip(sizes, s_str, d_str) if n > 1]
    dims.sort(key=lambda d: (d[2], d[1]), reverse=True)  # write order of the destination, outermost first
    merged: list[tuple[int, int, int]] = []
    for n, a, b in dims:
        if merged and merged[-1][1] == n * a and merged[-1][2] == n * b:
            merged[-1] = (merged[-1][0] * n, a, b)
        else:
            merged.append((n, a, b))
    while len(merged) < 3:
        merged.insert(0, (1, 0, 0))
    return merged


def _base_tensor(cache: PagedKVCache, unit: int) -> tuple[torch.Tensor, int]:
    """A one-element tensor of the unit dtype at the lowest tensor address of the cache, and that address."""
    base = min(cache.tensors, key=lambda t: t.data_ptr())
    storage = base.untyped_storage()
    offset = base.data_ptr() - storage.data_ptr()
    view = torch.empty(0, dtype=INT_VIEW[unit], device=base.device)
    view.set_(storage, offset // unit, (1,), (1,))
    return view, base.data_ptr()


def _gcd_all(values) -> int:
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    return g


def _plan(src: PagedKVCache, dst: PagedKVCache) -> CopyPlan:
    itemsize = src.geometry.itemsize
    dims = _merge_inner_dims(src, dst)
    s_addr, d_addr = src.piece_addresses(), dst.piece_addresses()
    sb, db = src.layout.stride["block"], dst.layout.stride["block"]
    unit = itemsize
    if dims[2][1] == 1 and dims[2][2] == 1:  # rows dense in both caches: widen the element
        strides = [stride for _, a, b in dims[:2] for stride in (a, b)] + [sb, db]
        common = _gcd_all([dims[2][0] * itemsize] + [x * itemsize for x in strides] + s_addr + d_addr)
        unit = max(u for u in INT_VIEW if common % u == 0 and u % itemsize == 0)
    k = unit // itemsize
    dims_u = tuple((n, a // k, b // k) for n, a, b in dims[:2]) + ((dims[2][0] // k, dims[2][1], dims[2][2]),)
    src_base, src_lo = _base_tensor(src, unit)
    dst_base, dst_lo = _base_tensor(dst, unit)
    s_off = [(a - src_lo) // unit for a in s_addr]
    d_off = [(a - dst_lo) // unit for a in d_addr]
    sb, db = sb // k, db // k
    align = _gcd_all(s_off + d_off + [sb, db] + [x for _, a, b in dims_u[:2] for x in (a, b)]) or 16
    align = min(align & -align, 16)
    device = src.device if src.device.type == "cuda" else dst.device
    return CopyPlan(
        unit=unit,
        dims=dims_u,
        src_block_stride=sb,
        dst_block_stride=db,
        src_offsets_host=tuple(s_off),
        dst_offsets_host=tuple(d_off),
        src_offsets_aligned=torch.tensor([o // align for o in s_off], dtype=torch.int64, device=device),
        dst_offsets_aligned=torch.tensor([o // align for o in d_off], dtype=torch.int64, device=device),
        src_base=src_base,
        dst_base=dst_base,
        align=align,
    )


def build_plan(src: PagedKVCache, dst: PagedKVCache) -> CopyPlan:
    """The plan for copies from `src` to `dst`, cached on `src` per destination and layouts (`IdentityMemo`).

    The plan holds views of both caches' memory; kept on `src` only while `dst` lives, it never keeps `dst` alive.
    """
    plans = src.__dict__.get("_copy_plans")
    if plans is None:
        plans = src.__dict__["_copy_plans"] = IdentityMemo()
    plan = plans.find(id(dst), dst, dst.layout, src.layout)
    if plan is None:
        plan = plans.keep(id(dst), _plan(src, dst), dst, dst.layout, src.layout)
    return plan
