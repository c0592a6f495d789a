"""Copy path of kvbm's vLLM offloading spec against vLLM's own CPU spec, on the same vLLM 0.33 KV layout.

    python -m bench.offloading_bench [--out DIR] [--blocks 16 256] [--iters 20] [--vllm-ops auto] [--smoke]

On a GPU, for each geometry (``llama8b``: 32 layers x 8 KV heads x 128 head_dim x 16 tokens bf16, 32 KiB K or V
pieces; ``small``: 2 KV heads x 64 head_dim, 4 KiB pieces), block count and direction (D2H store, H2D load) it
times one job's worker side (submit until done; the scheduler side's planning, which vLLM runs in another process,
is not timed) through ``KvbmOffloadingWorker`` (the kvbm transfer library, slots planned by
``KvbmOffloadingManager``) and through vLLM's ``CPUOffloadingWorker``, both handed the same ``CanonicalKVCaches``
built the way vLLM's offloading connector builds them from LBHNC per-layer views; each is paired with a plain
pinned ``copy_`` of the same bytes in the same run (GB/s and percent of it). Every transfer is byte-checked: the
host copy of each block against the GPU source (D2H), and the GPU blocks loaded back against it (H2D). Writes
``results.json`` and ``results.md`` to ``--out`` (default: an untracked ``bench/runs/offloading-<time>/``).
Without CUDA (or with ``--smoke``) it runs a tiny smoke version of kvbm's path on the CPU and says vLLM's path
needs a GPU.

``--vllm-ops`` picks vLLM's compiled copy op: ``compiled`` (vLLM's extension), ``stand-in`` (kvbm's same driver call,
``bench/vllm_stand_in.py``) or ``auto`` (the extension if it imports, else the stand-in: on a GPU machine without
vLLM's extension, with vLLM's Python from ``bench/vllm_bundle.py``). The results say which ran (``vllm_ops``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kvbm.tools.checkout import checkout_commit

if not torch.cuda.is_available():  # vLLM (imported lazily below) picks its platform at import
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

__all__ = ["Geometry", "GEOMETRIES", "SMOKE", "main", "parse_args"]


@dataclass(frozen=True)
class Geometry:
    """A model's KV shape: layers, KV heads, head_dim, tokens per block; bf16."""

    name: str
    layers: int
    heads: int
    head_dim: int
    tokens: int

    @property
    def piece_bytes(self) -> int:
        """Bytes of one block's K (or V) in one layer."""
        return self.heads * self.head_dim * self.tokens * 2

    @property
    def page_bytes(self) -> int:
        """Bytes of one block in one layer (K and V): vLLM's canonical page."""
        return 2 * self.piece_bytes

    @property
    def block_bytes(self) -> int:
        return self.layers * self.page_bytes


GEOMETRIES = {"llama8b": Geometry("llama8b", 32, 8, 128, 16), "small": Geometry("small", 32, 2, 64, 16)}
SMOKE = Geometry("smoke", 2, 2, 16, 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/runs/offloading-<time>)")
    p.add_argument("--geometries", nargs="+", choices=sorted(GEOMETRIES), default=["llama8b", "small"])
    p.add_argument("--blocks", nargs="+", type=int, default=[16, 256])
    p.add_argument("--iters", type=int, default=20, help="timed jobs per case (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of kvbm's path (automatic without CUDA)")
    p.add_argument("--vllm-ops", choices=["auto", "compiled", "stand-in"], default="auto",
                   help="vLLM's compiled swap_blocks_batch, kvbm's stand-in for it, or auto: compiled if importable")
    args = p.parse_args(argv)
    if any(n <= 0 for n in args.blocks) or args.iters <= 0 or args.warmup < 0:
        p.error("--blocks and --iters must be positive, --warmup non-negative")
    return args


# -- the engine side: vLLM 0.33's LBHNC per-layer views and the canonical tensors its connector derives ------------


