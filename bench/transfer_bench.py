"""Transfer benchmark: our D2H / H2D paths against the peers' methods, in one process, on the same caches.

    python -m bench.transfer_bench [--quick] [--out bench/results]

On a GPU it measures, for each layout and batch size (1, 16, 256, 1024 blocks) and both directions: our paths
(staged, zero_copy, dma, auto) and the peers' methods (per-piece cudaMemcpyAsync loop, one cudaMemcpyBatchAsync
over all pieces, a 12-CTA kernel over UVA as vLLM's small-piece H2D path, torch index_select + one copy), each as
GB/s and as a percentage of the same run's single large pinned memcpy; the gather kernel alone against the
device-to-device copy; a GEMM beside offloads for each path; offload and onboard at once; and the round trip of
one block. Block ids are passed as int64 numpy arrays (the peers' methods get their piece arrays ready-made too);
the enqueue-cost section passes lists. Every transfer's bytes are checked against a torch copy. Without a GPU it
times the numba backend against the torch reference at small sizes (one numba thread by default), each copy's bytes
checked over a poisoned destination. Writes JSON (with date, device, commit and command), a markdown table and a
PNG plot (or says why there is none).
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
from pathlib import Path

import numpy as np
import torch

from kvbm.kernels.transfers import Transfers
from kvbm.layouts import KVGeometry, allocate, block_major, copy_blocks
from kvbm.layouts.presets import STAGING_ORDER
from kvbm.tools.checkout import checkout_commit

LLAMA8B = KVGeometry(num_layers=32, num_kv=2, block_size=16, num_heads=8, head_dim=128, itemsize=2)
DEEPSEEK = KVGeometry(num_layers=61, num_kv=1, block_size=64, num_heads=1, head_dim=576, itemsize=2)
LAYOUTS = [  # (preset, geometry name)
    ("vllm_flash_attn_nhd", "llama8b"), ("vllm_flash_attn_hnd", "llama8b"), ("vllm_flashinfer_nhd", "llama8b"),
    ("vllm_mla", "deepseek"), ("trtllm_pool", "llama8b"), ("vllm_lbnhc", "llama8b"),
]
#: Piece-size sweep (section "pieces"): vLLM FlashAttention NHD caches of 32 layers whose (layer, K/V) piece of one
#: block is block_size x heads x head_dim elements of 2 bytes (bf16) or 1 byte (an fp8 cache), from 2 KiB to 128 KiB
#: (name: piece KiB, tokens, heads, dims, dtype; value: tokens, heads, dims, bytes per element).
PIECE_SWEEP = {
    "p2k_16t_1h_64d": (16, 1, 64, 2), "p4k_16t_2h_64d": (16, 2, 64, 2), "p8k_16t_2h_128d": (16, 2, 128, 2),
    "p16k_16t_4h_128d": (16, 4, 128, 2), "p32k_16t_8h_128d": (16, 8, 128, 2), "p32k_16t_4h_256d": (16, 4, 256, 2),
    "p64k_32t_8h_128d": (32, 8, 128, 2), "p128k_64t_8h_128d": (64, 8, 128, 2),
    "p2k_16t_2h_64d_fp8": (16, 2, 64, 1), "p8k_16t_4h_128d_fp8": (16, 4, 128, 1),
    "p16k_16t_8h_128d_fp8": (16, 8, 128, 1), "p64k_64t_8h_128d_fp8": (64, 8, 128, 1),
}
GEOMETRIES = {"llama8b": LLAMA8B, "deepseek": DEEPSEEK,
              **{name: KVGeometry(num_layers=32, num_kv=2, block_size=t, num_heads=h, head_dim=d, itemsize=b)
                 for name, (t, h, d, b) in PIECE_SWEEP.items()}}
#: The cache dtype of each element size (copies move bytes: an fp8 cache is moved as such).
DTYPES = {2: torch.bfloat16, 1: torch.float8_e4m3fn}
BATCHES = [1, 16, 256, 1024]
#: Bytes of the ceiling copies (one pinned memcpy each way, device-to-device, two at once). Throughput is timed over
#: bursts of back-to-back transfers moving as many bytes (one transfer when it is that large), from an idle GPU to
#: the last byte, host enqueue included: the same bytes and the same clock as the ceiling it is compared with; each
#: timing is paired with a ceiling copy just before it (see `measure`).
CEILING_BYTES = 512 << 20
#: Host pool inner order per preset: the G1 order, so host blocks need no permutation (what peers store too).
HEAD_FIRST = ("layer", "kv", "head", "token", "channel")
HOST_ORDER = {"vllm_flash_attn_hnd": HEAD_FIRST, "trtllm_pool": HEAD_FIRST}
#: A method whose measurement would take longer than this (a Python loop over hundreds of thousands of small pieces)
#: is timed over one shorter burst.
SLOW_SECONDS = 4.0
#: Offloads kept queued beside the GEMM in the interference measurement.
IN_FLIGHT = 2


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fill(cache, seed: int) -> None:
    """Random bytes everywhere (drawn on the GPU when there is one, then copied)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    for t in cache.tensors:
        b = t.view(torch.uint8)
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, device=device, generator=gen))


