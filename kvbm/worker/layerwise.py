"""One step's layer-wise loads: moves from host tiers into the engine's cache, one transfer per group of layers,
started with the forward that reads them; each layer's attention waits only for its own group (on a GPU the engine's
stream waits on the device for the group's completion event, so the host goes on queueing the forward; on the CPU
the wait blocks until the group's copy is done).

Groups grow from one layer, doubling up to the configured size (`layer_groups`): the first layer's attention waits
for the first group's whole transfer, so a small first group starts the forward sooner, and the later, larger groups
stay ahead of the layers that read them. Where the leader expects the forward to outlast the transfer (the step
plan's ``layer_ratio``, from the cost rule's estimates), groups keep doubling past that size, so fewer transfers
are started.

The transfer plans and kernels of every group a load can use (`layer_group_ranges`: every layout any ratio gives)
are built at start-up (`warm_up`, which the worker's `prepare_transfers` runs), not in the step that first
uses a group: a ratio that moves as the cost rule learns changes the layout between steps.

The groups are enqueued in the caller's thread, before the forward; with ``later_groups_in_forward``
(``DYN_KVBM_ONBOARD_LATER_GROUPS_IN_FORWARD``) only the first group is, and the later ones at the forward's first
`wait_for_layer`: where the forward is bound by the GPU (replayed CUDA graphs, long prefills) their host time then
runs while the GPU computes the first layer and the first group crosses PCIe, instead of before the forward. Each
group is ordered after the work queued on the caller's stream when it is enqueued, so the later groups are
enqueued before the first wait orders that stream after the first group. Off by default; `bench/gpu_session.sh
ttft-later` times the TTFT bench's layer-wise rows with it and without it.

Enqueueing the groups from a thread of their own, so that the forward is queued meanwhile, was measured slower on an
H100 (Llama-3.1-8B shape, 16k-token prefix: 73 ms TTFT against 48 ms): the enqueue's Python steps and the forward's
launches then take turns on the GIL. Handing only the later groups' compiled enqueue (which holds no GIL) to a thread
gained nothing either (H100, six alternating runs at 2k and 8k: hidden shares unchanged, the caller's
`onboard_groups` still 358-447 us): most of the caller's time there is Python per group (checks, table lookups,
events), not driver calls.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from kvbm.kernels import stream_events
from kvbm.kernels.block_transfer import BlockTransfer
from kvbm.kernels.medium import Medium, medium_of
from kvbm.leader.plans import ENGINE_TIER, Move
from kvbm.worker.store import BlockStore, LayeredMoves

__all__ = ["LayerwiseLoads", "layer_group_ranges", "layer_groups"]


#: Share of the forward's expected time a group's size is planned on (the estimate covers the whole step, and a
#: group that arrives late holds the layers after it back).
COMPUTE_MARGIN = 0.75


def layer_groups(num_layers: int, layers_per_group: int, compute_ratio: float = 0.0) -> list[tuple[int, int]]:
    """[start, stop) of each layer group: 1, 2, 4, ... layers, doubling up to `layers_per_group`, the last group
    cut at `num_layers`.

    ``compute_ratio`` r (the forward's expected time over the transfer's, 0 when not known) lets groups keep
    doubling past `layers_per_group`: at steady rates the transfer of layers ``[a, b)`` is done by the time the
    forward, started once layer 0 landed, reaches layer ``a`` when ``b <= 1 + a * r``, which doubling groups meet
    for any r >= 2. A group doubles where that bound (with r taken at `COMPUTE_MARGIN`) allows; with r > 0 every
    group is a power of two of layers (the tail split into powers of two), because the copy kernels are compiled
    per number of layers they move (measured on an H100: a group size not seen before cost about 150 ms of
    compilation in the load it started). A compute-bound load over 32 layers then runs in six groups (1, 2, 4, 8,
    16, 1) instead of ten; an estimate too high costs at most the stalls of doubling groups."""
    if num_layers < 1 or layers_per_group < 1:
        raise ValueError(f"layer groups need num_layers and layers_per_group >= 1, got {num_layers}, "
                         f"{layers_per_group}")
    if not compute_ratio >= 0 or compute_ratio == float("inf"):
        raise ValueError(f"compute_ratio must be a finite number >= 0, got {compute_ratio!r}")
    ratio = compute_ratio * COMPUTE_MARGIN
    groups, start, size = [], 0, 1
    while start < num_layers:
        take = min(size, layers_per_group)
        if ratio > 0:
            take = _power_of_two_below(min(num_layers - start, max(take, min(size, int(1 + start * ratio) - start))))
        stop = min(start + take, num_layers)
        groups.append((start, stop))
        start, size = stop, 2 * size
    return groups


@functools.lru_cache(maxsize=None)
def layer_group_ranges(num_layers: int, layers_per_group: int, cost_sized: bool = True) -> tuple[tuple[int, int], ...]:
    """Every ``[start, stop)`` that `layer_groups` can return for these sizes, over every compute ratio (only the
    ratio 0 with ``cost_sized`` False), sorted: the groups whose plans and kernels `LayerwiseLoads.warm_up` builds.

    A ratio r acts only through ``int(1 + start * r * COMPUTE_MARGIN)`` for the starts below ``num_layers``, and
    below 1 (after the margin) only as "r > 0"; so the ratios between consecutive steps ``(k - 1) / start`` (k up to
    ``start + num_layers``) give every layout, and one ratio in each interval between them is tried."""
    layer_groups(num_layers, layers_per_group)  # (checks the values)
    ranges = set(layer_groups(num_layers, layers_per_group))
    if cost_sized:
        steps = sorted({(k - 1) / start for start in range(1, num_layers)
                        for k in range(start + 1, start + num_layers + 1)} | {0.0})
        probes = [(a + b) / 2 for a, b in zip(steps, steps[1:])] + [steps[-1] + 1.0]
        for ratio in probes:
            ranges.update(layer_groups(num_layers, layers_per_group, ratio / COMPUTE_MARGIN))
    return tuple(sorted(ranges))


def _power_of_two_below(n: int) -> int:
    """The largest power of two <= ``n`` (``n`` >= 1)."""
    return 1 << (n.bit_length() - 1)


class LayerwiseLoads:
    """The layer-wise loads of the current step (see the module docstring)."""

    def __init__(self, store: BlockStore, engine_cache: Any, layers_per_group: int, *,
                 later_groups_in_forward: bool = False) -> None:
        self.store = store
        self.engine_cache = engine_cache
        self.num_layers = engine_cache.geometry.num_layers
        self.layers_per_group = layers_per_group
        #: whether `start` enqueues the first group only, and the first `wait_for_layer` the others
        self.later_groups_in_forward = later_groups_in_forward
        layer_groups(self.num_layers, layers_per_group)  # (checks the values at start-up)
        #: [start, stop) of each layer group of the current step's loads.
        self.groups: list[tuple[int, int]] = []
        self._group_of: list[int] = []
        self._waits: list[list[BlockTransfer]] = []
        self._later: LayeredMoves | None = None  # the host moves whose groups after the first are not enqueued yet
        self._ordered: set[tuple[int, int | None]] = set()  # (group, raw stream) ordered after the group's transfers
        device = engine_cache.device
        self._gpu = device.type == "cuda"
        self._device_index = (device.index if device.index is not None else torch.cuda.current_device()) \
            if self._gpu else -1

    def warm_up(self, cost_sized: bool = True) -> None:
        """Build now what the loads of every layer group they can use need, from each host tier into the engine cache
        (`layer_group_ranges`, `BlockStore.prepare_layers`): on the GPU the copy plans and the kernels compiled per
        number of layers, which a load would otherwise build inside the step that first uses a group (a group size
        not seen before cost about 150 ms of compilation in the load it started, measured on an H100)."""
        ranges = layer_group_ranges(self.num_layers, self.layers_per_group, cost_sized)
        for tier in self.store.host_tiers:
            self.store.prepare_layers(tier, ENGINE_TIER, ranges)

    @property
    def active(self) -> bool:
        """Whether loads of this step are started and not yet finished."""
        return bool(self._waits)

    @property
    def transfers(self) -> tuple[tuple[BlockTransfer, ...], ...]:
        """This step's transfers per layer group enqueued so far (empty once finished)."""
        return tuple(tuple(group) for group in self._waits)

    def start(self, moves: Sequence[Move], compute_ratio: float = 0.0) -> None:
        """Start this step's layer-wise moves (all at once: the moves of one pair of tiers join into one transfer per
        group), in groups sized by ``compute_ratio`` (the forward's expected time over the transfer's, 0 when not
        known; see `layer_groups`); with `later_groups_in_forward` only the first group now. A move from another
        medium than host memory (a block that left G2 since the lookup) is waited for whole before the first
        layer."""
        if self._waits:
            raise RuntimeError("the layer-wise loads of the previous step were not finished")
        self.groups = layer_groups(self.num_layers, self.layers_per_group, compute_ratio)
        self._group_of = [k for k, (a, b) in enumerate(self.groups) for _ in range(a, b)]
        host: list[Move] = []
        other: list[Move] = []
        for move in moves:
            (host if medium_of(self.store.cache(move.src_tier)) is Medium.HOST else other).append(move)
        self._waits = [[] for _ in self.groups]
        if other:
            self._waits[0].extend(*self.store.execute_by_layers(other, [(0, self.num_layers)]))
        if not host:
            return
        layered = self.store.layered(host)
        now = self.groups[:1] if self.later_groups_in_forward else self.groups
        for k, transfers in enumerate(layered.submit_groups(now)):
            self._waits[k].extend(transfers)
        if len(now) < len(self.groups):
            self._later = layered
        else:
            layered.track()

    def _enqueue_later_groups(self) -> None:
        """Enqueue the groups after the first that `start` left (ordered after the caller's stream's work so far)."""
        if self._later is None:
            return
        layered, self._later = self._later, None
        for k, transfers in enumerate(layered.submit_groups(self.groups[1:]), start=1):
            self._waits[k].extend(transfers)
        layered.track()

    def wait_for_layer(self, layer: int) -> None:
        """Order the engine's later work on ``layer`` after its group's transfers: on the GPU the current stream waits
        on the device (once per group and stream: the group's later layers follow on that stream anyway), on the
        CPU the call blocks until they are done. The first call enqueues the groups `start` left, first.

        On the GPU this runs once per layer of every forward, so it takes the current stream's raw handle and
        orders it without polling the transfers (`BlockTransfer.order_raw_stream`)."""
        if not self._waits:
            return
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is not one of the engine cache's {self.num_layers} layers")
        self._enqueue_later_groups()
        k = self._group_of[layer]
        raw_stream = stream_events.current_stream(self._device_index) if self._gpu else None
        key = (k, raw_stream)
        if key in self._ordered:
            return
        for transfer in self._waits[k]:
            if raw_stream is None:
                transfer.order_stream(None)
            else:
                transfer.order_raw_stream(raw_stream)
        self._ordered.add(key)

    def finish(self) -> bool:
        """Block until this step's transfers are done (enqueueing the groups not enqueued yet); whether there were
        any."""
        if not self._waits:
            return False
        try:
            self._enqueue_later_groups()
            for group in self._waits:
                for transfer in group:
                    transfer.wait()
        finally:
            self._waits = []
            self._ordered.clear()
        return True
