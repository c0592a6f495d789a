"""The G3 disk tier through kvbm's transfer paths against the raw O_DIRECT bandwidth of the same disk, one run.

    python -m bench.g3_bench --dir /path/on/the/disk [--gib 1] [--repeat 3] [--out DIR]

Rows (every read byte-checked against what was written; slots are checksummed and bound to a block tag, as the
tier stores them):
  raw              sequential O_DIRECT pwrite / preadv of 16 MiB requests from page-aligned memory (the ceiling)
  G1->G3, G3->G1   a GPU cache (vLLM FlashAttention layout) to and from the disk tier, for each disk I/O path:
                   cuFile (GPUDirect Storage; where it cannot run here, the row says why) and POSIX (O_DIRECT
                   through pinned bounce buffers); random block ids
  G2->G3, G3->G2   a pinned host tier to and from the disk tier, block-sized slots, for each --slot-kib (the
                   cascade's path): "in order" (block i in slot i), "shuffled" (a permutation of the host blocks
                   into a permutation of the slots: sorted by slot, the I/O is still one run), "scatter" (the same
                   into a random half of a file twice as large: runs of about two slots, gaps between them)
  raw in/sh/sc     beside each of those: the disk's own bandwidth for the same requests (the slots sorted per
                   batch, consecutive slots joined up to the tier's 4 MiB requests, as many in flight as the tier's
                   file runs at once (its I/O threads, 16); O_DIRECT pwrite / preadv, no checksums, no copies): what
                   the tier's pattern allows on this disk. Each tier row's "% of the same requests raw" divides by
                   the raw row timed right after it
Without a GPU the G1 rows use a CPU cache of the same layout (path "cpu": the host <-> disk path through bounce
chunks, with a layout conversion per I/O request). Each path (both directions) is warmed up with a one-block
transfer first (the first read of a process compiles the bounce-to-host copy: timed inside the in-order read, it
cut that row to a quarter of raw or less; the GPU paths build the transfer engine, whose compiled enqueue takes
seconds). Writes are timed until their transfer reports done (then fsync), reads until the bytes are in the
destination. GB/s are 1e9 bytes/s; "% raw" compares with the raw row of the same direction. With --repeat N every
case (raw included) runs N times in rounds, so that drift of a shared disk touches all cases alike; the table
shows medians and the range of the runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.disk_bench import random_mmap, raw_case, raw_pattern_case, slot_runs
from kvbm.kernels.disk_cache import DiskKVCache
from kvbm.kernels.medium import Medium
from kvbm.kernels.paths.host_disk import batch_blocks, direct_array
from kvbm.kernels.transfers import Transfers
from kvbm.layouts import KVGeometry, allocate, copy_blocks
from kvbm.tiers import TierSpec
from kvbm.tools.checkout import checkout_commit
from kvbm.worker.tier_memory import allocate_tier, close_tier

MiB = 1 << 20
#: The disk tier's largest request (`DiskBlockFile`).
MAX_IO_BYTES = 4 * MiB
#: Blocks of a bounce chunk in the host <-> disk rows.
HOST_BATCH = 256
#: Llama-3.1-8B: 32 layers x K/V x 16 tokens x 8 heads x 128 channels x bf16 = 2 MiB per block.
LLAMA8B = KVGeometry(num_layers=32, num_kv=2, block_size=16, num_heads=8, head_dim=128, itemsize=2)


def log(msg: str) -> None:
    print(f"[g3 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def geometry_for_slot(kib: int) -> KVGeometry:
    """A geometry whose blocks are ``kib`` KiB (2 layers x K/V x 16 tokens x heads x 64 channels x bf16)."""
    heads = kib * 1024 // (2 * 2 * 16 * 64 * 2)
    if heads < 1:
        raise ValueError(f"slot size {kib} KiB is below 8 KiB")
    return KVGeometry(num_layers=2, num_kv=2, block_size=16, num_heads=heads, head_dim=64, itemsize=2)


def fill_random(cache, seed: int) -> None:
    gen = torch.Generator(device=cache.device).manual_seed(seed)
    for t in cache.tensors:
        v = t.view(torch.int16)
        v.copy_(torch.randint(-2**15, 2**15, v.shape, dtype=torch.int16, device=cache.device, generator=gen))


def same_blocks(a, a_ids, b, b_ids) -> bool:
    """Blocks a_ids of a equal blocks b_ids of b (through a CPU staging copy of each)."""
    g = a.geometry
    ref_a = allocate("kvbm_staging", g, num_blocks=len(a_ids), dtype=a.dtype, device="cpu")
    ref_b = allocate("kvbm_staging", g, num_blocks=len(b_ids), dtype=b.dtype, device="cpu")
    copy_blocks(a, ref_a, a_ids, range(len(a_ids)), backend="torch")
    copy_blocks(b, ref_b, b_ids, range(len(b_ids)), backend="torch")
    return all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(ref_a.tensors, ref_b.tensors))


def timed_transfer(transfers: Transfers, src, dst, s_ids, d_ids, tags, fsync_fd: int | None) -> tuple[float, dict]:
    t0 = time.perf_counter()
    transfer = transfers.submit(src, dst, s_ids, d_ids, tags=tags)
    transfer.wait()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if fsync_fd is not None:
        os.fsync(fsync_fd)
    return time.perf_counter() - t0, transfer.reasons


def row(kind: str, path: str, direction: str, nbytes: int, seconds: float | None, ok: bool | None, raw: dict,
        note: str = "") -> dict:
    """One measurement, logged against this round's raw figure of its direction."""
    gbps = nbytes / seconds / 1e9 if seconds else None
    ceiling = raw.get("write" if direction == "write" else "read")
    pct = 100 * gbps / ceiling if gbps and ceiling else None
    shown = f"{gbps:6.2f} GB/s {pct:6.1f}% raw" if gbps else f"n/a ({note})"
    log(f"  {kind:16s} {path:6s} {shown}{'' if ok in (True, None) else '  BYTES WRONG'}")
    return {"case": kind, "path": path, "direction": direction, "bytes": nbytes, "seconds": seconds, "gbps": gbps,
            "pct_of_raw": pct, "bytes_ok": ok, "note": note}


