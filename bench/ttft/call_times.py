"""Host time of each kvbm call in the TTFT benchmark's requests: ``python -m bench.ttft.call_times [bench args]``.

Runs `bench.ttft` (same arguments) with the calls a request makes into kvbm timed: the scheduler side's
``lookup``, ``plan_load``, ``take_step`` and ``plan_stores``; the worker side's ``start_loads``,
``finish_layerwise_loads``, ``start_stores``, ``poll`` and ``take_report``; inside a start, the layered moves
(``LayeredMoves``: made, submitted by groups, tracked), the face's ``Transfers.submit_groups``, the engine's
``onboard_groups`` and the building of its compiled-enqueue tables for a cache pair
(``TransferEngine._compiled_pair``). After the run it prints one line per request that went through a kvbm side:
whether it loaded layer by layer, the layer groups of its load and the compute ratio that sized them, each call's
microseconds in the order the calls returned (a call made inside another comes before it), then its TTFT, its time
before the forward (and of that, any wait for G1 blocks that stores still read) and its forward (ms). The bench's
own rows give only the totals; this shows which call keeps a request's forward waiting.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvbm.connectors.leader import ConnectorLeader
from kvbm.connectors.worker import ConnectorWorker
from kvbm.kernels.transfer import TransferEngine
from kvbm.kernels.transfers import Transfers
from kvbm.worker import layerwise
from kvbm.worker.store import LayeredMoves

from . import bench
from .engine import Engine

#: (class, method names) of the calls timed.
TIMED: tuple[tuple[type, tuple[str, ...]], ...] = (
    (ConnectorLeader, ("lookup", "plan_load", "take_step", "plan_stores")),
    (ConnectorWorker, ("start_loads", "finish_layerwise_loads", "start_stores", "poll", "take_report")),
    (LayeredMoves, ("__init__", "submit_groups", "track")),
    (Transfers, ("submit_groups",)),
    (TransferEngine, ("onboard_groups", "_compiled_pair")),
)


@dataclass
class RequestCalls:
    """What one request through a kvbm side did."""

    layerwise: bool
    tokens: int
    calls: list[tuple[str, float]] = field(default_factory=list)  #: (Class.method, seconds), in call order
    groups: list[tuple[int, int]] = field(default_factory=list)  #: the layer groups of its layer-wise load
    ratio: float | None = None  #: the compute ratio that sized them
    ttft_ms: float = 0.0
    load_wait_ms: float = 0.0
    block_wait_ms: float = 0.0  #: of ``load_wait_ms``: waiting for free G1 blocks that stores still read
    forward_ms: float = 0.0

    def line(self) -> str:
        """The request's line of the report."""
        parts = [f"req lw={self.layerwise} n={self.tokens}:"]
        if self.ratio is not None:
            parts.append(f"ratio={self.ratio:.2f} groups={len(self.groups)} {self.groups}")
        parts += [f"{name}={seconds * 1e6:.0f}" for name, seconds in self.calls]
        parts.append(f"| TTFT {self.ttft_ms:.2f} load {self.load_wait_ms:.2f} fwd {self.forward_ms:.2f}")
        if self.block_wait_ms:
            parts.append(f"(of the load, {self.block_wait_ms:.2f} waiting for G1 blocks stores still read)")
        return " ".join(parts)


def _timed(cls: type, name: str, record: Callable[[str, float], None]) -> Callable[..., Any]:
    method = getattr(cls, name)
    label = f"{cls.__name__}.{name}"

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            record(label, time.perf_counter() - start)
    return timed


@contextlib.contextmanager
def recording() -> Iterator[list[RequestCalls]]:
    """Time the calls of `TIMED` and collect one `RequestCalls` per request the engine serves through a kvbm side
    while the block runs; the classes are restored on exit."""
    requests: list[RequestCalls] = []
    current: list[RequestCalls | None] = [None]

    def record(label: str, seconds: float) -> None:
        if current[0] is not None:
            current[0].calls.append((label, seconds))

    start_loads = layerwise.LayerwiseLoads.start

    def start(self: layerwise.LayerwiseLoads, moves: Sequence[Any], compute_ratio: float = 0.0) -> None:
        start_loads(self, moves, compute_ratio)
        if current[0] is not None:
            current[0].groups, current[0].ratio = list(self.groups), compute_ratio

    run_request = Engine.run_request

    def run(self: Engine, prompt: Sequence[int], sides: Sequence[Any] = (), **kwargs: Any) -> Any:
        current[0] = RequestCalls(bool(kwargs.get("layerwise")), len(prompt)) if sides else None
        try:
            result = run_request(self, prompt, sides, **kwargs)
        finally:
            calls, current[0] = current[0], None
        if calls is not None:
            calls.ttft_ms, calls.load_wait_ms = result.ttft_s * 1e3, result.load_wait_s * 1e3
            calls.forward_ms, calls.block_wait_ms = result.forward_s * 1e3, result.block_wait_s * 1e3
            requests.append(calls)
        return result

    saved = [(cls, name, cls.__dict__[name]) for cls, names in TIMED for name in names]
    saved += [(layerwise.LayerwiseLoads, "start", start_loads), (Engine, "run_request", run_request)]
    try:
        for cls, names in TIMED:
            for name in names:
                setattr(cls, name, _timed(cls, name, record))
        layerwise.LayerwiseLoads.start = start
        Engine.run_request = run
        yield requests
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with `recording`, print each kvbm request's line; the benchmark's exit code."""
    with recording() as requests:
        code = bench.main(argv)
    for request in requests:
        print(request.line(), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
