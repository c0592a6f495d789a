"""BlockManager under faults: disk full, truncated / deleted file, short read, failing copies.

For every fault: the affected blocks are reported FAILED (never OK, never counted as moved), no wrong bytes reach
G1 (poisoned destination blocks stay poisoned), the pools' accounting stays intact (``check_invariants``) and later
operations work. ENOSPC comes from a real 1 MiB tmpfs (root only, skipped otherwise); truncation and deletion act
on the real disk file; a failing copy is injected by replacing the manager's copies (``copy_blocks``, and the
transfer engine's calls on a GPU) with one that raises before writing anything.
"""
from __future__ import annotations

import os

import pytest

from disk_faults import fill_filesystem, rng, tiny_fs  # noqa: F401  (rng and tiny_fs are fixtures)

import kvbm.kernels.disk_file as disk_file_module
import kvbm.kernels.paths as paths
from kvbm.manager import BlockManager, BlockResult
from manager_testkit import GEOM, GEOM_PADDED, config, make_gpu, patch_copies, poison_block, read_block

OK, FAILED = BlockResult.OK, BlockResult.FAILED


def raising_copy(*args, **kwargs):
    raise RuntimeError("injected copy failure")


def disk_file(mgr: BlockManager) -> str:
    return mgr.store.cache("G3").file.path


def offload_all(mgr: BlockManager, hashes: list[int], ids) -> None:
    ticket = mgr.offload(hashes, list(ids))
    mgr.wait()
    assert ticket.results == [OK] * len(hashes)


def check_onboard(mgr, gpu, hashes, dst, want, expect_ok):
    """Onboard into poisoned blocks ``dst``; OK blocks must equal ``want``, failed ones stay poisoned."""
    poison = {b: poison_block(gpu, b) for b in dst}
    ticket = mgr.onboard(hashes, dst)
    mgr.wait(ticket)
    assert [r is OK for r in ticket.results] == expect_ok, ticket.reasons
    for i, b in enumerate(dst):
        assert read_block(gpu, b) == (want[i] if expect_ok[i] else poison[b]), f"block {i}"
    mgr.check_invariants()
    return ticket


def test_disk_full_fails_direct_disk_offload_then_recovers(tiny_fs, rng):
    gpu = make_gpu(32, rng)
    sb = GEOM.block_bytes
    with BlockManager(gpu, config(tiny_fs, disk=32, max_transfer_batch_size=4)) as mgr:
        hashes = mgr.sequence_hashes(rng.integers(0, 50_000, 16 * GEOM.block_size).tolist())
        want = [read_block(gpu, b) for b in range(16)]
        offload_all(mgr, hashes[:8], range(8))
        # the space of slots 8.. is released and taken by another file: writing them now needs space that is gone
        os.truncate(disk_file(mgr), 8 * sb)
        filler = fill_filesystem(tiny_fs)
        ticket = mgr.offload(hashes[8:], range(8, 16))
        mgr.wait()
        assert ticket.results == [FAILED] * 8
        assert all("No space" in r or "ENOSPC" in r for r in ticket.reasons.values()), ticket.reasons
        assert mgr.metrics.value("kvbm_transfer_failed_blocks", "g1_to_g3") == 8
        assert mgr.metrics.value("kvbm_offload_blocks_d2d") == 8
        assert not any(mgr.index.pool("G3").contains(h) for h in hashes[8:])
        mgr.check_invariants()
        check_onboard(mgr, gpu, hashes[:8], range(16, 24), want[:8], [True] * 8)
        # once space is back, the same blocks store and load byte-exact
        os.unlink(filler)
        offload_all(mgr, hashes[8:], range(8, 16))
        check_onboard(mgr, gpu, hashes[8:], range(16, 24), want[8:], [True] * 8)


def test_disk_full_keeps_cascaded_blocks_in_host_tier_only(tiny_fs, rng):
    gpu = make_gpu(32, rng)
    cfg = config(tiny_fs, host=16, disk=32, disable_disk_offload_filter=True)
    with BlockManager(gpu, cfg) as mgr:
        hashes = mgr.sequence_hashes(rng.integers(0, 50_000, 8 * GEOM.block_size).tolist())
        want = [read_block(gpu, b) for b in range(8)]
        os.truncate(disk_file(mgr), 0)
        filler = fill_filesystem(tiny_fs)
        offload_all(mgr, hashes, range(8))
        assert mgr.metrics.value("kvbm_transfer_failed_blocks", "g2_to_g3") == 8
        assert mgr.metrics.value("kvbm_offload_blocks_h2d") == 0
        assert not any(mgr.index.pool("G3").contains(h) for h in hashes)
        check_onboard(mgr, gpu, hashes, range(16, 24), want, [True] * 8)  # G2 still serves them
        os.unlink(filler)
        more = mgr.sequence_hashes(rng.integers(0, 50_000, 4 * GEOM.block_size).tolist())
        offload_all(mgr, more, range(8, 12))
        assert all(mgr.index.pool("G3").contains(h) for h in more)
        assert mgr.metrics.value("kvbm_offload_blocks_h2d") == 4


