"""What the layer-wise scatter's wait beside a prefill depends on (GPU only).

``python -m bench.ttft.wait_probe [bench.ttft options]`` runs the TTFT bench with its layer-wait measurement
(`layer_waits.measure_layer_waits`) repeated under variants of the prefill that runs beside the onboard: as is;
without its attention (each layer's attention replaced by an empty tensor, the matmuls, norms and RoPE left); with
torch's experimental cuBLAS SM carve-out (``torch._C._set_sm_carveout_experimental``) of 4, 8 and 16 SMs; as is
again. Then the 2048-token prefill's own time under each carve-out. Each variant prints the scatter kernels' longest
and median extra wait and the layer groups' delays. Example: ``--models llama-3.1-8b --workloads prefix --prefixes
16384 --modes recompute,g2-layerwise --layer-store-tokens 0``.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch

from . import bench, model
from .layer_waits import measure_layer_waits

VARIANTS = ("as is", "no attention", "carve-out 4", "carve-out 8", "carve-out 16", "as is again")


def _carve_out(sms: int | None) -> None:
    torch._C._set_sm_carveout_experimental(sms)


def _variants(eng: Any, side: Any, tokens: Any, busy: int, vocab: int, reps: int) -> dict[str, Any]:
    """`measure_layer_waits` under each of `VARIANTS` (printed); returns the first's result for the bench."""
    first = None
    attention = model.paged_attention
    for name in VARIANTS:
        sms = int(name.split()[-1]) if name.startswith("carve-out") else None
        if name == "no attention":
            model.paged_attention = lambda q, *args, **kwargs: torch.empty_like(q)
        _carve_out(sms)
        try:
            w = measure_layer_waits(eng, side, tokens, busy, vocab, reps)
        finally:
            model.paged_attention = attention
            _carve_out(None)
        print(f"[probe] {name:13s} scatter wait max {w['max_scatter_wait_us']:5.0f} us, median "
              f"{w['median_scatter_wait_us']:3.0f} us; layer groups later max {w['max_delay_us']:5.0f} us, median "
              f"{w['median_delay_us']:5.0f} us", flush=True)
        first = first or w
    prompt = torch.randint(0, vocab, (busy,), device=eng.device)
    for sms in (None, 4, 8, 16):
        _carve_out(sms)
        blocks = eng.pool.allocate(-(-busy // model.BLOCK_SIZE))
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eng.model.prefill(prompt, eng.caches, torch.tensor(blocks, device=eng.device), 0)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        eng.pool.release(blocks)
        print(f"[probe] carve-out {sms}: {busy}-token prefill {statistics.median(times[1:]) * 1e3:.2f} ms", flush=True)
    _carve_out(None)
    return first


if __name__ == "__main__":
    bench.measure_layer_waits = _variants
    sys.exit(bench.main(sys.argv[1:]))
