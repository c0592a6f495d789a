"""Per-step messages between the two sides of the vLLM connector.

``DynamoConnectorMetadata`` goes from the scheduler side to the worker side with every scheduler step (vLLM
attaches it to ``SchedulerOutput.kv_connector_metadata``); ``DynamoWorkerMetadata`` comes back with the model
runner output (``KVConnectorOutput.kv_connector_worker_meta``). Both hold only request ids, sequence hashes and
GPU block ids: what the worker needs to call the block manager, nothing it could look up itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

__all__ = ["BlockJob", "DynamoConnectorMetadata", "DynamoWorkerMetadata"]


@dataclass(slots=True)
class BlockJob:
    """Blocks of one request to move: block ``i`` has sequence hash ``seq_hashes[i]`` and lives (or will live) in
    GPU block ``gpu_block_ids[i]``."""

    request_id: str
    seq_hashes: list[int]
    gpu_block_ids: list[int]

    def __post_init__(self) -> None:
        if len(self.seq_hashes) != len(self.gpu_block_ids):
            raise ValueError(f"request {self.request_id}: {len(self.seq_hashes)} hashes for "
                             f"{len(self.gpu_block_ids)} GPU blocks")


@dataclass(slots=True)
class DynamoConnectorMetadata(KVConnectorMetadata):
    """One scheduler step's work for the worker side.

    ``loads``: onboard into the request's freshly allocated blocks (asynchronous: the request waits in
    WAITING_FOR_REMOTE_KVS until the worker reports it in ``finished_recving``). ``saves``: offload newly
    completed full blocks after this step's forward. ``preempted``: requests whose blocks vLLM freed; their offloads
    still in flight must finish before the blocks are reused. ``held``: finished requests whose blocks the scheduler
    keeps until the worker reports them in ``finished_sending``.
    """

    loads: list[BlockJob] = field(default_factory=list)
    saves: list[BlockJob] = field(default_factory=list)
    preempted: frozenset[str] = frozenset()
    held: list[str] = field(default_factory=list)


@dataclass(slots=True)
class DynamoWorkerMetadata(KVConnectorWorkerMetadata):
    """Save jobs the worker completed since its last report, per request (the scheduler side counts the jobs it
    still has in flight, to free a finished request's blocks at once when none are)."""

    saves_done: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> DynamoWorkerMetadata:
        """Merge another report (one worker per engine: counts of different steps add up)."""
        if not isinstance(other, DynamoWorkerMetadata):
            raise TypeError(f"can only aggregate DynamoWorkerMetadata, got {type(other).__name__}")
        merged = dict(self.saves_done)
        for request_id, count in other.saves_done.items():
            merged[request_id] = merged.get(request_id, 0) + count
        return DynamoWorkerMetadata(merged)