def engine_caches(g: Geometry, num_blocks: int, device: torch.device) -> tuple[torch.Tensor, Any]:
    """A ``[layers, blocks, heads, tokens, 2 * head_dim]`` bf16 buffer of random bytes (vLLM's LBHNC) and the
    ``CanonicalKVCaches`` vLLM's offloading connector hands a spec's worker: per layer an int8
    ``[num_blocks, page_bytes]`` view."""
    from vllm.v1.kv_offload.base import CanonicalKVCacheRef, CanonicalKVCaches, CanonicalKVCacheTensor

    buf = torch.empty((g.layers, num_blocks, g.heads, g.tokens, 2 * g.head_dim), dtype=torch.bfloat16, device=device)
    buf.view(torch.int16).random_(-(2**15), 2**15 - 1)
    raw = buf.view(torch.int8).view(g.layers, num_blocks, g.page_bytes)
    tensors = [CanonicalKVCacheTensor(raw[layer], g.page_bytes) for layer in range(g.layers)]
    refs = [[CanonicalKVCacheRef(layer, g.page_bytes) for layer in range(g.layers)]]
    return raw, CanonicalKVCaches(tensors, refs)


# -- the two copy paths ---------------------------------------------------------------------------------------------


class KvbmPath:
    """kvbm's spec: the manager plans the slots, the worker runs the job through ``Transfers``."""

    name = "kvbm spec"

    def __init__(self, kv_caches: Any, host_blocks: int) -> None:
        from kvbm.config import KvbmConfig
        from kvbm.vllm_offloading.manager import KvbmOffloadingManager
        from kvbm.vllm_offloading.worker import KvbmOffloadingWorker
        from kvbm.kernels.medium import Medium
        from kvbm.tiers import TierSpec

        config = KvbmConfig(cpu_cache_override_num_blocks=host_blocks)
        tiers = [TierSpec("G2", Medium.HOST, host_blocks)]
        self.manager = KvbmOffloadingManager(tiers, config, 1)
        self.worker = KvbmOffloadingWorker(kv_caches, tiers, config, 1)
        self.worker.failure_reports = True
        self._round = 0
        self._ctx = None

    def _context(self) -> Any:
        from vllm.v1.kv_offload.base import ReqContext

        return ReqContext(req_id="bench")

    def plan_store(self, gpu_ids: list[int]) -> list[int]:
        """The scheduler side's part of a D2H job (not timed: vLLM runs it in the scheduler's process); returns
        the host slots it will write, in block order."""
        self.manager.reset_cache()
        self._round += 1
        self._keys = [f"{self._round}:{i}".encode().ljust(32, b"\0") for i in range(len(gpu_ids))]
        out = self.manager.prepare_store(self._keys, self._context())
        assert out is not None and out.keys_to_store == self._keys
        self._spec = out.store_spec
        return [slot for _, slot in out.store_spec.slot_ids]

    def store(self, job: int, gpu_ids: list[int]) -> None:
        """The worker's part of the D2H job planned last."""
        from vllm.v1.kv_offload.base import GPULoadStoreSpec

        self.worker.submit_store(job, GPULoadStoreSpec(gpu_ids, [len(gpu_ids)], [0]), self._spec)

    def finish_store(self) -> None:
        self.manager.complete_store(self._keys, self._context())

    def plan_load(self) -> None:
        """The scheduler side's part of an H2D job of the blocks stored last (not timed)."""
        self._load_spec = self.manager.prepare_load(self._keys, self._context())

    def load(self, job: int, gpu_ids: list[int]) -> None:
        from vllm.v1.kv_offload.base import GPULoadStoreSpec

        self.worker.submit_load(job, self._load_spec, GPULoadStoreSpec(gpu_ids, [len(gpu_ids)], [0]))

    def finish_load(self) -> None:
        self.manager.complete_load(self._keys, self._context())

    def wait(self, job: int) -> None:
        self.worker.wait({job})
        done = self.worker.get_finished()
        assert [r.job_id for r in done] == [job] and all(r.success for r in done)
        assert not self.worker.take_load_errors() and not self.worker.take_failures(), "kvbm reported failed blocks"

    def host_page(self, layer: int, slot: int) -> torch.Tensor:
        return self.worker.store.caches["G2"].piece_view(layer, 0, torch.int8)[slot].reshape(-1)

    def close(self) -> None:
        self.worker.shutdown()