def summarize(runs: list[dict]) -> list[dict]:
    """Rows of the rounds merged per (case, path, direction): median GB/s against the median raw figure of the
    direction, the median of the rounds' percentages of the same requests raw (host <-> disk rows), the range of the
    runs, and bytes ok only if every run's were."""
    merged: dict[tuple[str, str, str], list[dict]] = {}
    for r in runs:
        merged.setdefault((r["case"], r["path"], r["direction"]), []).append(r)
    raw = {direction: statistics.median(x["gbps"] for x in rs) for (case, _, direction), rs in merged.items()
           if case == "raw"}
    out = []
    for (case, path, _), rs in merged.items():
        speeds = [r["gbps"] for r in rs if r["gbps"]]
        gbps = statistics.median(speeds) if speeds else None
        ceiling = raw.get(rs[0]["direction"])
        note = "; ".join(sorted({r["note"] for r in rs if r["note"]}))
        if len(speeds) > 1:
            note = f"runs {min(speeds):.2f}-{max(speeds):.2f}" + (f"; {note}" if note else "")
        oks = [r["bytes_ok"] for r in rs if r["bytes_ok"] is not None]
        same = [r["pct_of_same_requests"] for r in rs if "pct_of_same_requests" in r]
        out.append({"case": case, "path": path, "direction": rs[0]["direction"], "bytes": rs[0]["bytes"],
                    "runs": len(rs), "gbps": gbps, "gbps_runs": speeds,
                    "pct_of_raw": 100 * gbps / ceiling if gbps and ceiling else None,
                    "pct_of_same_requests": statistics.median(same) if same else None,
                    "bytes_ok": all(oks) if oks else None, "note": note})
    return out