@pytest.mark.parametrize("fault", ["truncated", "short_read", "deleted"])
def test_broken_disk_file_fails_loads_without_touching_g1(tmp_path, rng, monkeypatch, fault):
    gpu = make_gpu(40, rng)
    sb = GEOM.block_bytes
    cfg = config(tmp_path, host=2, disk=16, disable_disk_offload_filter=True, max_transfer_batch_size=4)
    if fault == "deleted":  # only a named file can be deleted by name
        monkeypatch.setattr(disk_file_module, "O_TMPFILE", 0)
    with BlockManager(gpu, cfg) as mgr:
        hashes = mgr.sequence_hashes(rng.integers(0, 50_000, 8 * GEOM.block_size).tolist())
        want = [read_block(gpu, b) for b in range(8)]
        offload_all(mgr, hashes, range(8))
        in_g2 = [mgr.index.pool("G2").contains(h) for h in hashes]
        assert in_g2 == [False] * 6 + [True] * 2
        g3_slot = {h: mgr.index.pool("G3").lookup(h) for h in hashes}
        if fault == "truncated":
            os.truncate(disk_file(mgr), 3 * sb + 100)
            lost = {h for h in hashes[:6] if g3_slot[h] >= 3}
        elif fault == "short_read":
            real_preadv = os.preadv
            shrunk = []

            def preadv_after_truncation(fd, bufs, offset):
                if not shrunk:  # the file shrinks while the batch is being read
                    os.truncate(disk_file(mgr), 2 * sb)
                    shrunk.append(True)
                return real_preadv(fd, bufs, offset)

            monkeypatch.setattr(os, "preadv", preadv_after_truncation)
            lost = {h for h in hashes[:6] if g3_slot[h] >= 2}
        else:  # a named file (no O_TMPFILE) deleted underneath
            os.unlink(disk_file(mgr))
            lost = set(hashes[:6])
        assert lost
        expect_ok = [h not in lost for h in hashes]
        ticket = check_onboard(mgr, gpu, hashes, list(range(20, 28)), want, expect_ok)
        assert all("disk read failed" in ticket.reasons[i] for i, ok in enumerate(expect_ok) if not ok)
        assert mgr.metrics.value("kvbm_transfer_failed_blocks", "g3_to_g1") == len(lost)
        assert mgr.metrics.value("kvbm_onboard_blocks_d2d") == 6 - len(lost)
        # blocks whose bytes are gone are dropped from G3: lookup no longer offers them
        assert not any(mgr.index.pool("G3").contains(h) for h in lost)
        monkeypatch.undo()
        # later operations work: G2 hits load; new blocks go through G3 again (a deleted file was replaced)
        check_onboard(mgr, gpu, hashes[6:], [30, 31], want[6:], [True, True])
        more = mgr.sequence_hashes(rng.integers(0, 50_000, 6 * GEOM.block_size).tolist())
        more_want = [read_block(gpu, b) for b in range(8, 14)]
        offload_all(mgr, more, range(8, 14))
        check_onboard(mgr, gpu, more, range(32, 38), more_want, [True] * 6)
        assert mgr.metrics.value("kvbm_disk_file_renewals") == (1 if fault == "deleted" else 0)
    assert list(tmp_path.glob("kvbm-g3-*")) == []  # close removes the file (or finds it already gone)


