"""KVBM's offload tiers as both sides of an engine size them: G2 in pinned host memory, G3 on disk.

`kvbm_tiers` turns the ``DYN_KVBM_*`` sizes into an ordered list of `TierSpec`; the leader builds its index from
the names and sizes (`TierSpec.index_config`), each worker allocates the memory (`kvbm.worker.tier_memory`). Sizes
in GB count a block's bytes summed over all ranks, and every rank gets the same number of blocks of its own size,
as in Dynamo KVBM; tiers shared by ranks holding identical KV (MLA: one host pool, one disk file) count one copy.
Plain data, no torch: the scheduler side imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvbm.config import KvbmConfig
from kvbm.kernels.disk_file import align_up
from kvbm.kernels.medium import Medium
from kvbm.leader.index import AdmissionPolicy, TierConfig

__all__ = ["HOST_TIER", "DISK_TIER", "TierSpec", "kvbm_tiers"]

HOST_TIER, DISK_TIER = "G2", "G3"


@dataclass(frozen=True)
class TierSpec:
    """One tier: its ``name``, ``medium`` and ``num_blocks``; for a disk tier its ``directory`` and file options."""

    name: str
    medium: Medium
    num_blocks: int
    directory: Path | None = None
    use_o_direct: bool = True
    zerofill_fallback: bool = False

    def index_config(self, admission: AdmissionPolicy | None = None) -> TierConfig:
        """The leader's view of the tier, admitting blocks from the tier above through ``admission``."""
        return TierConfig(self.name, self.num_blocks, admission)


def kvbm_tiers(config: KvbmConfig, block_bytes: int, stored_block_bytes: int | None = None) -> list[TierSpec]:
    """G2 and/or G3 as ``config`` sizes them for blocks of ``block_bytes`` (summed over ranks), or of
    ``stored_block_bytes`` when given (ranks sharing their tiers count one copy); empty when neither is
    configured."""
    stored = block_bytes if stored_block_bytes is None else stored_block_bytes
    host_blocks, disk_blocks = config.resolve_num_blocks(stored, disk_bytes_per_block=align_up(stored))
    tiers = []
    if host_blocks:
        tiers.append(TierSpec(HOST_TIER, Medium.HOST, host_blocks))
    if disk_blocks:
        tiers.append(TierSpec(DISK_TIER, Medium.DISK, disk_blocks, config.disk_cache_dir,
                              use_o_direct=not config.disk_disable_o_direct,
                              zerofill_fallback=config.disk_zerofill_fallback))
    return tiers
