"""The disk tier ranks with identical KV share (`kvbm.worker.shared_disk`): one G3 file, written by the group's
writer rank alone and read by every rank, its descriptor and slot records handed over a unix socket; what does not
fit is refused, and a reader that cannot attach keeps a file of its own (`ConnectorWorker`). Ranks run as separate
processes where it matters (the file and records cross a process boundary)."""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from disk_faults import flip_byte

from kvbm.config import KvbmConfig
from kvbm.connectors.worker import ConnectorWorker
from kvbm.kernels.medium import Medium
from kvbm.layouts import KVGeometry, block_major
from kvbm.leader.plans import Move, MoveKind
from kvbm.tiers import TierSpec
from kvbm.worker.replica_group import ReplicaGroup, ShareError
from kvbm.worker.shared_disk import SharedDiskTier, attach_disk_tier

GEOMETRY = KVGeometry(num_layers=2, num_kv=1, block_size=4, num_heads=1, head_dim=24, itemsize=2)
ENGINE_SHAPE = (6, 2, 1, 4, 1, 24)  # blocks of GEOMETRY, block-major
READERS = 2


def group(writer: bool, name: str, timeout_s: float = 30.0, readers: int = 1) -> ReplicaGroup:
    return ReplicaGroup(name, writer=writer, num_readers=readers, timeout_s=timeout_s)


def tiers(directory: Path) -> list[TierSpec]:
    return [TierSpec("G2", Medium.HOST, 4), TierSpec("G3", Medium.DISK, 8, directory, use_o_direct=False)]


def poisoned_engine() -> torch.Tensor:
    return torch.full(ENGINE_SHAPE, float("nan"), dtype=torch.bfloat16)


def random_blocks(n: int, seed: int) -> torch.Tensor:
    """``n`` engine blocks of random bf16 values with no zero byte pattern."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, *ENGINE_SHAPE[1:]), generator=g) + 0.5).to(torch.bfloat16)


def run(worker: ConnectorWorker, moves: list[Move]) -> dict[int, dict[int, str]]:
    """Run ``moves`` to completion; their failed blocks by move id."""
    worker.start_cascades(moves)
    worker.store.wait_all()
    worker.poll()
    return {move_id: result.failed for move_id, result in worker.take_report().results.items()}


def inode(cache: Any) -> tuple[int, int]:
    st = os.fstat(cache.file.fileno())
    return st.st_dev, st.st_ino


def open_files_in(directory: Path) -> set[tuple[int, int]]:
    """The files this process holds open in ``directory`` (named or unnamed), as (device, inode)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{directory}/"):
                st = os.fstat(int(fd))
                found.add((st.st_dev, st.st_ino))
    return found


def _abstract_sockets(name: str) -> list[str]:
    return [line for line in Path("/proc/net/unix").read_text().splitlines() if name in line]


# --------------------------------------------------------------------------------------------------------------
# A reader rank in a process of its own
# --------------------------------------------------------------------------------------------------------------


def _reader_rank(conn: Any, name: str, directory: Path) -> None:
    """A reader rank: attach, say what it holds, then run the moves it is sent and answer with the failures and
    its engine cache's bytes, until ``None``."""
    try:
        engine = poisoned_engine()
        worker = ConnectorWorker(block_major(engine), tiers(directory), KvbmConfig(),
                                 replicas=group(False, name, readers=READERS), rank=1)
        g3 = worker.store.cache("G3")
        conn.send(("ok", {"read_only": set(worker.shared_read_only), "g3": inode(g3), "g3_read_only": g3.read_only,
                          "files": open_files_in(directory)}))
        while (moves := conn.recv()) is not None:
            worker.start_cascades(moves)
            ran = worker.store.num_running() + worker.store.num_queued()  # moves this rank runs itself
            failed = run(worker, [])
            conn.send(("ok", {"failed": failed, "ran": ran, "engine": engine.view(torch.int16).clone()}))
        worker.close()
        conn.send(("ok", None))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))


