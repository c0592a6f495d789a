"""The tiers a replica group shares (ranks holding identical KV, `ReplicaGroup`): the host tier in one pool
(`kvbm.worker.shared_pool`), the disk tier in one file (`kvbm.worker.shared_disk`).

The writer rank creates each shared tier, maps or opens it, then hands it out, so no reader sees memory the writer
does not use. A reader attaches to each tier it can; one it cannot attach to (the writer is on another host, the
name is taken, what it received does not fit) it allocates itself, logging why once: its own copy is always
correct, only larger. The tiers a reader attached to are the writer's to write (`SharedTiers.read_only`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvbm.kernels.medium import Medium
from kvbm.layouts import KVGeometry
from kvbm.tiers import TierSpec
from kvbm.worker.replica_group import ReplicaGroup, ShareError
from kvbm.worker.shared_disk import SharedDiskTier, attach_disk_tier
from kvbm.worker.shared_pool import SharedHostPool
from kvbm.worker.tier_memory import allocate_tier, close_tier

__all__ = ["SharedTiers", "share_tiers"]

log = logging.getLogger(__name__)


@dataclass
class SharedTiers:
    """The caches of the tiers this rank holds in its group's memory (tier name -> cache, owned by whoever takes
    them: the store), those of them it reads but does not write, and the writer's handles still handing tiers
    out (`close`)."""

    caches: dict[str, Any] = field(default_factory=dict)
    read_only: frozenset[str] = frozenset()
    servers: list[SharedHostPool | SharedDiskTier] = field(default_factory=list)

    def close(self) -> None:
        """Stop handing tiers out (idempotent); the caches stay valid."""
        servers, self.servers = self.servers, []
        for server in servers:
            server.close()


def share_tiers(tiers: Sequence[TierSpec], group: ReplicaGroup, geometry: KVGeometry,
                dtype: torch.dtype) -> SharedTiers:
    """The first host and the first disk tier of ``tiers`` (in blocks of ``geometry`` / ``dtype``; G2 and G3) in
    the group's memory: created and handed out by the writer, attached to by a reader where it can (one socket per
    medium: any further tier is each rank's own). Raises, holding nothing, where the writer cannot allocate a
    tier."""
    shared = SharedTiers()
    ways = {Medium.HOST: _host_writer if group.writer else _host_reader,
            Medium.DISK: _disk_writer if group.writer else _disk_reader}
    try:
        for spec in tiers:
            if (how := ways.pop(spec.medium, None)) is not None:
                _share(shared, spec, group, how, geometry, dtype)
    except BaseException:
        shared.close()
        for cache in shared.caches.values():
            close_tier(cache)
        raise
    return shared


def _share(shared: SharedTiers, spec: TierSpec, group: ReplicaGroup, how: _Share, geometry: KVGeometry,
           dtype: torch.dtype) -> None:
    """One tier shared ``how`` (a writer's or a reader's way), noted in ``shared``; a reader that cannot attach
    notes nothing (it allocates its own), a writer whose readers cannot reach it shares with none, each logged."""
    try:
        how(shared, spec, group, geometry, dtype)
    except ShareError as e:
        whose = "the other ranks store their own copy" if group.writer else "this rank stores its own copy"
        log.warning("kvbm: replica group %s: tier %s: %s; %s", group.name, spec.name, e, whose)
        return
    if not group.writer:
        shared.read_only |= {spec.name}
        log.info("kvbm: replica group %s: tier %s shared with the writer rank", group.name, spec.name)


_Share = Callable[[SharedTiers, TierSpec, ReplicaGroup, KVGeometry, torch.dtype], None]


def _host_writer(shared: SharedTiers, spec: TierSpec, group: ReplicaGroup, geometry: KVGeometry,
                 dtype: torch.dtype) -> None:
    pool = SharedHostPool.create(group, spec.num_blocks * geometry.block_bytes)
    try:
        shared.caches[spec.name] = allocate_tier(spec, geometry, dtype, shared_fd=pool.fd)
    except BaseException:
        pool.close()
        raise
    shared.servers.append(pool)
    pool.serve()


def _host_reader(shared: SharedTiers, spec: TierSpec, group: ReplicaGroup, geometry: KVGeometry,
                 dtype: torch.dtype) -> None:
    pool = SharedHostPool.attach(group, spec.num_blocks * geometry.block_bytes)
    try:
        shared.caches[spec.name] = allocate_tier(spec, geometry, dtype, shared_fd=pool.fd, first_touch=False)
    except Exception as e:  # noqa: BLE001 - this rank keeps its own pool, always correct
        raise ShareError(f"mapping the shared pool failed ({e!r})") from None
    finally:
        pool.close()


def _disk_writer(shared: SharedTiers, spec: TierSpec, group: ReplicaGroup, geometry: KVGeometry,
                 dtype: torch.dtype) -> None:
    tier = SharedDiskTier.create(group, spec, geometry, dtype)
    shared.caches[spec.name] = tier.cache
    shared.servers.append(tier)
    tier.serve()


def _disk_reader(shared: SharedTiers, spec: TierSpec, group: ReplicaGroup, geometry: KVGeometry,
                 dtype: torch.dtype) -> None:
    shared.caches[spec.name] = attach_disk_tier(group, spec, geometry, dtype)