def gpu_rows(args, raw: dict, rows: list) -> None:
    cuda = torch.cuda.is_available()
    n = int(args.gib * (1 << 30)) // LLAMA8B.block_bytes
    rng = np.random.default_rng(1)
    device = "cuda" if cuda else "cpu"
    g1 = allocate("vllm_flash_attn_nhd", LLAMA8B, num_blocks=2 * n, dtype=torch.bfloat16, device=device)
    fill_random(g1, 2)
    for mode in ("gds", "posix") if cuda else ("cpu",):
        try:
            transfers = Transfers(device=g1.device if cuda else None, disk_io="posix" if mode == "cpu" else mode,
                                  bounce_blocks=16, bounce_chunks=8)
            disk = DiskKVCache(args.dir, LLAMA8B, torch.bfloat16, n)
        except Exception as e:  # noqa: BLE001 - the row says why this path cannot run here
            rows.append(row("G1->G3", mode, "write", 0, None, None, raw, f"{type(e).__name__}: {e}"))
            continue
        try:
            ids = rng.permutation(2 * n)[:n]
            slots = rng.permutation(n)
            tags = [int(x) for x in rng.integers(1, 2**62, n)]
            try:  # warm-up first: the first GPU transfer builds the transfer engine (its compiled enqueue: seconds)
                transfers.submit(g1, disk, [0], [0], tags=[1]).wait()
                transfers.submit(disk, g1, [0], [1], tags=[1]).wait()
                sec, failed = timed_transfer(transfers, g1, disk, ids, slots, tags, disk.file.fileno())
            except Exception as e:  # noqa: BLE001
                rows.append(row("G1->G3", mode, "write", 0, None, None, raw, f"{type(e).__name__}: {e}"))
                continue
            rows.append(row("G1->G3", mode, "write", n * LLAMA8B.block_bytes, sec, not failed, raw,
                            f"{len(failed)} blocks failed" if failed else ""))
            dst = rng.permutation(2 * n)[:n]
            back = allocate("vllm_flash_attn_nhd", LLAMA8B, num_blocks=2 * n, dtype=torch.bfloat16, device=device)
            fill_random(back, 3)  # poison
            sec, failed = timed_transfer(transfers, disk, back, slots, dst, tags, None)
            ok = not failed and same_blocks(g1, ids, back, dst)
            rows.append(row("G3->G1", mode, "read", n * LLAMA8B.block_bytes, sec, ok, raw,
                            f"{len(failed)} blocks failed" if failed else ""))
            del back
        finally:
            transfers.close()
            disk.close()


def host_rows(args, raw: dict, rows: list) -> None:
    rng = np.random.default_rng(4)
    for kib in args.slot_kib:
        g = geometry_for_slot(kib)
        n = int(args.gib * (1 << 30)) // g.block_bytes
        host = allocate_tier(TierSpec("G2", Medium.HOST, n), g, torch.bfloat16)
        back = allocate_tier(TierSpec("G2", Medium.HOST, n), g, torch.bfloat16)
        fill_random(host, 5)
        try:
            for order in ("in order", "shuffled", "scatter"):
                with Transfers(bounce_blocks=HOST_BATCH, bounce_chunks=8) as transfers:
                    disk = DiskKVCache(args.dir, g, torch.bfloat16, 2 * n if order == "scatter" else n)
                    try:
                        transfers.submit(host, disk, [0], [0], tags=[1]).wait()  # warm-up: threads, bounce pool,
                        transfers.submit(disk, back, [0], [0], tags=[1]).wait()  # and the read path's first copy
                        ids = np.arange(n) if order == "in order" else rng.permutation(n)
                        slots = np.arange(n) if order == "in order" else rng.permutation(disk.num_blocks)[:n]
                        tags = [int(x) for x in rng.integers(1, 2**62, n)]
                        sec, failed = timed_transfer(transfers, host, disk, ids, slots, tags, disk.file.fileno())
                        wrote = row(f"G2->G3 {kib}K", order[:6], "write", n * g.block_bytes, sec, not failed, raw)
                        fill_random(back, 6)
                        sec, failed = timed_transfer(transfers, disk, back, slots, ids, tags, None)
                        ok = not failed and same_blocks(host, ids, back, ids)
                        read = row(f"G3->G2 {kib}K", order[:6], "read", n * g.block_bytes, sec, ok, raw)
                        rows += [wrote, read]
                        batch = batch_blocks(transfers, disk, direct_array(host, disk))  # (the tier's batches)
                        pattern = pattern_rows(args.dir, g.block_bytes, disk.num_blocks, slots, batch, order, kib,
                                               raw, rows, disk.file.io_threads)
                        for r in (wrote, read):  # against the same requests raw, right after, in the same round
                            if r["gbps"] and pattern[r["direction"]]:
                                r["pct_of_same_requests"] = 100 * r["gbps"] / pattern[r["direction"]]
                    finally:
                        disk.close()
        finally:
            close_tier(host)
            close_tier(back)