def timed(fn, reps: int, warmup: int = 2) -> list[float]:
    """Wall seconds of fn() from an idle GPU to all its work done, `reps` times after `warmup` runs."""
    out = []
    for i in range(warmup + reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


class Env:
    """Caches and helpers for one layout on the GPU."""

    def __init__(self, preset: str, gname: str, host_blocks: int, gpu_blocks: int):
        from kvbm.kernels.host_memory import PinnedHostBuffer

        geometry = GEOMETRIES[gname]
        self.preset, self.g, self.gname = preset, geometry, gname
        self.dtype = DTYPES[geometry.itemsize]
        self.gpu = allocate(preset, geometry, gpu_blocks, dtype=self.dtype, device="cuda")
        fill(self.gpu, 1)
        self.buffer = PinnedHostBuffer(host_blocks * geometry.block_bytes)
        self.order = HOST_ORDER.get(preset, STAGING_ORDER)
        sizes = {"layer": geometry.num_layers, "kv": geometry.num_kv, "token": geometry.block_size,
                 "head": geometry.num_heads, "channel": geometry.head_dim}
        self.shape = [sizes[n] for n in self.order]
        t = self.buffer.tensor(self.dtype).view(host_blocks, *self.shape)
        self.host = block_major(t, self.order)
        self.host_ref = block_major(torch.empty_like(t), self.order)  # pageable reference copy for checks

    def close(self) -> None:
        del self.host
        self.buffer.close()


OUR_METHODS = [("kvbm_staged", "staged", {}), ("kvbm_zero_copy", "zero_copy", {}), ("kvbm_dma", "dma", {}),
               ("kvbm_auto", "auto", {}), ("kvbm_staged_copy_engine", "staged", {"gather": "copy_engine"})]


def copy_engine_ok(env: Env) -> bool:
    """Whether the G1 pieces are dense runs in the host order (the copy-engine gather needs that)."""
    from kvbm.kernels.copy_plan import build_plan

    plan = build_plan(env.gpu, env.host)
    return plan.dims[2][1] == plan.dims[2][2] == 1 and plan.row_len * plan.unit >= 4096


def peer_methods(env: Env, engine, direction: str, src_ids, dst_ids) -> dict:
    """name -> (callable enqueueing one transfer with a peer's method, destination ids it writes)."""
    from kvbm.kernels.batch_memcpy import memcpy_batch_async, memcpy_loop_async
    from kvbm.kernels.copy_plan import build_plan
    from kvbm.kernels.transfer import dense_pieces

    lane = engine.lanes[direction]
    src, dst = (env.gpu, env.host) if direction == "d2h" else (env.host, env.gpu)
    srcs, dsts, sizes = dense_pieces(build_plan(src, dst), src, dst, np.asarray(src_ids), np.asarray(dst_ids))
    methods = {
        "peer_memcpy_loop": (lambda: memcpy_loop_async(dsts, srcs, sizes, lane.dma_streams[0]), dst_ids),
        "peer_batch_memcpy": (lambda: memcpy_batch_async(dsts, srcs, sizes, lane.dma_streams[0], direction=direction,
                                                         check_overlap=False), dst_ids),
    }
    if direction == "h2d":  # vLLM's small-piece host-to-device path: a 12-CTA kernel reading pinned host over UVA
        methods["peer_uva_kernel_12cta"] = (lambda: engine.onboard(env.host, env.gpu, src_ids, dst_ids,
                                                                   path="zero_copy", max_ctas=12), dst_ids)
        return methods
    g, n = env.g, len(src_ids)
    ids = torch.tensor(src_ids, device="cuda")
    out = torch.empty(n, g.num_layers, g.num_kv, g.block_size * g.num_heads * g.head_dim, dtype=torch.bfloat16,
                      device="cuda")
    host_rows = env.host.tensors[0].reshape(env.host.num_blocks, -1)

    def index_select():  # per (layer, kv) index_select into one contiguous tensor, then one copy to host [0, n)
        with torch.cuda.stream(lane.kernel_stream):
            for layer in range(g.num_layers):
                for kv in range(g.num_kv):
                    piece = env.gpu.piece_view(layer, kv).index_select(0, ids)  # [n, token, head, channel]
                    if env.order == HEAD_FIRST:
                        piece = piece.transpose(1, 2)
                    out[:, layer, kv] = piece.reshape(n, -1)
            host_rows[:n].copy_(out.view(n, -1), non_blocking=True)

    methods["peer_index_select_copy"] = (index_select, list(range(n)))
    return methods


def measure(env: Env, name: str, fn, direction: str, s_ids, d_ids, reps: int, ceiling_copy) -> dict:
    """Time one method, each repetition right after one ceiling copy (`ceiling_copy()`, a plain pinned memcpy of
    CEILING_BYTES in the same direction), check its bytes, and make a result row. The percentage of the ceiling is
    the median of the paired ratios: PCIe throughput drifts by a few percent within a run, and pairing keeps that
    drift out of the comparison."""
    if direction == "h2d":
        fill(env.host, len(s_ids) + reps)  # fresh random source bytes for each method
    n = len(s_ids)
    burst = max(1, CEILING_BYTES // (n * env.g.block_bytes))  # back-to-back transfers per timing
    one = timed(fn, 1, warmup=1)[0]  # warm (kernels compiled), and a first look at the cost
    if one * burst * reps > SLOW_SECONDS:  # Python-driven per-piece methods on fine layouts: one timed burst
        reps, burst = 1, max(1, min(burst, int(SLOW_SECONDS / max(one, 1e-9))))
    t, c = paired_times(lambda: [fn() for _ in range(burst)], ceiling_copy, reps)
    t = [x / burst for x in t]
    ok = check(env, direction, s_ids, d_ids)
    sec = statistics.median(t)
    gbps = n * env.g.block_bytes / sec / 1e9
    pct = paired_percent(t, c, n * env.g.block_bytes, CEILING_BYTES)
    log(f"  {direction} n={n:5d} {name:24s} {gbps:7.2f} GB/s {pct:6.1f}%{'' if ok else '  BYTES WRONG'}")
    return {"method": name, "layout": env.preset, "geometry": env.gname, "direction": direction, "blocks": n,
            "bytes": n * env.g.block_bytes, "burst": burst, "reps": reps, "seconds_median": sec, "seconds_min": min(t),
            "seconds_max": max(t), "gbps": gbps,
            "ceiling_gbps_paired_median": CEILING_BYTES / statistics.median(c) / 1e9, "pct_of_ceiling": pct,
            "bytes_ok": ok}


def paired_times(fn, ceiling_fn, reps: int) -> tuple[list[float], list[float]]:
    """Wall seconds of `fn()` and of `ceiling_fn()` run just before it, `reps` pairs (see `timed`)."""
    t, c = [], []
    for _ in range(reps):
        c.append(timed(ceiling_fn, 1, warmup=0)[0])
        t.append(timed(fn, 1, warmup=0)[0])
    return t, c


def paired_percent(times, ceiling_times, nbytes: int, ceiling_bytes: int) -> float:
    """Median over the pairs of `paired_times` of (throughput moving `nbytes` / throughput of the ceiling copy of
    `ceiling_bytes` just before it), in percent."""
    return 100 * statistics.median((nbytes / t) / (ceiling_bytes / c) for t, c in zip(times, ceiling_times))


def check(env: Env, direction: str, src_ids, dst_ids) -> bool:
    """Byte-compare the destination blocks with a torch reference copy."""
    torch.cuda.synchronize()
    if direction == "d2h":
        copy_blocks(env.gpu, env.host_ref, src_ids, dst_ids, backend="torch")
        a = env.host.tensors[0].view(torch.uint8)[dst_ids]
        b = env.host_ref.tensors[0].view(torch.uint8)[dst_ids]
        return bool(torch.equal(a, b))
    ref = block_major(torch.empty(len(dst_ids), *env.shape, dtype=env.dtype, device="cuda"), env.order)
    copy_blocks(env.gpu, ref, dst_ids, list(range(len(dst_ids))), backend="torch")
    exp = env.host.tensors[0].view(torch.uint8)[src_ids].to("cuda")
    return bool(torch.equal(ref.tensors[0].view(torch.uint8), exp))


def run_gpu(args, save=lambda partial: None) -> dict:
    from kvbm.kernels.transfer import TransferEngine

    rows, extra = [], {}
    engine = TransferEngine("cuda", staging_bytes=args.staging_mib << 20)
    transfers = Transfers(device=torch.device("cuda", torch.cuda.current_device()))
    pin_calling_thread(args.pin_thread)
    big_h = torch.empty(CEILING_BYTES, dtype=torch.uint8).pin_memory()
    big_d = torch.randint(0, 255, (CEILING_BYTES,), dtype=torch.uint8, device="cuda")
    big_d2 = torch.empty_like(big_d)
    ceiling_copy = {"d2h": lambda: big_h.copy_(big_d, non_blocking=True),
                    "h2d": lambda: big_d.copy_(big_h, non_blocking=True)}
    d2h = statistics.median(timed(ceiling_copy["d2h"], 10))
    h2d = statistics.median(timed(ceiling_copy["h2d"], 10))
    d2d = statistics.median(timed(lambda: big_d2.copy_(big_d), 20))
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    big_h2 = torch.empty_like(big_h).pin_memory()

    def both():
        with torch.cuda.stream(s1):
            big_h.copy_(big_d, non_blocking=True)
        with torch.cuda.stream(s2):
            big_d2.copy_(big_h2, non_blocking=True)

    bidir = statistics.median(timed(both, 10))
    ceil = {"d2h": CEILING_BYTES / d2h / 1e9, "h2d": CEILING_BYTES / h2d / 1e9, "d2d": 2 * CEILING_BYTES / d2d / 1e9,
            "bidirectional": 2 * CEILING_BYTES / bidir / 1e9}
    extra["ceilings_gbps"] = ceil
    log(f"ceilings GB/s: {json.dumps({k: round(v, 1) for k, v in ceil.items()})}")
    rng = np.random.default_rng(0)
    for preset, gname in [(p, gn) for p, gn in LAYOUTS if p in args.layouts.split(",")]:
        g = GEOMETRIES[gname]
        max_n = max(args.batches) if not args.quick else 256
        env = Env(preset, gname, host_blocks=max_n, gpu_blocks=max(2 * max_n, 2048 if gname == "llama8b" else 1100))
        log(f"layout {preset} ({gname}, {g.block_bytes / 2**20:.2f} MiB/block)")
        for n in [b for b in args.batches if b <= max_n and "transfers" in args.sections]:
            # int64 arrays, as the peers' rows get their piece arrays ready-made (a list costs ~40 ns an id to convert)
            gpu_ids = rng.choice(env.gpu.num_blocks, n, replace=False)
            host_ids = rng.choice(env.host.num_blocks, n, replace=False)
            reps = {1: 5, 16: 9}.get(n, 7)  # odd: the median is one measured pair
            for direction in ("d2h", "h2d"):
                s_ids, d_ids = (gpu_ids, host_ids) if direction == "d2h" else (host_ids, gpu_ids)
                move = engine.offload if direction == "d2h" else engine.onboard
                src, dst = (env.gpu, env.host) if direction == "d2h" else (env.host, env.gpu)
                for name, path, options in OUR_METHODS:
                    if name == "kvbm_staged_copy_engine" and not copy_engine_ok(env):
                        continue
                    fn = lambda path=path, options=options: move(src, dst, s_ids, d_ids, path=path, **options)  # noqa
                    rows.append(measure(env, name, fn, direction, s_ids, d_ids, reps, ceiling_copy[direction]))
                # the library's one face: Transfers.submit routes by medium to the same staged path
                fn = lambda: transfers.submit(src, dst, s_ids, d_ids)  # noqa: E731
                rows.append(measure(env, "kvbm_submit", fn, direction, s_ids, d_ids, reps, ceiling_copy[direction]))
                for name, (fn, written) in peer_methods(env, engine, direction, s_ids, d_ids).items():
                    rows.append(measure(env, name, fn, direction, s_ids, written, reps, ceiling_copy[direction]))
            # the gather kernel alone: GPU cache -> device staging, bytes read + written, timed with CUDA events
            rows.append(kernel_alone(env, gpu_ids, ceil))
        if preset == "vllm_flash_attn_nhd":
            if "enqueue" in args.sections:
                extra["enqueue_us"] = enqueue_cost(env, engine)
            if "latency" in args.sections:
                extra["latency_one_block_us"] = one_block_latency(env, engine)
            if "bidirectional" in args.sections:
                extra["bidirectional"] = bidirectional(env, engine, both)
            if "interference" in args.sections:
                extra["interference"] = interference(env, engine, args)
        env.close()
        save({"rows": rows, **extra})  # keep what is measured so far if a later layout is cut short
    if "pieces" in args.sections:
        rows += piece_sweep(engine, transfers, ceiling_copy, rng)
        save({"rows": rows, **extra})
    return {"rows": rows, **extra}


def piece_sweep(engine, transfers, ceiling_copy, rng) -> list[dict]:
    """The staged path and the one face over piece sizes of 2-128 KiB (`PIECE_SWEEP`): one transfer of 256 blocks
    and bursts of 16-block transfers (those also through the zero-copy kernel), both directions, each paired with
    the same run's pinned memcpy."""
    rows = []
    for gname in PIECE_SWEEP:
        env = Env("vllm_flash_attn_nhd", gname, host_blocks=256, gpu_blocks=1024)
        log(f"piece sweep {gname} ({env.g.block_bytes // 1024} KiB/block)")
        for n in (16, 256):
            gpu_ids = rng.choice(env.gpu.num_blocks, n, replace=False)
            host_ids = rng.choice(env.host.num_blocks, n, replace=False)
            for direction in ("d2h", "h2d"):
                s_ids, d_ids = (gpu_ids, host_ids) if direction == "d2h" else (host_ids, gpu_ids)
                move = engine.offload if direction == "d2h" else engine.onboard
                src, dst = (env.gpu, env.host) if direction == "d2h" else (env.host, env.gpu)
                methods = [("kvbm_staged", lambda: move(src, dst, s_ids, d_ids, path="staged")),
                           ("kvbm_submit", lambda: transfers.submit(src, dst, s_ids, d_ids))]
                if n == 16:  # the kernel over UVA, no DMA: do bursts of small pieces do better without the copy engine?
                    methods.append(("kvbm_zero_copy", lambda: move(src, dst, s_ids, d_ids, path="zero_copy")))
                for name, fn in methods:
                    rows.append(measure(env, name, fn, direction, s_ids, d_ids, 7, ceiling_copy[direction]))
        env.close()
    return rows


def kernel_alone(env: Env, gpu_ids, ceil) -> dict:
    """The gather kernel on its own (ids already on the device), median of CUDA-event timings."""
    import triton.testing

    from kvbm.kernels.copy_plan import build_plan
    from kvbm.kernels.triton_copy import launch

    n = len(gpu_ids)
    staging = block_major(torch.empty(n, *env.shape, dtype=env.dtype, device="cuda"), env.order)
    plan = build_plan(env.gpu, staging)
    src = torch.tensor(gpu_ids, dtype=torch.int64, device="cuda")
    dst = torch.arange(n, dtype=torch.int64, device="cuda")
    ms = triton.testing.do_bench(lambda: launch(plan, src, dst), warmup=25, rep=200, return_mode="median")
    gbps = 2 * n * env.g.block_bytes / (ms / 1e3) / 1e9
    ok = check_gather(env, staging, gpu_ids)
    log(f"  gather kernel n={n:5d} {gbps:8.1f} GB/s {100 * gbps / ceil['d2d']:6.1f}% of D2D")
    return {"method": "kvbm_gather_kernel", "layout": env.preset, "geometry": env.gname, "direction": "d2d",
            "blocks": n, "bytes": n * env.g.block_bytes, "seconds_median": ms / 1e3, "gbps": gbps,
            "pct_of_ceiling": 100 * gbps / ceil["d2d"], "bytes_ok": ok}


def check_gather(env: Env, staging, gpu_ids) -> bool:
    ref = block_major(torch.empty(len(gpu_ids), *env.shape, dtype=env.dtype, device="cuda"), env.order)
    copy_blocks(env.gpu, ref, gpu_ids, list(range(len(gpu_ids))), backend="torch")
    return bool(torch.equal(ref.tensors[0].view(torch.uint8), staging.tensors[0].view(torch.uint8)))


def enqueue_cost(env: Env, engine) -> dict:
    """Host time of one offload / onboard call (validation with ids given as lists, planning, launches; not the
    copy), median of 50."""
    out = {}
    for n in (1, 16, 256):
        for path in ("staged", "zero_copy", "auto"):
            for direction, move, src, dst in (("d2h", engine.offload, env.gpu, env.host),
                                              ("h2d", engine.onboard, env.host, env.gpu)):
                ids = list(range(n))
                t = []
                for _ in range(55):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    move(src, dst, ids, ids, path=path)
                    t.append(time.perf_counter() - t0)
                out[f"{path}_{direction}_{n}"] = statistics.median(t[5:]) * 1e6
    log(f"host enqueue per call (us): {json.dumps({k: round(v, 1) for k, v in out.items()})}")
    return out


def one_block_latency(env: Env, engine) -> dict:
    """Round trip (D2H then H2D) of one block of all layers: our paths against the per-piece loop."""
    out = {}
    for path in ("staged", "zero_copy"):
        def rt(path=path):
            engine.offload(env.gpu, env.host, [5], [0], path=path).wait()
            engine.onboard(env.host, env.gpu, [0], [6], path=path).wait()
        out[f"kvbm_{path}"] = statistics.median(timed(rt, 50)) * 1e6
    m_d2h = peer_methods(env, engine, "d2h", [5], [0])["peer_memcpy_loop"][0]
    m_h2d = peer_methods(env, engine, "h2d", [0], [6])["peer_memcpy_loop"][0]

    def loop_rt():
        m_d2h()
        torch.cuda.synchronize()
        m_h2d()
    out["peer_memcpy_loop"] = statistics.median(timed(loop_rt, 50)) * 1e6
    log(f"one-block round trip (us): {json.dumps({k: round(v, 1) for k, v in out.items()})}")
    return out


def bidirectional(env: Env, engine, both_ceiling) -> dict:
    """Offload and onboard at once (separate lanes), each moving the ceiling's bytes: total GB/s against two plain
    copies at once (`both_ceiling()`), issued as two calls and as one `submit`."""
    from kvbm.kernels.transfer import TransferSpec

    n = CEILING_BYTES // env.g.block_bytes  # blocks each way
    rng = np.random.default_rng(1)
    a = rng.choice(env.gpu.num_blocks // 2, n, replace=False)
    b = env.gpu.num_blocks // 2 + rng.choice(env.gpu.num_blocks // 2, n, replace=False)
    h = rng.permutation(env.host.num_blocks)[: 2 * n]
    h1, h2 = h[:n], h[n:]

    def calls():  # one call after the other: the onboard starts once the whole offload is enqueued
        x = engine.offload(env.gpu, env.host, a, h1, path="staged")
        y = engine.onboard(env.host, env.gpu, h2, b, path="staged")
        x.wait()
        y.wait()

    def submitted():  # one submission: the two transfers' chunks enqueued in turn
        for handle in engine.submit([TransferSpec("d2h", env.gpu, env.host, a, h1, "staged"),
                                     TransferSpec("h2d", env.host, env.gpu, h2, b, "staged")]):
            handle.wait()

    res = {"blocks_each_way": n}
    for name, fn in (("", calls), ("_submit", submitted)):
        fn()  # warm
        t, c = paired_times(fn, both_ceiling, 9)  # each timing right after two plain copies at once (see `measure`)
        gbps = 2 * n * env.g.block_bytes / statistics.median(t) / 1e9
        pct = paired_percent(t, c, 2 * n * env.g.block_bytes, 2 * CEILING_BYTES)
        res[f"gbps_total{name}"] = gbps
        res[f"pct_of_bidirectional_ceiling{name}"] = pct
        res[f"bidirectional_ceiling_gbps_paired_median{name}"] = 2 * CEILING_BYTES / statistics.median(c) / 1e9
        log(f"bidirectional ({'one submit' if name else 'two calls'}): {gbps:.1f} GB/s total, {pct:.1f}% of two "
            f"plain copies at once timed just before each")
    return res


def interference_variants(engine, args) -> dict:
    """name -> (engine, path, options) of the offloads measured beside the GEMM."""
    from kvbm.kernels.transfer import TransferEngine

    normal = TransferEngine("cuda", staging_bytes=args.staging_mib << 20, kernel_priority=0)
    four_slots = TransferEngine("cuda", staging_bytes=args.staging_mib << 20, staging_slots=4)
    return {"staged": (engine, "staged", {}), "staged_normal_priority": (normal, "staged", {}),
            "staged_4_slots": (four_slots, "staged", {}), "staged_cap_32_ctas": (engine, "staged", {"max_ctas": 32}),
            "zero_copy": (engine, "zero_copy", {})}


def interference(env: Env, engine, args) -> dict:
    """GEMM throughput alone and beside a stream of 256-block offloads for each path, interleaved and repeated."""
    n_mat = 8192
    x = torch.randn(n_mat, n_mat, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(n_mat, n_mat, dtype=torch.bfloat16, device="cuda")
    flops = 2 * n_mat ** 3
    n = 256
    ids = list(range(n))
    plain_src = torch.empty(n * env.g.block_bytes, dtype=torch.uint8, device="cuda")
    plain_dst = env.buffer.tensor(torch.uint8)[: n * env.g.block_bytes]
    dma_stream = torch.cuda.Stream()
    # The offloaded blocks were written before the loop: an offload waits for the caller's current stream (the
    # stream that wrote its blocks), so it is issued from an idle one. From the GEMM's stream it would wait for
    # every GEMM the host has queued ahead (two batches here), as an engine's offload waits only for the forward
    # pass that wrote its blocks, not for work queued after it.
    producer = torch.cuda.Stream()
    variants = interference_variants(engine, args)

    def background(kind):
        if kind == "alone":
            return None
        if kind == "plain_dma":
            with torch.cuda.stream(dma_stream):
                plain_dst.copy_(plain_src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(dma_stream)
            return ev
        eng, path, options = variants[kind]
        with torch.cuda.stream(producer):
            return eng.offload(env.gpu, env.host, ids, ids, path=path, **options).event

    def gemm_rate(kind, seconds=1.0):
        """GEMM TFLOP/s over the time its batches ran (CUDA events per batch of 4), with the GPU kept fed: the
        host waits only for the batch two back, and keeps IN_FLIGHT transfers queued so the copy engine never
        waits for the host to notice a finished one."""
        torch.cuda.synchronize()
        done_bytes, batches = 0, []
        pending = [] if kind == "alone" else [background(kind) for _ in range(IN_FLIGHT)]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            if len(batches) >= 2:
                batches[-2][1].synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(4):
                torch.mm(x, y)
            end.record()
            batches.append((start, end))
            while pending and pending[0].query():
                done_bytes += n * env.g.block_bytes
                pending = pending[1:] + [background(kind)]
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        busy = sum(a.elapsed_time(b) for a, b in batches) / 1e3
        return 4 * len(batches) * flops / busy / 1e12, done_bytes / wall / 1e9

    kinds = ["alone", "plain_dma", *variants]
    for _ in range(2):
        torch.mm(x, y)
    results = {k: {"tflops": [], "transfer_gbps": []} for k in kinds}
    for _ in range(args.interference_reps):
        for k in kinds:
            tf, bw = gemm_rate(k)
            results[k]["tflops"].append(tf)
            results[k]["transfer_gbps"].append(bw)
    summary = {}
    plain = statistics.median(results["plain_dma"]["tflops"])
    for k in kinds:
        tf = results[k]["tflops"]
        summary[k] = {"tflops_median": statistics.median(tf), "tflops_min": min(tf), "tflops_max": max(tf),
                      "pct_of_gemm_beside_plain_dma": 100 * statistics.median(tf) / plain,
                      "transfer_gbps_median": statistics.median(results[k]["transfer_gbps"]), "runs": tf}
        log(f"interference {k:10s}: GEMM {summary[k]['tflops_median']:.0f} TFLOP/s "
            f"({summary[k]['pct_of_gemm_beside_plain_dma']:.1f}% of beside plain DMA; "
            f"spread {min(tf):.0f}-{max(tf):.0f}), transfer {summary[k]['transfer_gbps_median']:.1f} GB/s")
    return summary


#: Layouts and block counts of the CPU run (no GPU): 8 layers of Llama-3.1-8B, 512 KiB blocks.
CPU_LAYOUTS = ("vllm_flash_attn_nhd", "vllm_flash_attn_hnd", "vllm_flashinfer_nhd", "trtllm_pool", "vllm_lbnhc")
CPU_GEOMETRY = KVGeometry(8, 2, 16, 8, 128, 2)


def cpu_copy_is_exact(src, dst, s_ids: list[int], d_ids: list[int], before: list[torch.Tensor]) -> bool:
    """Whether `dst` holds, piece by piece, the torch reference copy of `src`'s blocks `s_ids` at `d_ids` over the
    poisoned bytes `before` (its integer piece views before the copy), and `before` everywhere else."""
    g = src.geometry
    k = 0
    for layer in range(g.num_layers):
        for kv in range(g.num_kv):
            want = before[k].clone()
            want.index_copy_(0, torch.tensor(d_ids), src.piece_view(layer, kv, torch.int16)[s_ids])
            if not torch.equal(dst.piece_view(layer, kv, torch.int16), want):
                return False
            k += 1
    return True


def run_cpu(args) -> dict:
    """No GPU: time the numba backend against the torch reference at small sizes, checking every copy's bytes."""
    import numba

    threads = min(args.cpu_threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    log(f"no CUDA GPU: numba CPU backend against the torch reference, 8-layer Llama-3.1-8B blocks, "
        f"{args.cpu_reps} timings each (min / median / max); numba on {threads} thread(s) of "
        f"{numba.config.NUMBA_NUM_THREADS} (--cpu-threads; with every core of a loaded small machine, numba's "
        f"threads can wait milliseconds per call for a core)")
    rows = []
    g = CPU_GEOMETRY
    for preset in CPU_LAYOUTS:
        src = allocate(preset, g, 512, dtype=torch.bfloat16)
        fill(src, 3)
        for n in (1, 16, 256):
            dst = allocate("kvbm_staging", g, n + 3, dtype=torch.bfloat16)  # 3 blocks the copy must not touch
            rng = np.random.default_rng(n)
            s_ids = rng.choice(512, n, replace=False).tolist()
            d_ids = rng.choice(n + 3, n, replace=False).tolist()
            for backend in ("numba", "torch"):
                fill(dst, 1000 + n)  # poison: random non-zero bytes
                before = [dst.piece_view(layer, kv, torch.int16).clone()
                          for layer in range(g.num_layers) for kv in range(g.num_kv)]
                copy_blocks(src, dst, s_ids, d_ids, backend=backend)
                ok = cpu_copy_is_exact(src, dst, s_ids, d_ids, before)
                t = []
                for _ in range(args.cpu_reps):
                    t0 = time.perf_counter()
                    copy_blocks(src, dst, s_ids, d_ids, backend=backend)
                    t.append(time.perf_counter() - t0)
                sec = statistics.median(t)
                gbps = n * g.block_bytes / sec / 1e9
                rows.append({"method": f"cpu_{backend}", "layout": preset, "geometry": "llama8b-8layers",
                             "direction": "gather", "blocks": n, "bytes": n * g.block_bytes, "reps": len(t),
                             "seconds_median": sec, "seconds_min": min(t), "seconds_max": max(t), "gbps": gbps,
                             "pct_of_ceiling": None, "bytes_ok": ok, "numba_threads": threads})
                log(f"{preset:22s} n={n:4d} {backend:6s} {gbps:6.2f} GB/s  ms min/median/max "
                    f"{1e3 * min(t):.3f} / {1e3 * sec:.3f} / {1e3 * max(t):.3f}{'' if ok else '  BYTES WRONG'}")
    return {"rows": rows, "numba_threads": threads}


def table(result: dict) -> str:
    lines = ["| layout | dir | blocks | method | GB/s | ms min / median / max | % of ceiling | bytes ok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        pct = "" if r["pct_of_ceiling"] is None else f"{r['pct_of_ceiling']:.1f}"
        spread = " / ".join(f"{1e3 * r[k]:.3f}" for k in ("seconds_min", "seconds_median", "seconds_max") if k in r)
        lines.append(f"| {r['layout']} | {r['direction']} | {r['blocks']} | {r['method']} | {r['gbps']:.2f} | "
                     f"{spread} | {pct} | {'yes' if r['bytes_ok'] else 'NO'} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str | None:
    """Draw GB/s against blocks per transfer, one panel per layout and direction, into `path`. Returns why no plot
    was drawn (None when it was)."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directions = [d for d in ("d2h", "h2d", "gather") if any(r["direction"] == d for r in result["rows"])]
    rows = [r for r in result["rows"] if r["direction"] in directions]
    if not rows:
        return "no transfer rows to plot"
    layouts = sorted({r["layout"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    colors = {m: plt.get_cmap("tab10")(k % 10) for k, m in enumerate(methods)}  # one color per method in every panel
    fig, axes = plt.subplots(len(directions), len(layouts), figsize=(4 * len(layouts), 3.5 * len(directions) + 0.5),
                             squeeze=False, sharey=True)
    for j, layout in enumerate(layouts):
        for i, direction in enumerate(directions):
            ax = axes[i][j]
            for method in methods:
                pts = sorted((r["blocks"], r["gbps"]) for r in rows
                             if r["layout"] == layout and r["direction"] == direction and r["method"] == method)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method, color=colors[method],
                            linestyle="-" if method.startswith(("kvbm", "cpu_numba")) else "--")
            ceiling = result.get("ceilings_gbps", {}).get(direction)
            if ceiling:
                ax.axhline(ceiling, color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{layout} {direction}", fontsize=9)
            ax.set_xlabel("blocks per transfer")
            if j == 0:
                ax.set_ylabel("GB/s")
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="lower center", ncol=min(len(handles), 5))
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # room below the panels for the legend of every method
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def block_counts(text: str) -> list[int]:
    """`--batches`: comma-separated positive block counts."""
    try:
        counts = [int(b) for b in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return counts


def allowed_cpu(text: str) -> int:
    """argparse type of --pin-thread: a CPU this process may run on."""
    try:
        cpu = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a CPU number, got {text!r}") from None
    allowed = sorted(os.sched_getaffinity(0))
    if cpu not in allowed:
        raise argparse.ArgumentTypeError(f"CPU {cpu} is not one this process may run on ({allowed[0]}-{allowed[-1]})")
    return cpu


def pin_calling_thread(cpu: int | None) -> None:
    """Keep the thread that enqueues transfers on one CPU (called once CUDA is up, so the driver's own threads keep
    every CPU). With the enqueue in Python, on the H200 machine, a thread left free to migrate started a 256-block
    transfer's first DMA 0.5-0.7 ms after the call, a pinned one 0.44 ms after."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # pid 0: the calling thread only


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results", help="folder for JSON, table and plot")
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--staging-mib", type=int, default=256, help="device staging per direction (MiB)")
    ap.add_argument("--interference-reps", type=int, default=5)
    ap.add_argument("--sections", default="transfers,enqueue,latency,bidirectional,interference,pieces",
                    help="comma-separated: transfers, enqueue, latency, bidirectional, interference, pieces")
    ap.add_argument("--layouts", default=",".join(p for p, _ in LAYOUTS), help="comma-separated presets to run")
    ap.add_argument("--batches", type=block_counts, default=BATCHES, help="comma-separated blocks per transfer")
    ap.add_argument("--pin-thread", type=allowed_cpu, default=None, metavar="CPU",
                    help="pin the benchmark's enqueueing thread to this CPU once CUDA is up (default: not pinned)")
    ap.add_argument("--stem", default=None, help="file name stem of the results (default from the device)")
    ap.add_argument("--cpu-threads", type=int, default=1, metavar="N",
                    help="numba threads for the CPU run (default 1; 0: numba's default, one per core)")
    ap.add_argument("--cpu-reps", type=int, default=7, help="timings per row of the CPU run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    import triton

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if gpu else None, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "pinned_thread_cpu": args.pin_thread,
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench.transfer_bench", *(argv or sys.argv[1:])]),
        "commit": checkout_commit(Path(__file__).resolve().parents[1]),
    }
    default_stem = "transfer_h200" if gpu and "H200" in meta["gpu"] else ("transfer_gpu" if gpu else "transfer_cpu")
    stem = args.stem or default_stem

    def save(partial: dict) -> None:
        (out / f"{stem}.json").write_text(json.dumps({**partial, "meta": meta}, indent=1))

    result = run_gpu(args, save) if gpu else run_cpu(args)
    result["meta"] = meta
    save(result)
    md = table(result)
    (out / f"{stem}.md").write_text(f"# {stem}\n\n{json.dumps(result['meta'])}\n\n{md}\n")
    print(md)
    why_not = plot(result, out / f"{stem}.png")
    log(f"wrote {out / stem}.json, .md" + (" and .png" if why_not is None else f"; no plot: {why_not}"))
    ok = all(r["bytes_ok"] for r in result["rows"])
    if not ok:
        log("BYTES WRONG in at least one row (see the bytes ok column)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
