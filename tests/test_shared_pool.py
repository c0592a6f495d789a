"""The host pool ranks with identical KV share (`kvbm.worker.shared_pool`): handed over a unix socket as a sealed
memfd, refused when it does not fit, and a reader that cannot attach keeps its own pool (`ConnectorWorker`)."""
from __future__ import annotations

import logging
import os
import uuid

import numpy as np
import pytest
import torch

from kvbm.config import KvbmConfig
from kvbm.connectors.leader import RankLayout
from kvbm.connectors.worker import ConnectorWorker, replica_group
from kvbm.kernels.medium import Medium
from kvbm.layouts import KVGeometry, block_major
from kvbm.leader.plans import Move, MoveKind
from kvbm.tiers import TierSpec
from kvbm.worker.replica_group import ReplicaGroup, ShareError
from kvbm.worker.shared_pool import SharedHostPool
from kvbm.worker.tier_memory import allocate_tier, close_tier

GEOMETRY = KVGeometry(num_layers=2, num_kv=1, block_size=4, num_heads=1, head_dim=24, itemsize=2)


def group(writer: bool, name: str, timeout_s: float = 5.0) -> ReplicaGroup:
    return ReplicaGroup(name, writer=writer, num_readers=1, timeout_s=timeout_s)


def test_reader_maps_the_writers_bytes() -> None:
    """Bytes the writer puts in its mapping are the reader's, and the reverse; one memfd, sized once."""
    name, tier = uuid.uuid4().hex, TierSpec("G2", Medium.HOST, 8)
    nbytes = 8 * GEOMETRY.block_bytes
    writer = SharedHostPool.create(group(True, name), nbytes)
    w_cache = allocate_tier(tier, GEOMETRY, torch.bfloat16, shared_fd=writer.fd)
    writer.serve()
    reader = SharedHostPool.attach(group(False, name), nbytes)
    assert os.fstat(reader.fd).st_ino == os.fstat(writer.fd).st_ino
    assert os.fstat(reader.fd).st_size == -(-nbytes // 4096) * 4096
    r_cache = allocate_tier(tier, GEOMETRY, torch.bfloat16, shared_fd=reader.fd, first_touch=False)
    reader.close()
    writer.close()
    assert writer.served == 1
    data = torch.from_numpy(np.random.default_rng(7).standard_normal(w_cache.tensors[0].numel(), np.float32))
    w_cache.tensors[0].view(-1).copy_(data.to(torch.bfloat16))
    assert torch.equal(r_cache.tensors[0].view(torch.int16), w_cache.tensors[0].view(torch.int16))
    r_cache.tensors[0].view(-1)[5] = 3.0
    assert w_cache.tensors[0].view(-1)[5].item() == 3.0
    close_tier(r_cache)
    close_tier(w_cache)


def test_a_pool_of_another_size_is_refused() -> None:
    name = uuid.uuid4().hex
    writer = SharedHostPool.create(group(True, name), 4096)
    writer.serve()
    with pytest.raises(ShareError, match="pool of 4096 bytes, this rank needs 8192"):
        SharedHostPool.attach(group(False, name), 8192)
    writer.close()


def test_a_taken_name_and_a_missing_writer_are_reported() -> None:
    name = uuid.uuid4().hex
    first, second = (SharedHostPool.create(group(True, name), 4096) for _ in range(2))
    first.serve()
    with pytest.raises(ShareError, match="cannot listen"):
        second.serve()
    first.close()
    second.close()
    with pytest.raises(ShareError, match="no writer rank answered .* within 0 s"):
        SharedHostPool.attach(group(False, uuid.uuid4().hex, timeout_s=0.2), 4096)
    with pytest.raises(ValueError, match="num_readers"):
        ReplicaGroup("x", writer=True, num_readers=-1)


def test_replica_groups_follow_the_layout() -> None:
    shared = RankLayout(4, 1024, (2, 1), replicas=4)
    assert shared.stored_block_bytes == 3 * 1024 and shared.total_block_bytes == 4 * 3 * 1024
    groups = [replica_group(shared, r, "e") for r in range(8)]
    assert [g.writer for g in groups] == [True, False, False, False] * 2
    assert {g.name for g in groups[:4]} == {"e-stage0"} and {g.name for g in groups[4:]} == {"e-stage1"}
    assert replica_group(RankLayout(4, 1024, (3,), replicas=2), 0, "e") is None  # partial replicas: per rank
    assert replica_group(RankLayout(1, 1024, (3,)), 0, "e") is None


def test_a_reader_without_a_writer_stores_its_own_copy(caplog: pytest.LogCaptureFixture) -> None:
    """No writer answers: the reader keeps its own pool, runs stores itself, and its bytes round-trip."""
    engine = torch.full((6, 2, 1, 4, 1, 24), float("nan"), dtype=torch.bfloat16)
    cache = block_major(engine)
    tiers = [TierSpec("G2", Medium.HOST, 4)]
    with caplog.at_level(logging.WARNING):
        worker = ConnectorWorker(cache, tiers, KvbmConfig(), replicas=group(False, uuid.uuid4().hex, 0.2))
    assert "this rank stores its own copy" in caplog.text and not worker.shared_read_only
    values = torch.randn(2, 2, 1, 4, 1, 24).to(torch.bfloat16)
    engine[[1, 4]] = values
    worker.start_cascades([Move(1, MoveKind.STORE, "G1", "G2", (1, 4), (2, 0), (11, 12))])
    worker.store.wait_all()
    worker.poll()
    engine[[1, 4]] = float("nan")
    worker.start_cascades([Move(2, MoveKind.LOAD, "G2", "G1", (2, 0), (3, 5), (11, 12))])
    worker.store.wait_all()
    worker.poll()
    report = worker.take_report()
    assert not report.results[1].failed and not report.results[2].failed
    assert torch.equal(engine[[3, 5]].view(torch.int16), values.view(torch.int16))
    worker.close()


def test_a_reader_reports_the_writers_stores_without_running_them() -> None:
    """An attached reader runs no move into the shared pool (reported done, no failure) and loads from it."""
    name = uuid.uuid4().hex
    engines = [torch.full((6, 2, 1, 4, 1, 24), float("nan"), dtype=torch.bfloat16) for _ in range(2)]
    tiers = [TierSpec("G2", Medium.HOST, 4)]
    writer = ConnectorWorker(block_major(engines[0]), tiers, KvbmConfig(), replicas=group(True, name))
    reader = ConnectorWorker(block_major(engines[1]), tiers, KvbmConfig(), replicas=group(False, name))
    assert reader.shared_read_only == {"G2"} and not writer.shared_read_only
    values = torch.randn(1, 2, 1, 4, 1, 24).to(torch.bfloat16)
    engines[0][[2]] = values
    store = Move(1, MoveKind.STORE, "G1", "G2", (2,), (3,), (7,))
    for worker in (writer, reader):
        worker.start_cascades([store])
    assert reader.store.num_running() == 0 and reader.take_report().results[1].failed == {}
    writer.store.wait_all()
    writer.poll()
    assert not writer.take_report().results[1].failed
    reader.start_cascades([Move(2, MoveKind.LOAD, "G2", "G1", (3,), (0,), (7,))])
    reader.store.wait_all()
    reader.poll()
    assert not reader.take_report().results[2].failed
    assert torch.equal(engines[1][[0]].view(torch.int16), values.view(torch.int16))
    reader.close()
    writer.close()