@pytest.mark.parametrize("geometry", [GEOM, GEOM_PADDED], ids=["aligned", "padded"])
def test_copy_error_fails_offload_and_onboard_then_recovers(tmp_path, rng, monkeypatch, geometry):
    gpu = make_gpu(32, rng, geometry)
    cfg = config(tmp_path, host=4, disk=16, disable_disk_offload_filter=True, max_transfer_batch_size=2)
    with BlockManager(gpu, cfg) as mgr:
        toks = rng.integers(0, 50_000, 12 * geometry.block_size).tolist()
        hashes = mgr.sequence_hashes(toks)
        want = [read_block(gpu, b) for b in range(12)]
        # G1 -> G2 fails: blocks FAILED, their pending slots freed
        patch_copies(monkeypatch, mgr, lambda real: raising_copy)
        ticket = mgr.offload(hashes[:3], range(3))
        mgr.wait()
        assert ticket.results == [FAILED] * 3 and "injected" in ticket.reasons[0]
        assert mgr.index.pool("G2").num_free() == 4 and mgr.metrics.value("kvbm_offload_blocks_d2h") == 0
        assert mgr.metrics.value("kvbm_transfer_failed_blocks", "g1_to_g2") == 3
        mgr.check_invariants()
        monkeypatch.undo()
        offload_all(mgr, hashes[:8], range(8))  # blocks 0..3 now only in G3, 4..7 in G2 and G3
        # G2 -> G1 and G3 -> G1 copies fail: every block FAILED, G1 untouched, holds released
        patch_copies(monkeypatch, mgr, lambda real: raising_copy)
        check_onboard(mgr, gpu, hashes[:8], range(16, 24), want, [False] * 8)
        assert mgr.metrics.value("kvbm_transfer_failed_blocks", "g2_to_g1") == 4
        assert mgr.metrics.value("kvbm_transfer_failed_blocks", "g3_to_g1") == 4
        assert mgr.metrics.value("kvbm_onboard_blocks_h2d") == mgr.metrics.value("kvbm_onboard_blocks_d2d") == 0
        assert all(mgr.index.pool("G3").contains(h) for h in hashes[:8])  # a failed copy does not make G3 bytes bad
        monkeypatch.undo()
        check_onboard(mgr, gpu, hashes[:8], range(16, 24), want, [True] * 8)
        if geometry is GEOM_PADDED:
            # the padded G2 -> G3 path copies into the bounce buffer on the I/O threads: a failure there keeps
            # blocks out of G3
            monkeypatch.setattr(paths.host_disk, "block_copier", lambda src, dst: raising_copy)
            offload_all(mgr, hashes[8:10], range(8, 10))
            assert not any(mgr.index.pool("G3").contains(h) for h in hashes[8:10])
            assert mgr.metrics.value("kvbm_transfer_failed_blocks", "g2_to_g3") == 2
            mgr.check_invariants()


def test_copy_error_in_disk_only_offload_frees_disk_slots(tmp_path, rng, monkeypatch):
    gpu = make_gpu(16, rng)
    with BlockManager(gpu, config(tmp_path, disk=8, max_transfer_batch_size=2)) as mgr:
        hashes = mgr.sequence_hashes(rng.integers(0, 50_000, 4 * GEOM.block_size).tolist())
        want = [read_block(gpu, b) for b in range(4)]
        patch_copies(monkeypatch, mgr, lambda real: raising_copy)
        ticket = mgr.offload(hashes, range(4))
        mgr.wait()
        assert ticket.results == [FAILED] * 4
        assert mgr.index.pool("G3").num_free() == 8 and mgr.metrics.value("kvbm_transfer_failed_blocks", "g1_to_g3") == 4
        mgr.check_invariants()
        monkeypatch.undo()
        offload_all(mgr, hashes, range(4))
        check_onboard(mgr, gpu, hashes, range(8, 12), want, [True] * 4)


def test_a_deleted_disk_file_is_replaced_and_its_blocks_recomputed(tmp_path, rng, monkeypatch, caplog):
    """The G3 file deleted underneath: its blocks fail to load and are dropped (never served), a WARNING and the
    renewals metric say so, and the tier goes on in a new file."""
    monkeypatch.setattr(disk_file_module, "O_TMPFILE", 0)  # a named file, which can be deleted by name
    gpu = make_gpu(24, rng)
    with BlockManager(gpu, config(tmp_path, disk=16, max_transfer_batch_size=4)) as mgr:
        hashes = mgr.sequence_hashes(rng.integers(0, 50_000, 4 * GEOM.block_size).tolist())
        want = [read_block(gpu, b) for b in range(4)]
        offload_all(mgr, hashes, range(4))
        os.unlink(disk_file(mgr))
        with caplog.at_level("WARNING"):
            check_onboard(mgr, gpu, hashes, range(8, 12), want, [False] * 4)
        assert "was deleted" in caplog.text and mgr.metrics.value("kvbm_disk_file_renewals") == 1
        assert mgr.lookup(hashes, num_tokens=99).num_blocks == 0  # the lost blocks were dropped
        assert os.path.exists(disk_file(mgr))  # the new file
        offload_all(mgr, hashes, range(4))  # the engine recomputed them: stored again, in the new file
        check_onboard(mgr, gpu, hashes, range(12, 16), want, [True] * 4)
    assert list(tmp_path.glob("kvbm-g3-*")) == []
