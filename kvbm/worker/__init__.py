"""The worker (one per rank): the tiers' memory (`tier_memory`) and the store that executes the leader's moves
through the transfer library and reports per block (`store`)."""
from kvbm.worker.store import BlockStore

__all__ = ["BlockStore"]
