"""Per-step messages between the vLLM connector's sides as vLLM's metadata types: the step's `StepPlan` goes to
the workers (``SchedulerOutput.kv_connector_metadata``), their `WorkerReport`s come back
(``KVConnectorOutput.kv_connector_worker_meta``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from kvbm.connectors.messages import StepPlan, WorkerReport

__all__ = ["DynamoConnectorMetadata", "DynamoHandshakeMetadata", "DynamoWorkerMetadata"]


@dataclass(slots=True)
class DynamoHandshakeMetadata(KVConnectorHandshakeMetadata):
    """A worker rank whose tiers are allocated (it registers with the scheduler side), and its NIXL endpoint
    (`kvbm.worker.g4.G4Endpoint.endpoint`) when it exports its G2; gathered by vLLM once at start."""

    rank: int
    endpoint: bytes | None = None


@dataclass(slots=True)
class DynamoConnectorMetadata(KVConnectorMetadata):
    """One scheduler step's plan for the workers."""

    plan: StepPlan = field(default_factory=StepPlan)


@dataclass(slots=True)
class DynamoWorkerMetadata(KVConnectorWorkerMetadata):
    """What a worker reports since its last report (move results, timed steps, its registration)."""

    report: WorkerReport = field(default_factory=WorkerReport)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> DynamoWorkerMetadata:
        """Merge another worker's (or another step's) report: results of one move on several ranks merge."""
        if not isinstance(other, DynamoWorkerMetadata):
            raise TypeError(f"can only aggregate DynamoWorkerMetadata, got {type(other).__name__}")
        return DynamoWorkerMetadata(self.report.merged(other.report))