class ReaderProcess:
    def __init__(self, name: str, directory: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_reader_rank, args=(child, name, directory), daemon=True)
        self.process.start()
        child.close()

    def answer(self, timeout: float = 120.0) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError("the reader rank did not answer")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"the reader rank failed:\n{value}")
        return value

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(None)
            self.answer(30.0)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def test_rank_processes_read_the_one_file_the_writer_alone_writes(tmp_path: Path) -> None:
    """Two reader rank processes attach to the writer's G3: one file (the writer's inode, read-only there, no
    other file held); moves into G2 and G3 run on the writer only (the readers report them at once, unfailed);
    every rank loads the writer's blocks from G3 byte-exact; a corrupted slot fails its block on every rank."""
    name = uuid.uuid4().hex
    engine = poisoned_engine()
    values = random_blocks(2, seed=3)
    engine[[1, 4]] = values
    readers = [ReaderProcess(name, tmp_path) for _ in range(READERS)]
    writer = None
    try:
        writer = ConnectorWorker(block_major(engine), tiers(tmp_path), KvbmConfig(),
                                 replicas=group(True, name, readers=READERS))
        held = [r.answer() for r in readers]
        g3 = writer.store.cache("G3")
        assert not writer.shared_read_only and not g3.read_only
        for h in held:
            assert h["read_only"] == {"G2", "G3"} and h["g3_read_only"] and h["g3"] == inode(g3)
            assert h["files"] == {inode(g3)}  # no file of its own
        stores = [Move(1, MoveKind.STORE, "G1", "G2", (1, 4), (2, 0), (71, 72)),
                  Move(2, MoveKind.CASCADE, "G2", "G3", (2, 0), (5, 1), (71, 72))]
        loads = [Move(3, MoveKind.LOAD, "G3", "G1", (5, 1), (3, 5), (71, 72))]
        for batch in (stores[:1], stores[1:]):
            assert run(writer, batch) == {m.move_id: {} for m in batch}
            for r in readers:
                r.conn.send(batch)
            for r in readers:
                answer = r.answer()
                assert answer["ran"] == 0 and answer["failed"] == {m.move_id: {} for m in batch}
        engine[[3, 5]] = float("nan")
        assert run(writer, loads) == {3: {}}
        assert torch.equal(engine[[3, 5]].view(torch.int16), values.view(torch.int16))
        for r in readers:
            r.conn.send(loads)
        for r in readers:
            answer = r.answer()
            assert answer["ran"] == 1 and answer["failed"] == {3: {}}
            assert torch.equal(answer["engine"][[3, 5]], values.view(torch.int16))
            assert answer["engine"][[0, 1, 2, 4]].view(torch.bfloat16).isnan().all()  # nothing else written
        flip_byte(g3.file.path, 1 * g3.slot_bytes + 17)  # slot 1: the second block
        again = [Move(4, MoveKind.LOAD, "G3", "G1", (5, 1), (0, 2), (71, 72))]
        failed = run(writer, again)[4]
        assert list(failed) == [1] and "checksum mismatch" in failed[1]
        assert torch.equal(engine[[0]].view(torch.int16), values[[0]].view(torch.int16))
        for r in readers:
            r.conn.send(again)
        for r in readers:
            answer = r.answer()
            assert list(answer["failed"][4]) == [1] and "checksum mismatch" in answer["failed"][4][1]
            assert torch.equal(answer["engine"][[0]], values[[0]].view(torch.int16))
    finally:
        for r in readers:
            r.close()
        if writer is not None:
            writer.close()
    assert os.listdir(tmp_path) == []
    assert not _abstract_sockets(f"kvbm-g3-{name}") and not _abstract_sockets(f"kvbm-pool-{name}")


# --------------------------------------------------------------------------------------------------------------
# In one process
# --------------------------------------------------------------------------------------------------------------


