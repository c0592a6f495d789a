"""What an engine connector's scheduler side sends its workers each step, and what comes back: plain data.

`StepPlan` rides in the engine's per-step connector metadata; `WorkerReport` in the worker output the engine
hands back to its scheduler. Both hold only request ids, moves and engine block ids, so they pickle cheaply across
the engine's processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvbm.leader.plans import Move, MoveResult

__all__ = ["RequestLoad", "RequestStore", "StepPlan", "WorkerReport"]


@dataclass(frozen=True, slots=True)
class RequestLoad:
    """The moves loading one request's stored blocks into its engine blocks; ``missing`` are engine blocks whose
    block was no longer stored when the load was planned (the engine recomputes them). A ``layerwise`` load is read
    by the forward of the step that carries it: it runs one group of layers at a time, each layer's attention
    waiting for its own group, and is not reported as a finished asynchronous load."""

    request_id: str
    moves: tuple[Move, ...]
    missing: tuple[int, ...] = ()
    layerwise: bool = False


@dataclass(frozen=True, slots=True)
class RequestStore:
    """The moves storing one request's newly computed full blocks."""

    request_id: str
    moves: tuple[Move, ...]


@dataclass(slots=True)
class StepPlan:
    """One scheduler step's work: ``loads`` start before the forward pass, ``stores`` after it, ``cascades``
    (tier to tier) at any time; ``preempted`` requests have blocks about to be reused (preempted requests, or
    requests whose sliding-window blocks the engine freed): their stores must finish first; ``held`` finished
    requests wait for ``finished_sending``."""

    loads: list[RequestLoad] = field(default_factory=list)
    stores: list[RequestStore] = field(default_factory=list)
    cascades: list[Move] = field(default_factory=list)
    preempted: frozenset[str] = frozenset()
    held: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        """Whether the step carries no work."""
        return not (self.loads or self.stores or self.cascades or self.preempted or self.held)


@dataclass(slots=True)
class WorkerReport:
    """Results of the moves a worker finished since its last report, by move id; ``released``: requests of this
    instance whose pinned blocks another instance finished reading, with how many reading ranks said so."""

    results: dict[int, MoveResult] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)

    def merged(self, other: WorkerReport) -> WorkerReport:
        """Two reports in one (of two ranks, or of two steps): results of the same move are merged."""
        out = dict(self.results)
        for move_id, result in other.results.items():
            out[move_id] = out[move_id].merged(result) if move_id in out else result
        released = dict(self.released)
        for request_id, count in other.released.items():
            released[request_id] = released.get(request_id, 0) + count
        return WorkerReport(out, released)
