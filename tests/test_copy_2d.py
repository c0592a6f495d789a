"""The 2-D copy descriptor of `kvbm.kernels.copy_2d`, on the CPU: `describe` fills a CUDA_MEMCPY2D laid out as
cuda-python's own struct, and bad pitches are refused before any driver call."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kvbm.kernels.copy_2d import DESCRIPTOR_FIELDS, DEVICE, HOST, describe, memcpy_2d_async


def test_describe_matches_cuda_pythons_struct():
    driver = pytest.importorskip("cuda.bindings.driver", reason="cuda-python's struct is the reference layout")
    desc = np.full(DESCRIPTOR_FIELDS, 99, dtype=np.uint64)  # poison: every field must be written
    describe(desc, 0x7000, 4096, DEVICE, 0x9000, 65536, HOST, 2048, 17)
    want = driver.CUDA_MEMCPY2D()
    want.srcMemoryType, want.srcHost, want.srcPitch = driver.CUmemorytype(HOST), 0x9000, 65536
    want.dstMemoryType, want.dstDevice, want.dstPitch = driver.CUmemorytype(DEVICE), driver.CUdeviceptr(0x7000), 4096
    want.WidthInBytes, want.Height = 2048, 17
    raw = np.frombuffer(ctypes.string_at(want.getPtr(), 8 * DESCRIPTOR_FIELDS), dtype=np.uint64)
    assert desc.tolist() == raw.tolist()


@pytest.mark.parametrize("width,pitches,rows", [(0, (64, 64), 1), (65, (64, 128), 1), (64, (64, 32), 2),
                                                (64, (64, 64), 0)])
def test_bad_copies_are_refused_before_the_driver(width, pitches, rows):
    with pytest.raises(ValueError, match="2-D copy needs"):
        memcpy_2d_async(0x1000, pitches[0], DEVICE, 0x2000, pitches[1], HOST, width, rows, 0)
