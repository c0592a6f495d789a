"""What kvbm's offloading manager hands vLLM's scheduler for a worker: the moves of one load or store job.

vLLM routes a ``LoadStoreSpec`` from the scheduler-side manager to the worker inside its connector metadata. kvbm's
carries the leader's `Move`s with the engine side given as *positions*: position ``p`` is sub-block ``p %
blocks_per_chunk`` of the ``p // blocks_per_chunk``-th offloaded key of the job. Only the worker knows the GPU block
ids (from vLLM's ``GPULoadStoreSpec``), so it maps positions to them. Plain data: pickles into the metadata.
"""
from __future__ import annotations

from vllm.v1.kv_offload.base import LoadStoreSpec

from kvbm.leader.plans import ENGINE_TIER, Move

__all__ = ["KvbmLoadStoreSpec"]


class KvbmLoadStoreSpec(LoadStoreSpec):
    """The moves of one job over ``num_positions`` engine sub-blocks, plus tier-to-tier ``cascades`` due now.

    ``missing`` lists positions of a load whose block left every tier before it was planned (the worker reports
    their GPU blocks as failed loads).
    """

    def __init__(self, moves: tuple[Move, ...], num_positions: int, cascades: tuple[Move, ...] = (),
                 missing: tuple[int, ...] = ()) -> None:
        self.moves = tuple(moves)
        self.num_positions = int(num_positions)
        self.cascades = tuple(cascades)
        self.missing = tuple(missing)

    @property
    def slot_ids(self) -> list[tuple[str, int]]:
        """(tier, slot) of every position the moves cover, in position order (for logs and tests)."""
        out: dict[int, tuple[str, int]] = {}
        for move in self.moves:
            engine_is_src = move.src_tier == ENGINE_TIER
            tier = move.dst_tier if engine_is_src else move.src_tier
            for pos, slot in zip(move.src_ids if engine_is_src else move.dst_ids,
                                 move.dst_ids if engine_is_src else move.src_ids):
                out[pos] = (tier, slot)
        return [out[p] for p in sorted(out)]

    def __repr__(self) -> str:
        return (f"KvbmLoadStoreSpec(moves={[m.move_id for m in self.moves]}, positions={self.num_positions}, "
                f"cascades={[m.move_id for m in self.cascades]}, missing={list(self.missing)})")