class VllmCpuPath:
    """vLLM's own CPU spec worker (``CPUOffloadingWorker``) on the same canonical tensors."""

    name = "vLLM CPU spec"

    def __init__(self, kv_caches: Any, host_blocks: int) -> None:
        from vllm.v1.kv_offload.cpu.gpu_worker import CPUOffloadingWorker

        self.worker = CPUOffloadingWorker(kv_caches=kv_caches, blocks_per_chunk=1, num_cpu_chunks=host_blocks)
        self._cpu = self.worker._store_handler.dst_tensors  # its per-layer host tensors, for the byte check

    def plan_store(self, gpu_ids: list[int]) -> list[int]:
        self._slots = list(range(len(gpu_ids)))
        return self._slots

    def store(self, job: int, gpu_ids: list[int]) -> None:
        from vllm.v1.kv_offload.base import GPULoadStoreSpec
        from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec

        self.worker.submit_store(job, GPULoadStoreSpec(gpu_ids, [len(gpu_ids)], [0]), CPULoadStoreSpec(self._slots))

    def plan_load(self) -> None:
        pass

    def finish_store(self) -> None:
        pass

    def load(self, job: int, gpu_ids: list[int]) -> None:
        from vllm.v1.kv_offload.base import GPULoadStoreSpec
        from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec

        self.worker.submit_load(job, CPULoadStoreSpec(self._slots), GPULoadStoreSpec(gpu_ids, [len(gpu_ids)], [0]))

    def finish_load(self) -> None:
        pass

    def wait(self, job: int) -> None:
        self.worker.wait({job})
        done = []
        while not done:
            done = self.worker.get_finished()
        assert [r.job_id for r in done] == [job] and all(r.success for r in done)

    def host_page(self, layer: int, slot: int) -> torch.Tensor:
        return self._cpu[layer][slot]

    def close(self) -> None:
        self.worker.shutdown()


# -- measurement --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], None]) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def memcpy_baseline(nbytes: int, device: torch.device, iters: int) -> dict[str, float]:
    """GB/s of one pinned ``copy_`` of ``nbytes`` each way (the ceiling both paths are compared with)."""
    pin = device.type == "cuda"
    src = torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device=device)
    host = torch.empty(nbytes, dtype=torch.int8, pin_memory=pin)
    back = torch.empty_like(src)
    d2h = [_timed(device, lambda: host.copy_(src, non_blocking=True)) for _ in range(iters + 1)][1:]
    h2d = [_timed(device, lambda: back.copy_(host, non_blocking=True)) for _ in range(iters + 1)][1:]
    assert torch.equal(back, src), "memcpy baseline bytes differ"
    return {"d2h": nbytes / statistics.median(d2h) / 1e9, "h2d": nbytes / statistics.median(h2d) / 1e9}


