"""Which of an engine's worker ranks the scheduler side has heard from, waited for up to a timeout.

A move completes once every rank reported it, so the leader plans no load or store before every rank has said its
tiers are allocated and it runs plans (``DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS``, as Dynamo KVBM's leader waits
for its workers). The wait never blocks the engine: while ranks are missing the leader reports no hits and plans
no stores, so every request is computed by the engine, and a rank still missing when the timeout has passed is an
error (`WorkersMissingError`, naming the ranks) raised from the next scheduler call.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

__all__ = ["WorkerRegistry", "WorkersMissingError"]

log = logging.getLogger(__name__)


class WorkersMissingError(RuntimeError):
    """Worker ranks did not register with the scheduler side within DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS."""


class WorkerRegistry:
    """The ranks ``0 .. num_workers - 1`` that registered; the clock starts at construction."""

    def __init__(self, num_workers: int, timeout_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        """``timeout_s``: seconds after construction by which every rank must have registered; ``clock``: seconds
        (injectable for tests)."""
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers <= 0:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self._clock = clock
        self.deadline = clock() + self.timeout_s  #: when (on ``clock``) every rank must have registered
        self._registered: set[int] = set()
        self._ready = False
        self._warned = False

    @property
    def missing(self) -> list[int]:
        """Ranks not registered yet, in order."""
        return [r for r in range(self.num_workers) if r not in self._registered]

    def register(self, ranks: Iterable[int]) -> None:
        """Ranks that allocated their tiers (a rank beyond the engine's world size counts as itself modulo the world
        size, as a global rank numbering under data parallelism gives)."""
        for rank in ranks:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise ValueError(f"a worker rank must be a non-negative int, got {rank!r}")
            self._registered.add(rank % self.num_workers)

    def ready(self) -> bool:
        """Whether every rank registered. While not: a WARNING the first time, naming the missing ranks; raises
        `WorkersMissingError` once the timeout has passed."""
        if self._ready:
            return True
        missing = self.missing
        if not missing:
            self._ready = True
            if self._warned:
                log.info("kvbm: all %d worker ranks registered; loads and stores are planned from now on",
                         self.num_workers)
            return True
        if self._clock() >= self.deadline:
            raise WorkersMissingError(
                f"kvbm: worker rank(s) {_ranks(missing)} of {self.num_workers} did not register with the scheduler "
                f"side within DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS={self.timeout_s:g} s (registered: "
                f"{_ranks(sorted(self._registered)) or 'none'}); no load or store was planned meanwhile")
        if not self._warned:
            self._warned = True
            log.warning("kvbm: waiting for worker rank(s) %s of %d to register (up to %g s, "
                        "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS); until then no hit is reported and nothing is "
                        "stored", _ranks(missing), self.num_workers, self.deadline - self._clock())
        return False


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
