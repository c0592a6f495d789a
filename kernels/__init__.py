"""kvbm.kernels: the transfer library. Mediums and paths (`medium`, `transfers`, `paths`), the gather/scatter
kernels (Triton on GPU, numba on CPU) behind the conversion API of `kvbm.layouts` (`backends` registers them when
`kvbm.layouts` is imported), pinned host memory, staging, streams and events, disk files and cuFile.

Importing this package alone loads nothing heavy: `kvbm.kernels.medium` is importable without torch.
"""
import os


def triton_interpreting() -> bool:
    """Whether Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1, set before first use)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


__all__ = ["triton_interpreting"]
