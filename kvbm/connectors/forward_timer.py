"""One rank's timing of the engine's forward steps, for the cost rule's prefill rate (`kvbm.connectors.prefill`).

On a GPU the host only queues the forward, so its wall time says little: `ForwardTimer` records a CUDA event on
the current stream where the forward starts and one where it ends, and reads their elapsed GPU time once the
end event has completed (`take` polls, never waits). On CPU the forward runs while it is called: wall time. Nothing
is recorded while the stream is being captured into a CUDA graph.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvbm.connectors.messages import StepTiming

__all__ = ["ForwardTimer"]

#: Timed steps kept while their end has not completed on the device (older ones are dropped: a stalled stream).
_MAX_PENDING = 64


@dataclass
class _Pending:
    step: int
    tokens: int
    start: torch.cuda.Event | float
    end: torch.cuda.Event | float | None = None


class ForwardTimer:
    """Times forward steps of one rank on ``device``: `start` before the forward is queued, `stop` after it."""

    def __init__(self, device: torch.device, *, rank: int = 0, stage: int = 0) -> None:
        self.device = torch.device(device)
        self.rank, self.stage = rank, stage
        self._cuda = self.device.type == "cuda"
        self._running: _Pending | None = None
        self._pending: list[_Pending] = []

    def start(self, step: int, tokens: int) -> None:
        """The forward of plan ``step``, computing ``tokens`` tokens, is about to be queued (a step started and
        never stopped is dropped)."""
        self._running = None
        if self._cuda:
            if torch.cuda.is_current_stream_capturing():
                return
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self._running = _Pending(step, tokens, event)
        else:
            self._running = _Pending(step, tokens, time.perf_counter())

    def stop(self) -> None:
        """The running step's forward is queued (on CPU: done); nothing happens when no step is running."""
        running, self._running = self._running, None
        if running is None:
            return
        if self._cuda:
            running.end = torch.cuda.Event(enable_timing=True)
            running.end.record(torch.cuda.current_stream(self.device))
        else:
            running.end = time.perf_counter()
        self._pending.append(running)
        del self._pending[:-_MAX_PENDING]

    def take(self) -> tuple[StepTiming, ...]:
        """The timings of the stopped steps whose forward has completed (never blocks)."""
        done, waiting = [], []
        for p in self._pending:
            if not self._cuda:
                seconds = p.end - p.start
            elif p.end.query():
                seconds = p.start.elapsed_time(p.end) / 1e3
            else:
                waiting.append(p)
                continue
            if seconds > 0:
                done.append(StepTiming(p.step, p.tokens, seconds, self.rank, self.stage))
        self._pending = waiting
        return tuple(done)