def run_case(path_cls: type, g: Geometry, n: int, device: torch.device, iters: int, warmup: int) -> dict[str, Any]:
    """Median GB/s of ``path_cls`` storing and loading ``n`` blocks, every job byte-checked."""
    num_gpu = 2 * n + 8
    raw, kv = engine_caches(g, num_gpu, device)
    rng = np.random.default_rng(n)
    order = rng.permutation(num_gpu - 1) + 1
    src_ids, dst_ids = sorted(order[:n].tolist()), sorted(order[n:2 * n].tolist())
    path = path_cls(kv, n)
    times: dict[str, list[float]] = {"d2h": [], "h2d": []}
    job = 0
    try:
        for it in range(warmup + iters):
            job += 1
            slots = path.plan_store(src_ids)
            t = _timed(device, lambda: (path.store(job, src_ids), path.wait(job)))
            path.finish_store()
            for layer in (0, g.layers - 1):  # D2H check: host copy of each block == GPU source
                for b, s in zip(src_ids, slots):
                    if not torch.equal(path.host_page(layer, s).cpu(), raw[layer, b].cpu()):
                        raise AssertionError(f"{path.name}: D2H block {b} layer {layer} differs in host slot {s}")
            raw[:, dst_ids].zero_()
            job += 1
            path.plan_load()
            t2 = _timed(device, lambda: (path.load(job, dst_ids), path.wait(job)))
            path.finish_load()
            if not torch.equal(raw[:, dst_ids], raw[:, src_ids]):
                raise AssertionError(f"{path.name}: H2D blocks differ from the blocks stored")
            if it >= warmup:
                times["d2h"].append(t)
                times["h2d"].append(t2)
    finally:
        path.close()
    nbytes = n * g.block_bytes
    return {d: nbytes / statistics.median(ts) / 1e9 for d, ts in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or its CPU smoke version) and write results.json / results.md."""
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    device = torch.device("cuda" if cuda and not smoke else "cpu")
    geometries = [SMOKE] if smoke else [GEOMETRIES[name] for name in args.geometries]
    blocks = [4] if smoke else args.blocks
    iters, warmup = (2, 1) if smoke else (args.iters, args.warmup)
    out = args.out or Path(__file__).resolve().parent / "runs" / datetime.datetime.now().strftime(
        "offloading-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    paths: list[type] = [KvbmPath] + ([] if smoke else [VllmCpuPath])
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    vllm_ops = None
    if smoke:
        notes.append("smoke run on the CPU: kvbm's path only (host <-> host); vLLM's CPU spec worker needs CUDA "
                     "streams, and the GPU numbers need a GPU (run without --smoke on a CUDA machine)")
    else:
        from bench.vllm_stand_in import use_vllm_ops  # before anything imports vLLM's platform

        vllm_ops = use_vllm_ops(args.vllm_ops)
        if vllm_ops == "stand-in":
            notes.append("vLLM's compiled extension was not loaded: vLLM's CPU spec ran as vLLM's own Python with "
                         "kvbm's stand-in for its one compiled op, swap_blocks_batch (bench/vllm_stand_in.py: one "
                         "cuMemcpyBatchAsync per call, the call the compiled op makes on CUDA 12.8+)")
    for g in geometries:
        for n in blocks:
            base = memcpy_baseline(n * g.block_bytes, device, iters)
            for path_cls in paths:
                try:
                    gbps = run_case(path_cls, g, n, device, iters, warmup)
                    error = None
                except AssertionError:
                    raise
                except Exception as e:  # noqa: BLE001 - a path that cannot run is reported, not fatal
                    gbps, error = {}, f"{type(e).__name__}: {e}"
                for d in ("d2h", "h2d"):
                    rows.append({"geometry": g.name, "piece_bytes": g.piece_bytes, "blocks": n, "direction": d,
                                 "path": path_cls.name, "gbps": gbps.get(d), "memcpy_gbps": base[d],
                                 "pct_of_memcpy": None if d not in gbps else 100 * gbps[d] / base[d],
                                 "error": error})
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "commit": checkout_commit(Path(__file__).resolve().parents[1]),
              "command": " ".join([sys.executable, "-m", "bench.offloading_bench", *(argv or sys.argv[1:])]),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "smoke": smoke, "vllm_ops": vllm_ops, "iters": iters, "notes": notes,
              "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out}/results.json and results.md")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table (GB/s and percent of the same run's pinned memcpy)."""
    ops = f", vLLM ops: {result['vllm_ops']}" if result.get("vllm_ops") else ""
    lines = [f"Offloading copy path: {result['device']}, commit {result['commit']}, {result['date']}{ops}", ""]
    lines += [f"> {note}" for note in result["notes"]] + ([""] if result["notes"] else [])
    lines += ["| geometry | piece | blocks | dir | path | GB/s | memcpy GB/s | % of memcpy |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        gbps = f"{r['gbps']:.2f}" if r["gbps"] is not None else f"n/a ({r['error']})"
        pct = f"{r['pct_of_memcpy']:.0f}%" if r["pct_of_memcpy"] is not None else "-"
        piece = f"{r['piece_bytes'] // 1024} KiB" if r["piece_bytes"] >= 1024 else f"{r['piece_bytes']} B"
        lines.append(f"| {r['geometry']} | {piece} | {r['blocks']} | {r['direction']} | "
                     f"{r['path']} | {gbps} | {r['memcpy_gbps']:.2f} | {pct} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
