"""One step's layer-wise loads: moves from host tiers into the engine's cache, one transfer per group of layers,
started with the forward that reads them; each layer's attention waits only for its own group.

On a GPU the transfers are enqueued from a submitting thread (the transfer engine's enqueue runs without the GIL),
ordered after the engine's stream as it was when the loads started, so the host goes on queueing the forward while
later groups are enqueued; a layer waits on the host only until its group is enqueued, then on the device for its
transfer's completion event. On the CPU the copies run in the caller's thread (numba's parallel copies must not run
in two threads at once), and a layer's wait blocks until its group's copy is done.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from kvbm.kernels.block_transfer import BlockTransfer
from kvbm.kernels.medium import Medium, medium_of
from kvbm.leader.plans import Move
from kvbm.worker.store import BlockStore

__all__ = ["LayerwiseLoads"]


class LayerwiseLoads:
    """The layer-wise loads of the current step (see the module docstring)."""

    def __init__(self, store: BlockStore, engine_cache: Any, layers_per_group: int) -> None:
        self.store = store
        self.engine_cache = engine_cache
        num_layers = engine_cache.geometry.num_layers
        self.layers_per_group = layers_per_group
        self.groups = [(a, min(a + layers_per_group, num_layers)) for a in range(0, num_layers, layers_per_group)]
        self._waits: list[list[BlockTransfer]] = []
        self._enqueued: list[threading.Event] = []
        self._submitting: Future | None = None
        self._gpu = engine_cache.device.type == "cuda"
        self._submitter = ThreadPoolExecutor(1, thread_name_prefix="kvbm-layers") if self._gpu else None
        self._stream = torch.cuda.Stream(engine_cache.device) if self._gpu else None

    @property
    def active(self) -> bool:
        """Whether loads of this step are started and not yet finished."""
        return bool(self._waits)

    @property
    def transfers(self) -> tuple[tuple[BlockTransfer, ...], ...]:
        """This step's transfers per layer group, as enqueued so far (empty once finished)."""
        return tuple(tuple(group) for group in self._waits)

    def start(self, moves: Sequence[Move]) -> None:
        """Start this step's layer-wise moves (all at once: the moves of one pair of tiers join into one transfer per
        group). A move from another medium than host memory (a block that left G2 since the lookup) is waited for
        whole before the first layer."""
        if self._waits:
            raise RuntimeError("the layer-wise loads of the previous step were not finished")
        host = [m for m in moves if medium_of(self.store.cache(m.src_tier)) is Medium.HOST]
        other = [m for m in moves if medium_of(self.store.cache(m.src_tier)) is not Medium.HOST]
        self._waits = [[] for _ in self.groups]
        self._enqueued = [threading.Event() for _ in self.groups]
        if other:
            self._waits[0].extend(*self.store.execute_by_layers(other, [(0, self.groups[-1][1])]))
        if not host or not self._gpu:
            if host:
                for k, transfers in enumerate(self.store.execute_by_layers(host, self.groups)):
                    self._waits[k].extend(transfers)
            for event in self._enqueued:
                event.set()
            return
        start = torch.cuda.Event()
        start.record(torch.cuda.current_stream(self.engine_cache.device))
        self._submitting = self._submitter.submit(self._submit, host, start)

    def _submit(self, moves: list[Move], start: torch.cuda.Event) -> None:
        def enqueued(k: int, transfers: list[BlockTransfer]) -> None:
            self._waits[k].extend(transfers)
            self._enqueued[k].set()

        try:
            with torch.cuda.device(self.engine_cache.device), torch.cuda.stream(self._stream):
                self._stream.wait_event(start)  # the transfers come after the engine's work queued before the step
                self.store.execute_by_layers(moves, self.groups, on_group=enqueued)
        finally:
            for event in self._enqueued:  # (a failure is raised by `finish`; no wait may hang on it)
                event.set()

    def wait_for_layer(self, layer: int) -> None:
        """Order the engine's later work on ``layer`` after its group's transfers: on the GPU the current stream waits
        on the device, on the CPU the call blocks until they are done."""
        if not self._waits:
            return
        if not 0 <= layer < self.groups[-1][1]:
            raise ValueError(f"layer {layer} is not one of the engine cache's {self.groups[-1][1]} layers")
        k = layer // self.layers_per_group
        self._enqueued[k].wait()
        stream = torch.cuda.current_stream(self.engine_cache.device) if self._gpu else None
        for transfer in self._waits[k]:
            transfer.order_stream(stream)

    def finish(self) -> bool:
        """Block until this step's transfers are done (raising what the submitting thread raised); whether there
        were any."""
        if not self._waits:
            return False
        submitting, self._submitting = self._submitting, None
        try:
            if submitting is not None:
                submitting.result()
            for group in self._waits:
                for transfer in group:
                    transfer.wait()
        finally:
            self._waits, self._enqueued = [], []
        return True

    def close(self) -> None:
        """Finish the step's transfers and stop the submitting thread."""
        try:
            self.finish()
        finally:
            if self._submitter is not None:
                self._submitter.shutdown(wait=True)
