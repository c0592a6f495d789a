"""A further tier needs no change in the index, the store or the connectors: a second host pool ("G2b", standing
in for a remote peer's pool) between G2 and G3, given to the manager as one more `TierSpec`."""
from __future__ import annotations

import numpy as np

from kvbm.kernels.medium import Medium
from kvbm.manager import BlockManager, BlockResult
from kvbm.policies.admission import DiskAdmissionFilter
from kvbm.tiers import TierSpec
from manager_testkit import GEOM, config, make_gpu, poison_block, read_block


def test_blocks_flow_through_a_toy_tier_and_load_back_byte_exact(tmp_path):
    rng = np.random.default_rng(21)
    gpu = make_gpu(32, rng)
    tiers = [TierSpec("G2", Medium.HOST, 4), TierSpec("G2b", Medium.HOST, 6),
             TierSpec("G3", Medium.DISK, 16, tmp_path, use_o_direct=False)]
    with BlockManager(gpu, config(max_transfer_batch_size=3), tiers=tiers,
                      disk_filter=DiskAdmissionFilter(enabled=False)) as mgr:
        assert mgr.index.tier_names == ["G2", "G2b", "G3"]
        hashes = mgr.sequence_hashes(rng.integers(0, 50_000, 12 * GEOM.block_size).tolist())
        want = [read_block(gpu, b) for b in range(12)]
        for start in range(0, 12, 3):  # four waves: the oldest blocks are pushed down G2 -> G2b -> G3
            mgr.offload(hashes[start:start + 3], range(start, start + 3))
            mgr.wait()
        pools = {name: mgr.index.pool(name) for name in mgr.index.tier_names}
        where = [[name for name, pool in pools.items() if pool.contains(h)] for h in hashes]
        assert all("G3" in w for w in where)  # every block reached the bottom
        assert any("G2b" in w and "G2" not in w for w in where)  # some live only in the toy tier and below
        match = mgr.lookup(hashes, num_tokens=99)
        assert match.num_blocks == 12
        for b in range(16, 28):
            poison_block(gpu, b)
        executed = []
        execute = mgr.store.execute
        mgr.store.execute = lambda moves: (executed.extend(moves), execute(moves))[1]
        ticket = mgr.onboard(hashes, range(16, 28))
        mgr.wait(ticket)
        assert ticket.results == [BlockResult.OK] * 12
        assert [read_block(gpu, b) for b in range(16, 28)] == want
        assert {m.src_tier for m in executed if m.dst_tier == "G1"} == {"G2", "G2b", "G3"}
        assert not mgr.index.open_moves()  # every move reported back
        mgr.check_invariants()
