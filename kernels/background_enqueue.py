"""Enqueues finished on a thread of their own, so the caller's thread goes on (queueing the model's forward) while
the driver calls of a layer-wise load's later layer groups are made.

The compiled enqueue (`staged_enqueue`) runs without the GIL, so a thread that makes those calls takes nothing from
the thread that queues the forward but a core. A transfer enqueued there has a `Gate`: its CUDA event is recorded
only once the gate has passed, so whoever waits on the event (a stream wait, a poll, a synchronize) passes the gate
first. The compiled enqueue advances an `EnqueueProgress` as it records each transfer's event.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["EnqueueProgress", "EnqueueThread", "Gate"]

log = logging.getLogger(__name__)


class EnqueueProgress:
    """How many of a background enqueue's ``count`` transfers, in order, are enqueued with their events recorded:
    ``enqueued[0]``, written by the compiled enqueue; `finish` settles them all (each enqueued or failed)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.enqueued = np.zeros(1, dtype=np.int64)

    def passed(self, index: int) -> bool:
        """Whether transfer ``index`` is enqueued or failed; never blocks."""
        return int(self.enqueued[0]) > index

    def wait(self, index: int) -> None:
        """Block until transfer ``index`` is enqueued or failed (the enqueue holds no GIL: each look yields it)."""
        while int(self.enqueued[0]) <= index:
            time.sleep(0)

    def finish(self) -> None:
        """Every transfer is enqueued or failed (the enqueue has returned)."""
        self.enqueued[0] = self.count

    def gate(self, index: int) -> Gate:
        """The gate of transfer ``index``."""
        return Gate(self, index)


@dataclass(frozen=True)
class Gate:
    """Passed once transfer ``index`` of a background enqueue is enqueued (its event recorded) or failed."""

    progress: EnqueueProgress
    index: int

    def passed(self) -> bool:
        """Whether the gate has passed; never blocks."""
        return self.progress.passed(self.index)

    def wait(self) -> None:
        """Block until the gate has passed."""
        self.progress.wait(self.index)


class EnqueueThread:
    """One daemon thread running enqueue jobs in the order they were given, after ``prepare`` (which makes the
    device's CUDA context current there). A job settles its own transfers, failed ones too: one that raises is
    logged, and the thread goes on with the next."""

    def __init__(self, name: str, prepare: Callable[[], None]) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, args=(prepare,), name=name, daemon=True)
        self._thread.start()

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the thread after the jobs given before it; returns at once."""
        self._jobs.put(job)

    def _serve(self, prepare: Callable[[], None]) -> None:
        try:
            prepare()
        except Exception:  # noqa: BLE001 - the jobs' driver calls then fail, and fail their transfers
            log.exception("kvbm: %s: setting up the enqueue thread failed", self._thread.name)
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:  # noqa: BLE001 - the thread serves the next job
                log.exception("kvbm: %s: an enqueue job raised", self._thread.name)
