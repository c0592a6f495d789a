"""Host <-> host: blocks between two CPU caches (an engine's cache on a CPU platform, G2, a second host pool),
copied by `copy_blocks` on the caller's thread (numba where it applies), finished when ``submit`` returns."""
from __future__ import annotations

from typing import Any

import numpy as np

from kvbm.layouts import copy_blocks

from ..block_transfer import BlockTransfer
from ..medium import Medium
from ..transfers import Transfers, register_path

__all__ = ["HostHostPath"]


class HostHostPath:
    """Synchronous CPU copies between any two layouts of the same geometry."""

    name = "host-copy"

    def __init__(self, transfers: Transfers) -> None:
        self._transfers = transfers

    def submit(self, src: Any, dst: Any, src_ids: np.ndarray, dst_ids: np.ndarray) -> BlockTransfer:
        """Copy now (a failure raises, before or while copying: the caller fails the blocks)."""
        copy_blocks(src, dst, src_ids, dst_ids)
        return BlockTransfer.completed(src_ids.size, self.name)

    def close(self) -> None:
        """Nothing to release."""


register_path(Medium.HOST, Medium.HOST, HostHostPath)
