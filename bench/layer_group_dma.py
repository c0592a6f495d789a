"""Layer-group onboards, G2 layer view -> FlashAttention G1 (Llama-3.1-8B shape, 32 KiB pieces): the staged path
(DMA into staging, then the scatter kernel) against batched DMA straight into G1 (no kernel), alone and beside a
GEMM load on another stream, each byte-checked against the torch reference, and a pinned memcpy of the same bytes.
Usage on a GPU machine: ``python3 bench/layer_group_dma.py [BLOCKS]`` (default 1024)."""
import statistics
import sys
import time

import numpy as np
import torch

from kvbm.kernels.host_memory import PinnedHostBuffer
from kvbm.kernels.transfer import TransferEngine
from kvbm.layouts import KVGeometry, allocate, block_major, copy_blocks, select_layers
from kvbm.layouts.presets import STAGING_ORDER

g = KVGeometry(num_layers=32, num_kv=2, block_size=16, num_heads=8, head_dim=128, itemsize=2)
NB = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
gpu = allocate("vllm_flash_attn_nhd", g, NB + 64, dtype=torch.bfloat16, device="cuda")
for t in gpu.tensors:
    t.view(torch.uint8).random_(0, 256)
buf = PinnedHostBuffer(NB * g.block_bytes)
host = block_major(buf.tensor(torch.bfloat16)[: NB * g.block_bytes // 2].view(NB, 32, 2, 16, 8, 128), STAGING_ORDER)
host_bytes = host.tensors[0].view(torch.uint8)
host_bytes.copy_(torch.randint(0, 256, host_bytes.shape, dtype=torch.uint8))
eng = TransferEngine("cuda")
rng = np.random.default_rng(1)
host_ids = np.arange(NB, dtype=np.int64)
a = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
w = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)
busy = torch.cuda.Stream()

def run(path, layers, beside):
    gv, hv = select_layers(gpu, 0, layers), select_layers(host, 0, layers)
    gpu_ids = rng.permutation(NB + 64)[:NB].astype(np.int64)
    times = []
    for rep in range(6):
        if beside:
            with torch.cuda.stream(busy):
                for _ in range(30):
                    a @ w
            time.sleep(0.002)
        if not beside:
            torch.cuda.current_stream().synchronize()
        t0 = time.perf_counter()
        h = eng.onboard(hv, gv, host_ids, gpu_ids, path=path)
        h.wait()
        times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    ref = [t.clone() for t in gpu.tensors]
    refc = type(gpu)(ref, gpu.layout)
    for t in gpu.tensors:  # poison destinations, move again, compare with the torch reference
        t.view(torch.uint8)[:, gpu_ids] = 0xA5
    copy_blocks(hv, select_layers(refc, 0, layers), host_ids, gpu_ids, backend="torch")
    eng.onboard(hv, gv, host_ids, gpu_ids, path=path).wait()
    ok = all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(gpu.tensors[:layers], ref[:layers]))
    nbytes = NB * g.block_bytes * layers // 32
    med = statistics.median(times[1:])
    print(f"{path:7s} layers {layers:2d} beside_gemm {beside!s:5s} {nbytes/2**20:7.1f} MiB  median {med*1e3:7.3f} ms "
          f"min {min(times[1:])*1e3:7.3f} max {max(times[1:])*1e3:7.3f}  {nbytes/med/1e9:6.2f} GB/s  "
          f"bytes {'ok' if ok else 'WRONG'}", flush=True)
    return nbytes

def ceiling(nbytes):
    src = buf.tensor(torch.uint8)[:nbytes]
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ts = []
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    med = statistics.median(ts[1:])
    print(f"memcpy  {nbytes/2**20:7.1f} MiB median {med*1e3:7.3f} ms {nbytes/med/1e9:6.2f} GB/s", flush=True)

print(torch.cuda.get_device_name(), NB, "blocks")
for layers in (1, 4):
    for beside in (False, True):
        for path in ("staged", "dma"):
            n = run(path, layers, beside)
    ceiling(n)
