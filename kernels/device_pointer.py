"""A raw device-visible address that Triton accepts as a pointer argument (it asks only `data_ptr()` and `dtype`)."""
from __future__ import annotations

import torch


class DevicePointer:
    """An address typed for a Triton pointer argument: pinned host memory under UVA (whose host address is also its
    device address), or a position inside a device buffer (cheaper on the host than slicing a tensor)."""

    def __init__(self, address: int, dtype: torch.dtype):
        self.address, self.dtype = address, dtype

    def data_ptr(self) -> int:
        """The address Triton passes to the kernel."""
        return self.address
