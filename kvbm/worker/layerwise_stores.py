"""One step's stores from the engine's cache into host memory, one transfer per group of layers, each started as soon
as the forward has queued the last layer of its group (vLLM's ``save_kv_layer``), so the copies of the first layers
run beside the compute of the later ones and the stores end a group's transfer after the forward instead of a whole
store after it.

Only stores into a host tier are taken (a disk tier writes whole blocks: its stores start after the forward, as
before). Each group's transfer is ordered after the work queued on the caller's stream when it is started, so it
copies the bytes the layers of its group were just given. Groups not started by the end of the forward (an engine
that calls ``save_layer`` for some layers only) are started by `finish`.

A group moves at least `MIN_GROUP_BYTES` where the step's stores allow (`store_groups`): each group's submit costs
host time inside the forward, and a step storing few blocks (a 256-token step of Llama-3.1-8B's shape stores 1 MiB
a layer) gains nothing from starting its copies a few layers sooner.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvbm.kernels.medium import Medium, medium_of
from kvbm.leader.plans import ENGINE_TIER, Move, MoveKind
from kvbm.worker.store import BlockStore, LayeredMoves

__all__ = ["LayerwiseStores", "even_groups", "store_group_ranges", "store_groups"]

#: Fewest bytes a group of layer-wise stores is sized to move: groups double from the configured size until they
#: do (or hold every layer). On an H100 (Llama-3.1-8B shape, 256 new tokens after a 2k prefix) the stores added
#: 3.5-3.9 ms to the forward in 4-layer groups and 0.8-1.6 ms in the 16-layer groups this gives.
MIN_GROUP_BYTES = 16 << 20


def even_groups(num_layers: int, layers_per_group: int) -> list[tuple[int, int]]:
    """[start, stop) of groups of ``layers_per_group`` layers, the last one cut at ``num_layers``."""
    if num_layers < 1 or layers_per_group < 1:
        raise ValueError(f"layer groups need num_layers and layers_per_group >= 1, got {num_layers}, "
                         f"{layers_per_group}")
    return [(a, min(a + layers_per_group, num_layers)) for a in range(0, num_layers, layers_per_group)]


def store_groups(num_layers: int, layers_per_group: int, layer_bytes: int,
                 min_group_bytes: int = MIN_GROUP_BYTES) -> list[tuple[int, int]]:
    """`even_groups` of ``layers_per_group`` layers, doubled until a group of ``layer_bytes`` a layer moves at least
    ``min_group_bytes`` or holds every layer (sizes stay the configured one times a power of two: the copy kernels
    are compiled per number of layers they move)."""
    if layer_bytes < 0 or min_group_bytes < 0:
        raise ValueError(f"layer_bytes and min_group_bytes must be >= 0, got {layer_bytes}, {min_group_bytes}")
    size = layers_per_group
    while size < num_layers and size * layer_bytes < min_group_bytes:
        size *= 2
    return even_groups(num_layers, size)


def store_group_ranges(num_layers: int, layers_per_group: int) -> tuple[tuple[int, int], ...]:
    """Every ``[start, stop)`` that `store_groups` can return for these sizes, whatever the step's bytes, sorted: the
    groups whose plans and kernels `LayerwiseStores.warm_up` builds."""
    ranges, size = set(even_groups(num_layers, layers_per_group)), layers_per_group
    while size < num_layers:
        size *= 2
        ranges.update(even_groups(num_layers, size))
    return tuple(sorted(ranges))


class LayerwiseStores:
    """The layer-wise stores of the current step (see the module docstring)."""

    def __init__(self, store: BlockStore, engine_cache: Any, layers_per_group: int) -> None:
        self.store = store
        self.num_layers = engine_cache.geometry.num_layers
        self.layers_per_group = layers_per_group
        self._block_bytes = engine_cache.geometry.block_bytes
        #: [start, stop) of each group of the current step (`store_groups` of its stores' bytes).
        self.groups = even_groups(self.num_layers, layers_per_group)
        self._layered: LayeredMoves | None = None
        self._next = 0  # the first group not started

    def warm_up(self) -> None:
        """Build now what the stores of every group they can use need, from the engine cache into each host tier
        (`store_group_ranges`, `BlockStore.prepare_layers`): on the GPU the copy plans and the kernels compiled per
        number of layers, which would otherwise be built inside the forward that first starts such a group."""
        ranges = store_group_ranges(self.num_layers, self.layers_per_group)
        for tier in self.store.host_tiers:
            self.store.prepare_layers(ENGINE_TIER, tier, ranges)

    @property
    def active(self) -> bool:
        """Whether this step's stores were taken and not yet finished."""
        return self._layered is not None

    def takes(self, move: Move) -> bool:
        """Whether ``move`` is a store this object runs by layers: from the engine's cache into a host tier."""
        return (move.kind is MoveKind.STORE and move.src_tier == ENGINE_TIER
                and medium_of(self.store.cache(move.dst_tier)) is Medium.HOST)

    def begin(self, moves: Sequence[Move]) -> None:
        """Take this step's ``moves`` (all of them `takes`); nothing is started before `save_layer`."""
        if self._layered is not None:
            raise RuntimeError("the layer-wise stores of the previous step were not finished")
        if any(not self.takes(m) for m in moves):
            raise ValueError("layer-wise stores take stores from the engine's cache into host memory only")
        layer_bytes = sum(m.num_blocks for m in moves) * self._block_bytes // self.num_layers
        self.groups = store_groups(self.num_layers, self.layers_per_group, layer_bytes, MIN_GROUP_BYTES)
        self._layered, self._next = self.store.layered(moves), 0

    def save_layer(self, layer: int) -> None:
        """The forward has queued ``layer``: start every group that ends at or before it."""
        if self._layered is None:
            return
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is not one of the engine cache's {self.num_layers} layers")
        while self._next < len(self.groups) and self.groups[self._next][1] <= layer + 1:
            self._layered.submit(*self.groups[self._next])
            self._next += 1

    def finish(self) -> bool:
        """Start the groups not started yet and hand the moves to the store (their results come through its
        ``poll``); whether there were any."""
        if self._layered is None:
            return False
        layered, self._layered = self._layered, None
        for start, stop in self.groups[self._next:]:
            layered.submit(start, stop)
        layered.track()
        return True
