"""How long a layer-wise onboard's layers wait behind a running prefill (GPU only).

The same layer-wise G2 -> G1 load of a stored prefix runs twice: alone, then with a prefill of other tokens queued
on the engine's stream right after it starts (the model's kernels then hold the SMs while the load's scatter kernels
want them). A side stream waits for each layer group's transfer and records a timing event, so each group's
completion time is measured from the load's start. The copy engines' DMA does not need SMs, so a group finishing
later beside the prefill waited for SMs (its scatter) or for memory bandwidth: ``delay`` per group is that
difference, an upper bound of the scatter's wait.

The scatter's own wait is timed too, in a second pair of runs: staged transfers enqueued by the engine's Python path
(the same chunks, streams and events as the compiled enqueue), with a timing event recorded on the kernel stream
just before each scatter launch (it completes once the chunk's bytes have landed and the stream is free) and one
just after. Beside the prefill, that interval is the scatter's wait for SMs plus its run; ``scatter_wait`` is how
much longer each is than the median scatter alone.
"""
from __future__ import annotations

import contextlib
import random
import statistics
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from kvbm.hashing import sequence_hashes

from .engine import Engine, KvbmSide, sync
from .model import BLOCK_SIZE

__all__ = ["measure_layer_waits"]


@contextlib.contextmanager
def _timed_scatters() -> Iterator[list[tuple[Any, Any]]]:
    """While open: staged transfers take the engine's Python enqueue, and every kernel launch of it is bracketed by
    two timing events on its stream, appended to the yielded list as (before, after)."""
    from kvbm.kernels import transfer

    pairs: list[tuple[Any, Any]] = []
    real_copy, real_takes = transfer._triton_copy, transfer.TransferEngine._compiled_enqueue_takes
    launch = real_copy().launch

    def timed_launch(*args: Any, stream: Any, **kwargs: Any) -> None:
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(stream)
        launch(*args, stream=stream, **kwargs)
        after.record(stream)
        pairs.append((before, after))

    transfer._triton_copy = lambda: SimpleNamespace(launch=timed_launch)
    transfer.TransferEngine._compiled_enqueue_takes = lambda self, *args: False  # (the compiled enqueue's one gate)
    try:
        yield pairs
    finally:
        transfer._triton_copy, transfer.TransferEngine._compiled_enqueue_takes = real_copy, real_takes


def _layer_times(eng: Engine, side: KvbmSide, hashes: Sequence[int], busy_tokens: list[int]) -> list[float]:
    """Milliseconds from the load's start until each layer group is loaded; with ``busy_tokens``, their prefill
    runs on the engine's stream beside the load."""
    eng.evict_all()
    blocks = eng.pool.allocate(len(hashes))
    busy_blocks = eng.pool.allocate(-(-len(busy_tokens) // BLOCK_SIZE)) if busy_tokens else []
    side.leader.plan_load("layer-waits", hashes, blocks, layerwise=True)
    plan = side.leader.take_step()
    stream = torch.cuda.current_stream(eng.device)
    watcher = torch.cuda.Stream(eng.device)
    start = torch.cuda.Event(enable_timing=True)
    sync(eng.device)
    start.record(stream)
    watcher.wait_event(start)
    side.worker.start_loads(plan.loads, plan.layer_ratio)
    with torch.cuda.stream(watcher):  # every group enqueued now (with DYN_KVBM_ONBOARD_LATER_GROUPS_IN_FORWARD too)
        side.worker.wait_for_layer(0)
    marks = []
    for group in side.worker.layer_transfers:  # (queued before the prefill: its host time must not delay them)
        for transfer in group:
            transfer.order_stream(watcher)
        mark = torch.cuda.Event(enable_timing=True)
        mark.record(watcher)
        marks.append(mark)
    if busy_tokens:
        eng.model.prefill(torch.tensor(busy_tokens, device=eng.device), eng.caches,
                          torch.tensor(busy_blocks, device=eng.device), 0)
    side.worker.finish_layerwise_loads()
    sync(eng.device)
    errors = side.worker.take_load_errors()
    side.worker.take_failed_loads()
    side.step()
    eng.pool.release(blocks + busy_blocks)
    if errors:
        raise RuntimeError(f"layer-wise load failed for {len(errors)} blocks")
    return [start.elapsed_time(mark) for mark in marks]


def measure_layer_waits(eng: Engine, side: KvbmSide, prefix_tokens: Sequence[int], busy_new: int, vocab: int,
                        reps: int) -> dict[str, Any]:
    """Per-group completion times of a layer-wise onboard of ``prefix_tokens`` (stored in ``side``'s G2) alone
    and beside a ``busy_new``-token prefill, medians over ``reps``; and the delays."""
    hashes = sequence_hashes(list(prefix_tokens), BLOCK_SIZE, 0)
    found, _ = side.leader.lookup(hashes, whole_prompt=False)
    if found != len(hashes):
        raise RuntimeError(f"{found} of {len(hashes)} prefix blocks are stored: nothing to measure")
    rng = random.Random(busy_new)
    alone, beside = [], []
    for _ in range(reps + 1):  # the first repetition warms up
        alone.append(_layer_times(eng, side, hashes, []))
        beside.append(_layer_times(eng, side, hashes, [rng.randrange(vocab) for _ in range(busy_new)]))
    alone_ms = [statistics.median(t[i] for t in alone[1:]) for i in range(len(alone[0]))]
    beside_ms = [statistics.median(t[i] for t in beside[1:]) for i in range(len(beside[0]))]
    delays = [b - a for a, b in zip(alone_ms, beside_ms)]
    scatters: dict[str, list[list[float]]] = {"alone": [], "beside": []}
    for _ in range(reps + 1):
        for name, busy in (("alone", []), ("beside", [rng.randrange(vocab) for _ in range(busy_new)])):
            with _timed_scatters() as pairs:
                _layer_times(eng, side, hashes, busy)
            scatters[name].append([before.elapsed_time(after) * 1e3 for before, after in pairs])
    scatter_alone = [t for rep in scatters["alone"][1:] for t in rep]  # (every kernel of the timed repetitions)
    scatter_beside = [t for rep in scatters["beside"][1:] for t in rep]
    # each kernel against the same kernel (same chunk of the same group) of the repetition alone
    waits = [b - a for alone, beside in zip(scatters["alone"][1:], scatters["beside"][1:]) if len(alone) == len(beside)
             for a, b in zip(alone, beside)]
    if not waits:
        raise RuntimeError("the scatter kernels of the runs alone and beside the prefill do not pair up")
    return {"prefix_tokens": len(prefix_tokens), "busy_prefill_tokens": busy_new, "reps": reps,
            "layers_alone_ms": alone_ms, "layers_beside_prefill_ms": beside_ms, "delay_ms": delays,
            "max_delay_us": max(delays) * 1e3, "median_delay_us": statistics.median(delays) * 1e3,
            "per_group_alone_us": alone_ms[-1] / len(alone_ms) * 1e3,
            "scatter_kernels": len(scatter_alone),
            "scatter_alone_us": scatter_alone, "scatter_beside_prefill_us": scatter_beside, "scatter_wait_us": waits,
            "max_scatter_wait_us": max(waits), "median_scatter_wait_us": statistics.median(waits)}