def pattern_rows(directory: str, slot_bytes: int, file_slots: int, slots: np.ndarray, batch: int, order: str,
                 kib: int, raw: dict, rows: list, in_flight: int) -> dict[str, float | None]:
    """The disk's own bandwidth for the slots' access pattern (`raw_pattern_case`: the tier's requests of batches of
    ``batch`` slots, ``in_flight`` at once as the tier's file runs them, no checksums, no host copies), as rows of
    path "raw" beside the tier's; returns their GB/s by direction."""
    runs = slot_runs(slots, slot_bytes, MAX_IO_BYTES, batch)
    total = slots.size * slot_bytes
    data, dst = random_mmap(total, np.random.default_rng(7)), mmap.mmap(-1, total)
    try:
        tw, tr, ok = raw_pattern_case(directory, data, dst, slot_bytes, file_slots, runs, in_flight)
    finally:
        del data, dst
    note = f"{len(runs)} requests of {total / len(runs) / 1024:.0f} KiB on average, {in_flight} in flight"
    wrote = row(f"G2->G3 {kib}K", f"raw {order[:2]}", "write", total, tw, ok, raw, note)
    read = row(f"G3->G2 {kib}K", f"raw {order[:2]}", "read", total, tr, ok, raw, note)
    rows += [wrote, read]
    return {"write": wrote["gbps"], "read": read["gbps"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="directory on the disk to measure")
    p.add_argument("--gib", type=float, default=1.0, help="bytes per case, GiB (default 1)")
    p.add_argument("--slot-kib", type=lambda s: [int(x) for x in s.split(",")], default=[64, 2048],
                   help="host <-> disk slot sizes, KiB (default 64,2048)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every case; the table shows medians (default 1)")
    p.add_argument("--out", default=None, help="folder for results.json and results.md (default bench/runs/...)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    if not Path(args.dir).is_dir():
        p.error(f"--dir {args.dir} is not a directory (the bench writes its files there)")
    out = Path(args.out or f"bench/runs/g3-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    total = max(1, int(args.gib * (1 << 30)) // (16 * MiB)) * 16 * MiB  # whole 16 MiB requests
    if not torch.cuda.is_available():
        log("no CUDA device: the G1 <-> G3 rows run on a CPU cache of the engine's layout (path \"cpu\")")
    runs: list[dict] = []
    for r in range(args.repeat):
        log(f"round {r + 1}/{args.repeat}: raw O_DIRECT, {args.gib} GiB in 16 MiB requests, in {args.dir}")
        data, dst = random_mmap(total, np.random.default_rng(0)), mmap.mmap(-1, total)
        tw, tr, ok = raw_case(args.dir, data, dst, total, 16 * MiB)
        raw = {"write": total / tw / 1e9, "read": total / tr / 1e9}
        runs += [row("raw", "odirect", "write", total, tw, ok, raw), row("raw", "odirect", "read", total, tr, ok, raw)]
        del data, dst
        gpu_rows(args, raw, runs)
        host_rows(args, raw, runs)
    rows = summarize(runs)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "commit": checkout_commit(Path(__file__).resolve().parents[1]),
            "command": " ".join([Path(sys.executable).name, "-m", "bench.g3_bench", *(argv or sys.argv[1:])]),
            "python": platform.python_version(), "torch": torch.__version__, "dir": args.dir}
    raw = {r["direction"]: r["gbps"] for r in rows if r["case"] == "raw"}
    (out / "results.json").write_text(json.dumps({"meta": meta, "raw_gbps": raw, "rows": rows, "runs": runs},
                                                 indent=1))
    lines = ["| case | path | GB/s | % of raw O_DIRECT | % of the same requests raw | bytes ok | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "" if r["pct_of_same_requests"] is None else f"{r['pct_of_same_requests']:.1f}"
        lines.append(f"| {r['case']} | {r['path']} | {r['gbps']:.2f} | {r['pct_of_raw']:.1f} | {same} | "
                     f"{'yes' if r['bytes_ok'] else 'NO'} | {r['note']} |" if r["gbps"] else
                     f"| {r['case']} | {r['path']} | n/a | n/a | | - | {r['note']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["bytes_ok"] in (True, None) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
