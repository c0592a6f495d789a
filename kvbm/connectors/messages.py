"""What an engine connector's scheduler side sends its workers each step, and what comes back: plain data.

`StepPlan` rides in the engine's per-step connector metadata; `WorkerReport` in the worker output the engine
hands back to its scheduler. Both hold only request ids, moves, engine block ids and a few numbers, so they pickle
cheaply across the engine's processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvbm.leader.plans import Move, MoveResult

__all__ = ["RequestLoad", "RequestStore", "StepPlan", "StepTiming", "WorkerReport"]


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
    requests wait for ``finished_sending``. ``step`` numbers the leader's plans (1, 2, ...; 0: unnumbered);
    ``timed_tokens``: the tokens this step's forward computes when it is to be timed for the cost rule's prefill
    rate (a prefill-dominated step, `kvbm.connectors.prefill`), else 0; ``layer_ratio``: the forward's expected
    time over the expected transfer time of the step's layer-wise loads, which sizes their layer groups
    (`kvbm.worker.layerwise.layer_groups`; 0 when not known)."""

    loads: list[RequestLoad] = field(default_factory=list)
    stores: list[RequestStore] = field(default_factory=list)
    cascades: list[Move] = field(default_factory=list)
    preempted: frozenset[str] = frozenset()
    held: list[str] = field(default_factory=list)
    step: int = 0
    timed_tokens: int = 0
    layer_ratio: float = 0.0

    def is_empty(self) -> bool:
        """Whether the step carries no work (no moves, nothing to time)."""
        return not (self.loads or self.stores or self.cascades or self.preempted or self.held or self.timed_tokens)


@dataclass(frozen=True, slots=True)
class StepTiming:
    """How long one rank's forward of plan ``step`` took to compute its ``tokens`` (the plan's ``timed_tokens``):
    ``seconds`` of GPU time on a GPU, of wall time on CPU; ``stage`` is the rank's pipeline stage."""

    step: int
    tokens: int
    seconds: float
    rank: int
    stage: int = 0


@dataclass(slots=True)
class WorkerReport:
    """Results of the moves a worker finished since its last report, by move id; ``released``: requests of this
    instance whose pinned blocks another instance finished reading, with how many reading ranks said so;
    ``timings``: forward steps timed since the last report; ``registered``: ranks whose tiers are allocated and
    running plans (each rank names itself in its first report); ``failed_blocks``: per rank, the blocks of these
    results that failed there (the merged results no longer say which rank failed a block)."""

    results: dict[int, MoveResult] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)
    timings: tuple[StepTiming, ...] = ()
    registered: frozenset[int] = frozenset()
    failed_blocks: dict[int, int] = field(default_factory=dict)

    def merged(self, other: WorkerReport) -> WorkerReport:
        """Two reports in one (of two ranks, or of two steps): results of the same move are merged."""
        out = dict(self.results)
        for move_id, result in other.results.items():
            out[move_id] = out[move_id].merged(result) if move_id in out else result
        released = dict(self.released)
        for request_id, count in other.released.items():
            released[request_id] = released.get(request_id, 0) + count
        failed = dict(self.failed_blocks)
        for rank, count in other.failed_blocks.items():
            failed[rank] = failed.get(rank, 0) + count
        return WorkerReport(out, released, self.timings + other.timings, self.registered | other.registered, failed)
