"""Which of a multi-rank TensorRT-LLM engine's asynchronous loads every rank has finished, and whether they all
succeeded: one answer for all ranks.

TensorRT-LLM treats a load as done once every rank's ``get_finished`` returned it, and kvbm fails a request whose
blocks did not all load (`KvbmLoadError`, raised from ``get_finished``). A rank cannot tell on its own whether the
others loaded their share, and a rank raising alone would leave the others waiting in TensorRT-LLM's all-gather.
So the leader merges every rank's move results here and hands the outcome of each finished load to all ranks in the
next step's metadata: every rank then reports it loaded, or raises, in the same ``get_finished`` call. A block that
failed on any rank fails the request; blocks no longer stored when the load was planned fail it at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvbm.connectors.messages import RequestLoad, WorkerReport
from kvbm.leader.plans import Move

__all__ = ["LoadOutcomes"]


@dataclass
class _Pending:
    moves: set[int]
    why: list[str] = field(default_factory=list)


class LoadOutcomes:
    """Loads planned for ``world_size`` ranks, until every rank reported each of their moves."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._requests: dict[str, _Pending] = {}
        self._moves: dict[int, tuple[Move, str]] = {}  # load move id -> (move, request)
        self._reports: dict[int, int] = {}  # load move id -> ranks that reported it
        self._done: dict[str, tuple[str, ...]] = {}

    def planned(self, load: RequestLoad) -> None:
        """A load handed to the ranks in this step's plan."""
        pending = self._requests.setdefault(load.request_id, _Pending(set()))
        pending.moves.update(m.move_id for m in load.moves)
        pending.why += [f"engine block {b}: no longer stored when the load was planned" for b in load.missing]
        self._moves.update((m.move_id, (m, load.request_id)) for m in load.moves)
        if not pending.moves:
            self._finish(load.request_id)

    def reported(self, rank: int, report: WorkerReport) -> list[int]:
        """Take ``rank``'s results; returns the load moves every rank has now reported."""
        finished = []
        for move_id, result in report.results.items():
            if move_id not in self._moves:
                continue
            move, request_id = self._moves[move_id]
            pending = self._requests[request_id]
            pending.why += [f"engine block {move.dst_ids[i]} on rank {rank}: {reason}"
                            for i, reason in sorted(result.failed.items())]
            self._reports[move_id] = count = self._reports.get(move_id, 0) + 1
            if count == self.world_size:
                del self._moves[move_id], self._reports[move_id]
                pending.moves.discard(move_id)
                finished.append(move_id)
                if not pending.moves:
                    self._finish(request_id)
        return finished

    def take(self) -> dict[str, tuple[str, ...]]:
        """Requests whose load every rank finished since the last call: why blocks failed (empty: all loaded)."""
        done, self._done = self._done, {}
        return done

    def _finish(self, request_id: str) -> None:
        self._done[request_id] = tuple(self._requests.pop(request_id).why)
