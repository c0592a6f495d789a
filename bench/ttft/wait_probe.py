"""What the layer-wise scatter's wait beside a prefill depends on (GPU only).

``python -m bench.ttft.wait_probe [bench.ttft options]`` runs the TTFT bench with its layer-wait measurement
(`layer_waits.measure_layer_waits`) repeated under variants of the prefill that runs beside the onboard: as is;
without its attention (each layer's attention replaced by an empty tensor, the matmuls, norms and RoPE left); with
torch's experimental cuBLAS SM carve-out (``torch._C._set_sm_carveout_experimental``) of 16 SMs; with the matmuls
routed through cuBLASLt (``torch.backends.cuda.preferred_blas_library``), alone and with that carve-out (whether
the carve-out reaches the matmuls through either library); as is again. Then the prefill's own time under each, and its
longest kernels (name, grid, time) from a profiler trace: a kernel whose grid is one CTA per SM and that runs for
the whole matmul holds every SM until it ends, whatever the scatter stream's priority. Each variant prints the
scatter kernels' longest and median extra wait and the layer groups' delays. Example: ``--models llama-3.1-8b
--workloads prefix --prefixes 16384 --modes recompute,g2-layerwise --layer-store-tokens 0``.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch

from . import bench, model
from .layer_waits import measure_layer_waits

VARIANTS = ("as is", "no attention", "carve-out 16", "cuBLASLt", "cuBLASLt carve-out 16", "as is again")


def _setting(name: str) -> None:
    """Apply variant ``name``'s matmul library (cuBLASLt, else cuBLAS, torch's default) and SM carve-out (none
    unless the name gives one)."""
    torch.backends.cuda.preferred_blas_library("cublaslt" if "cuBLASLt" in name else "cublas")
    torch._C._set_sm_carveout_experimental(int(name.split()[-1]) if "carve-out" in name else None)


def _longest_kernels(run: Any, top: int = 6) -> list[str]:
    """The ``top`` kernels of ``run()`` by total GPU time, each with its grid, block and count (from a torch
    profiler trace)."""
    import json
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    totals: dict[tuple[str, str, str], list[float]] = {}
    for event in trace.get("traceEvents", []):
        if event.get("cat") == "kernel":
            args = event.get("args", {})
            key = (event["name"], str(args.get("grid")), str(args.get("block")))
            totals.setdefault(key, []).append(float(event.get("dur", 0.0)))
    ranked = sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:top]
    return [f"{sum(t) / 1e3:7.2f} ms, {len(t):3d}x, max {max(t):6.0f} us, grid {grid} block {block}: {name[:100]}"
            for (name, grid, block), t in ranked]


def _variants(eng: Any, side: Any, tokens: Any, busy: int, vocab: int, reps: int) -> dict[str, Any]:
    """`measure_layer_waits` under each of `VARIANTS` (printed); returns the first's result for the bench."""
    first = None
    attention = model.paged_attention
    for name in VARIANTS:
        if name == "no attention":
            model.paged_attention = lambda q, *args, **kwargs: torch.empty_like(q)
        _setting(name)
        try:
            w = measure_layer_waits(eng, side, tokens, busy, vocab, reps)
        finally:
            model.paged_attention = attention
            _setting("as is")
        print(f"[probe] {name:13s} scatter wait max {w['max_scatter_wait_us']:5.0f} us, median "
              f"{w['median_scatter_wait_us']:3.0f} us; layer groups later max {w['max_delay_us']:5.0f} us, median "
              f"{w['median_delay_us']:5.0f} us", flush=True)
        first = first or w
    prompt = torch.randint(0, vocab, (busy,), device=eng.device)
    for name in (v for v in VARIANTS if v not in ("no attention", "as is again")):
        _setting(name)
        blocks = eng.pool.allocate(-(-busy // model.BLOCK_SIZE))
        block_ids = torch.tensor(blocks, device=eng.device)

        def prefill() -> None:
            eng.model.prefill(prompt, eng.caches, block_ids, 0)

        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            prefill()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(f"[probe] {name}: {busy}-token prefill {statistics.median(times[1:]) * 1e3:.2f} ms", flush=True)
        for line in _longest_kernels(prefill):
            print(f"[probe]   {line}", flush=True)
        eng.pool.release(blocks)
    _setting("as is")
    return first


if __name__ == "__main__":
    bench.measure_layer_waits = _variants
    sys.exit(bench.main(sys.argv[1:]))