def test_a_reader_without_a_writer_keeps_its_own_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No writer answers: the reader allocates and writes its own G3 (logged once), and its bytes round-trip."""
    engine = poisoned_engine()
    with caplog.at_level(logging.WARNING):
        worker = ConnectorWorker(block_major(engine), tiers(tmp_path), KvbmConfig(),
                                 replicas=group(False, uuid.uuid4().hex, 0.2))
    warned = [r.getMessage() for r in caplog.records if "tier G3" in r.getMessage()]
    assert len(warned) == 1 and "this rank stores its own copy" in warned[0]
    assert not worker.shared_read_only and not worker.store.cache("G3").read_only
    values = random_blocks(2, seed=4)
    engine[[0, 2]] = values
    assert run(worker, [Move(1, MoveKind.STORE, "G1", "G2", (0, 2), (1, 3), (5, 6)),
                        Move(2, MoveKind.CASCADE, "G2", "G3", (1, 3), (7, 0), (5, 6))]) == {1: {}, 2: {}}
    engine[:] = float("nan")
    assert run(worker, [Move(3, MoveKind.LOAD, "G3", "G1", (7, 0), (4, 1), (5, 6))]) == {3: {}}
    assert torch.equal(engine[[4, 1]].view(torch.int16), values.view(torch.int16))
    worker.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("taken", ["pool", "g3"])
def test_a_reader_shares_the_tiers_it_can_attach_to(tmp_path: Path, taken: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """One shared tier's name is taken: the writer shares the other alone, the reader keeps its own copy of the
    first (each logged) and runs the moves into it itself, from or into the shared tier; every rank loads every
    byte as stored."""
    name = uuid.uuid4().hex
    own = {"pool": "G2", "g3": "G3"}[taken]
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(group(True, name).address(taken))
    engines = [poisoned_engine() for _ in range(2)]
    values = random_blocks(1, seed=5)
    for engine in engines:  # identical KV on every rank
        engine[[2]] = values
    with caplog.at_level(logging.WARNING):
        writer = ConnectorWorker(block_major(engines[0]), tiers(tmp_path), KvbmConfig(), replicas=group(True, name))
        reader = ConnectorWorker(block_major(engines[1]), tiers(tmp_path), KvbmConfig(),
                                 replicas=group(False, name, timeout_s=0.5))
    squatter.close()
    assert reader.shared_read_only == {"G2", "G3"} - {own}
    assert [r.getMessage().split(": ")[2] for r in caplog.records] == [f"tier {own}"] * 2  # writer, reader
    for move in (Move(1, MoveKind.STORE, "G1", "G2", (2,), (1,), (9,)),
                 Move(2, MoveKind.CASCADE, "G2", "G3", (1,), (6,), (9,))):
        assert run(writer, [move]) == {move.move_id: {}}
        reader.start_cascades([move])
        assert reader.store.num_running() + reader.store.num_queued() == (move.dst_tier == own)
        assert run(reader, []) == {move.move_id: {}}
    loads = [Move(3, MoveKind.LOAD, "G3", "G1", (6,), (5,), (9,)), Move(4, MoveKind.LOAD, "G2", "G1", (1,), (4,), (9,))]
    for worker, engine in zip((writer, reader), engines):
        assert run(worker, loads) == {3: {}, 4: {}}
        assert torch.equal(engine[[5, 4]].view(torch.int16), values.expand(2, *values.shape[1:]).view(torch.int16))
    reader.close()
    writer.close()
    assert os.listdir(tmp_path) == []


def test_attach_refuses_a_tier_that_does_not_fit(tmp_path: Path) -> None:
    name = uuid.uuid4().hex
    spec = TierSpec("G3", Medium.DISK, 8, tmp_path, use_o_direct=False)
    other = KVGeometry(num_layers=2, num_kv=1, block_size=4, num_heads=1, head_dim=20, itemsize=2)  # same slots
    cases = [(TierSpec("G3", Medium.DISK, 16, tmp_path), GEOMETRY, "8 slots, this rank needs 16"),
             (spec, KVGeometry(4, 2, 16, 2, 64, 2), "slots of 4096 bytes, this rank's need 32768"),
             (spec, other, "another layout")]
    for wanted, geometry, why in cases:
        tier = SharedDiskTier.create(group(True, name), spec, GEOMETRY, torch.bfloat16)
        tier.serve()
        with pytest.raises(ShareError, match=why):
            attach_disk_tier(group(False, name), wanted, geometry, torch.bfloat16)
        tier.close()
        tier.cache.close()
    with pytest.raises(ShareError, match="no writer rank answered .* within 0 s"):
        attach_disk_tier(group(False, uuid.uuid4().hex, timeout_s=0.2), spec, GEOMETRY, torch.bfloat16)
    assert os.listdir(tmp_path) == []


def test_only_the_first_host_and_disk_tiers_are_shared(tmp_path: Path) -> None:
    """A further host tier (between G2 and G3) is each rank's own: the reader's stays untouched by the writer's
    stores into its own."""
    name = uuid.uuid4().hex
    specs = [TierSpec("G2", Medium.HOST, 4), TierSpec("G2b", Medium.HOST, 4),
             TierSpec("G3", Medium.DISK, 8, tmp_path, use_o_direct=False)]
    engines = [poisoned_engine() for _ in range(2)]
    engines[0][[1]] = random_blocks(1, seed=6)
    writer = ConnectorWorker(block_major(engines[0]), specs, KvbmConfig(), replicas=group(True, name))
    reader = ConnectorWorker(block_major(engines[1]), specs, KvbmConfig(), replicas=group(False, name))
    assert reader.shared_read_only == {"G2", "G3"}
    assert run(writer, [Move(1, MoveKind.STORE, "G1", "G2b", (1,), (0,), (3,))]) == {1: {}}
    assert torch.equal(writer.store.cache("G2b").tensors[0][0].view(torch.int16), engines[0][1].view(torch.int16))
    assert not reader.store.cache("G2b").tensors[0].view(torch.int16).any()  # zeroed, its own
    reader.close()
    writer.close()
