"""pytest-benchmark microbenchmarks of copy_blocks: every backend on this machine, standard layout sweep.

    pytest bench/test_bench_copy_blocks.py --benchmark-only

Gathers from an engine layout into the block-major staging layout (Llama-3.1-8B block shape, 8 layers on CPU to keep
it short, 32 on a GPU) and checks the bytes once against the torch reference before timing.
"""
from __future__ import annotations

import pytest
import torch

from kvbm.layouts import KVGeometry, allocate, copy_blocks

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
GEOMETRY = KVGeometry(32 if GPU else 8, 2, 16, 8, 128, 2)
LAYOUTS = ["vllm_flash_attn_nhd", "vllm_flash_attn_hnd", "vllm_flashinfer_nhd", "trtllm_pool", "vllm_lbnhc"]
BACKENDS = ["triton", "torch"] if GPU else ["numba", "torch"]


@pytest.mark.parametrize("blocks", [16, 256])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather(benchmark, backend, layout, blocks):
    src = allocate(layout, GEOMETRY, 512, dtype=torch.bfloat16, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(blocks)
    for t in src.tensors:
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8, device=DEVICE,
                                                generator=gen))
    dst = allocate("kvbm_staging", GEOMETRY, blocks, dtype=torch.bfloat16, device=DEVICE)
    ref = allocate("kvbm_staging", GEOMETRY, blocks, dtype=torch.bfloat16, device=DEVICE)
    ids = torch.randperm(512, generator=torch.Generator().manual_seed(1))[:blocks]
    out = torch.arange(blocks)
    copy_blocks(src, ref, ids, out, backend="torch")

    def run():
        copy_blocks(src, dst, ids, out, backend=backend)
        if GPU:
            torch.cuda.synchronize()

    benchmark(run)
    assert torch.equal(dst.tensors[0].view(torch.int16), ref.tensors[0].view(torch.int16))
    if benchmark.stats is not None:  # None under --benchmark-disable (a plain correctness run)
        benchmark.extra_info["gbps"] = blocks * GEOMETRY.block_bytes / benchmark.stats["median"] / 1e9
