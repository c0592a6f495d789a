"""G4 onboard: blocks read from a peer's pinned G2 by NIXL (UCX) against a local G2 -> G1 onboard of the same bytes.

    python bench/remote_bench.py [--blocks 16,256] [--reps 7] [--out DIR]
    python bench/remote_bench.py --smoke --out DIR          # CPU: tiny blocks, G1 a host cache (run by a test)

Two processes on one machine (on a GPU machine both use the one GPU): a peer owns a pinned G2 pool of Llama-3.1-8B
blocks (2 MiB) behind its own NIXL agent; the reader (this process) holds a local G2 with the same bytes and a G1
in vLLM's FlashAttention layout. The peer's export travels over a multiprocessing pipe. Rows, per block count,
interleaved rep by rep (random source and destination ids, the same ids for every row of a rep):
  local G2->G1        Transfers.submit(local G2, G1): the onboard of a G2 hit (the reference)
  G4->G1              Transfers.submit(remote, G1): NIXL READ into pinned landing chunks, xxh3 verified, then the
                      same host -> GPU path
  G4->G1 unverified   the same without the checksum check (the cost of verifying)
  G4->G2              Transfers.submit(remote, another host cache): the read and a host copy
Times are medians over reps of submit -> every byte in place (CUDA synchronized); GB/s are 1e9 bytes/s; "% local" is
the median over reps of (local time / row time) of the same rep. The last rep's destination is byte-checked.
UCX picks its transports itself (on one machine: shared memory / CMA, cuda_ipc for GPU memory); set UCX_TLS to
force one (e.g. UCX_TLS=tcp to measure loopback TCP).
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

#: Llama-3.1-8B: 32 layers x K/V x 16 tokens x 8 heads x 128 channels x bf16 = 2 MiB per block.
LLAMA8B = dict(num_layers=32, num_kv=2, block_size=16, num_heads=8, head_dim=128, itemsize=2)
#: Smoke: 2 layers x K/V x 16 tokens x 2 heads x 64 channels x bf16 = 16 KiB per block.
SMOKE = dict(num_layers=2, num_kv=2, block_size=16, num_heads=2, head_dim=64, itemsize=2)


def log(msg: str) -> None:
    print(f"[g4 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _pool(geometry: dict, num_blocks: int, seed: int):
    """A pinned G2 cache (as kvbm allocates its host tier) filled with random bytes from ``seed``."""
    import torch

    from kvbm.kernels.medium import Medium
    from kvbm.layouts import KVGeometry
    from kvbm.tiers import TierSpec
    from kvbm.worker.tier_memory import allocate_tier

    cache = allocate_tier(TierSpec("G2", Medium.HOST, num_blocks), KVGeometry(**geometry), torch.bfloat16)
    flat = cache.tensors[0].view(-1).view(torch.int16)
    generator = torch.Generator().manual_seed(seed)
    flat.copy_(torch.randint(-2**15, 2**15, flat.shape, dtype=torch.int16, generator=generator))
    return cache


def peer_main(conn, geometry: dict, num_blocks: int, seed: int) -> None:
    """The peer: a G2 pool registered with its own agent; sends its export and checksums, waits for "stop"."""
    try:
        from kvbm.kernels.nixl_agent import NixlAgent

        cache = _pool(geometry, num_blocks, seed)
        agent = NixlAgent("bench-peer")
        agent.register_cache(cache, "G2")
        conn.send(("ready", agent.export(), agent.checksums("G2", range(num_blocks))))
        conn.recv()
        agent.close()
    except Exception as e:  # noqa: BLE001 - reported to the reader
        conn.send(("error", repr(e)))


def _rows(cache, ids) -> Any:
    """Blocks ``ids`` of any cache as bytes in block-major staging order (moved to the CPU)."""
    import torch

    g = cache.geometry
    idx = torch.as_tensor(list(ids), device=cache.device)
    parts = [cache.piece_view(layer, kv, torch.int16).index_select(0, idx).reshape(len(ids), -1)
             for layer in range(g.num_layers) for kv in range(g.num_kv)]
    return torch.cat(parts, dim=1).cpu()


def _time(fn, sync) -> tuple[float, Any]:
    sync()
    t0 = time.perf_counter()
    transfer = fn()
    transfer.wait()
    sync()
    return time.perf_counter() - t0, transfer


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    import kvbm.kernels.paths.remote  # noqa: F401  (registers the remote paths)
    from kvbm.kernels.nixl_agent import NixlAgent
    from kvbm.kernels.remote_cache import RemoteKVCache
    from kvbm.kernels.transfers import Transfers
    from kvbm.layouts import KVGeometry, allocate

    geometry = SMOKE if args.smoke else LLAMA8B
    g = KVGeometry(**geometry)
    n_max = max(args.blocks)
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    peer = ctx.Process(target=peer_main, args=(there, geometry, 2 * n_max, args.seed), daemon=True)
    peer.start()
    try:
        log(f"blocks of {g.block_bytes / 2**20:.3f} MiB, peer pool {2 * n_max} blocks, G1 on {device}")
        local_g2 = _pool(geometry, 2 * n_max, args.seed)  # the same bytes as the peer's pool
        landing_g2 = _pool(geometry, 2 * n_max, args.seed + 1)
        g1 = allocate("vllm_flash_attn_nhd", g, 2 * n_max, dtype=torch.bfloat16, device=device)
        agent = NixlAgent("bench-reader")
        if not here.poll(300):
            raise TimeoutError("the peer did not start within 300 s")
        msg = here.recv()
        if msg[0] != "ready":
            raise RuntimeError(f"peer failed: {msg[1]}")
        peer_info = agent.add_peer(msg[1])
        remote = RemoteKVCache(agent, peer_info, "G2", g, torch.bfloat16)
        remote.publish(msg[2])
        unverified = RemoteKVCache(agent, peer_info, "G2", g, torch.bfloat16, verify=False)
        rng = np.random.default_rng(args.seed)
        rows = []
        with Transfers() as transfers:
            cases = {"local G2->G1": (local_g2, g1), "G4->G1": (remote, g1), "G4->G1 unverified": (unverified, g1),
                     "G4->G2": (remote, landing_g2)}
            for n in args.blocks:
                times: dict[str, list[float]] = {c: [] for c in cases}
                ok: dict[str, bool] = {}
                for rep in range(args.reps + 1):  # rep 0 warms up
                    src = rng.choice(2 * n_max, n, replace=False)
                    dst = rng.choice(2 * n_max, n, replace=False)
                    for case, (s, d) in cases.items():
                        secs, transfer = _time(lambda: transfers.submit(s, d, src, dst), sync)
                        if not transfer.ok:
                            raise RuntimeError(f"{case}: {len(transfer.reasons)} blocks failed: "
                                               f"{next(iter(transfer.reasons.values()))}")
                        if rep:
                            times[case].append(secs)
                        if rep == args.reps:
                            ok[case] = bool(torch.equal(_rows(d, dst), _rows(local_g2, src)))
                nbytes = n * g.block_bytes
                for case in cases:
                    med = statistics.median(times[case])
                    pct = statistics.median(a / b * 100 for a, b in zip(times["local G2->G1"], times[case]))
                    rows.append({"case": case, "blocks": n, "bytes": nbytes, "median_s": med,
                                 "gbps": nbytes / med / 1e9, "pct_of_local": pct, "bytes_ok": ok[case],
                                 "times_s": times[case]})
                    log(f"{case:18s} {n:4d} blocks  {nbytes / med / 1e9:7.2f} GB/s  {pct:6.1f}% of local  "
                        f"bytes {'ok' if ok[case] else 'WRONG'}")
        here.send(("stop",))
        agent.close()
        return {"geometry": geometry, "block_bytes": g.block_bytes, "device": device, "rows": rows}
    finally:
        peer.join(10)
        if peer.is_alive():
            peer.terminate()
            peer.join(5)


def block_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=block_counts, default=None, help="block counts (default 16,256; smoke 4,16)")
    p.add_argument("--reps", type=int, default=None, help="timed reps per count (default 7; smoke 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: small blocks, G1 a host cache")
    p.add_argument("--out", default=None, help="folder for results.json and results.md (default bench/runs/...)")
    args = p.parse_args(argv)
    args.blocks = args.blocks or ([4, 16] if args.smoke else [16, 256])
    args.reps = args.reps or (2 if args.smoke else 7)
    out = Path(args.out or f"bench/runs/g4-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    import torch

    from kvbm.tools.checkout import checkout_commit

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name() if result["device"] == "cuda" else None,
            "commit": checkout_commit(Path(__file__).resolve().parents[1]),
            "command": " ".join([Path(sys.executable).name, "bench/remote_bench.py", *(argv or sys.argv[1:])]),
            "python": platform.python_version(), "torch": torch.__version__,
            "ucx_tls": os.environ.get("UCX_TLS"), "smoke": args.smoke}
    (out / "results.json").write_text(json.dumps({"meta": meta, **result}, indent=1))
    lines = [f"Blocks of {result['block_bytes'] / 2**20:.3f} MiB; G1 on {result['device']}; UCX_TLS="
             f"{meta['ucx_tls'] or '(UCX default)'}", "",
             "| case | blocks | GB/s | % of local G2->G1 | median ms | bytes ok |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['blocks']} | {r['gbps']:.2f} | {r['pct_of_local']:.1f} | "
                     f"{r['median_s'] * 1e3:.2f} | {'yes' if r['bytes_ok'] else 'NO'} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["bytes_ok"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
