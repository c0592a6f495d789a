"""Where a paged cache's bytes live: the medium, which decides the path that moves them.

Transfers are routed by (source medium, destination medium) in `kvbm.kernels.transfers`; nothing else decides a
path from a cache's device, class or layout name.
"""
from __future__ import annotations

import enum

__all__ = ["Medium", "medium_of"]


class Medium(enum.Enum):
    """The memory a cache's blocks sit in."""

    GPU = "gpu"  #: device memory (an engine's G1 cache, device staging)
    HOST = "host"  #: CPU memory, pinned or not (G2, bounce buffers; an engine's cache on a CPU platform)
    DISK = "disk"  #: slots of a file (G3)
    REMOTE = "remote"  #: another process's or host's memory, behind a transfer agent (G4)


def medium_of(cache: object) -> Medium:
    """The medium of a cache: its own ``medium`` attribute when it declares one (file-backed and remote caches),
    else the device type of its tensors ("cuda" is GPU, "cpu" is HOST)."""
    declared = getattr(type(cache), "medium", None)
    if isinstance(declared, Medium):
        return declared
    device = getattr(cache, "device", None)
    kind = getattr(device, "type", None)
    if kind == "cuda":
        return Medium.GPU
    if kind == "cpu":
        return Medium.HOST
    raise ValueError(f"cannot tell the medium of {type(cache).__name__} on device {device!r}: only CUDA and CPU "
                     f"tensors, and caches that declare a medium, can be moved")
