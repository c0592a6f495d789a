"""The leader (scheduler side): the block index over the offload tiers, and plans as plain data.

Nothing here touches tensors or CUDA (`tests/test_leader_imports.py` checks that importing it loads neither torch
nor the transfer library), so it runs wherever the engine schedules, and one leader serves any number of workers.
"""
from kvbm.leader.index import AdmissionPolicy, BlockIndex, LoadPlan, Match, StorePlan, TierConfig
from kvbm.leader.plans import ENGINE_TIER, Move, MoveKind, MoveResult, direction

__all__ = ["AdmissionPolicy", "BlockIndex", "ENGINE_TIER", "LoadPlan", "Match", "Move", "MoveKind", "MoveResult",
           "StorePlan", "TierConfig", "direction"]
