"""Throughput of the G3 disk tier's slot checksums (seeded XXH3-64), per block with python-xxhash against the batch
call the tier makes (`kvbm.kernels.block_checksums.checksums`), on one and on two threads.

    python -m bench.checksum_bench [--mib 128] [--request-mib 4] [--repeats 9] [--json out.json]

For each block size (64 KiB, 2 MiB) the same ``--mib`` of random bytes (never zeros) are hashed four ways:
  python     xxhash.xxh3_64_intdigest per block (it releases the GIL only for inputs over 64 KiB)
  batch      one `checksums` call per ``--request-mib`` of blocks, as the disk threads call it per I/O request
each on 1 thread (all the blocks) and on 2 threads (half each, started together). GB/s is 1e9 bytes / s of the
best of ``--repeats`` runs (the median beside it); every way's sums are checked equal to the first way's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import xxhash

from kvbm.kernels import block_checksums
from kvbm.kernels.block_checksums import checksums

MiB = 1 << 20
BLOCKS = (64 << 10, 2 * MiB)


def by_python(rows: np.ndarray, seeds: np.ndarray, out: np.ndarray, rows_per_call: int) -> None:
    for i, seed in enumerate(seeds.tolist()):
        out[i] = xxhash.xxh3_64_intdigest(rows[i], seed=seed)


def by_batch(rows: np.ndarray, seeds: np.ndarray, out: np.ndarray, rows_per_call: int) -> None:
    for i in range(0, rows.shape[0], rows_per_call):
        out[i:i + rows_per_call] = checksums(rows[i:i + rows_per_call], rows.shape[1], seeds[i:i + rows_per_call])


def run_threads(way: Callable, rows: np.ndarray, seeds: np.ndarray, threads: int, rows_per_call: int,
                out: np.ndarray) -> float:
    """Seconds for ``threads`` threads, started together, to hash equal shares of ``rows`` into ``out``."""
    bounds = np.linspace(0, rows.shape[0], threads + 1).astype(int)
    start = threading.Barrier(threads + 1)

    def work(lo: int, hi: int) -> None:
        start.wait()
        way(rows[lo:hi], seeds[lo:hi], out[lo:hi], rows_per_call)

    workers = [threading.Thread(target=work, args=(int(lo), int(hi))) for lo, hi in zip(bounds[:-1], bounds[1:])]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="bytes hashed per case, in MiB")
    parser.add_argument("--request-mib", type=int, default=4, help="bytes per batch call (one I/O request), in MiB")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data = rng.integers(1, 256, args.mib * MiB, dtype=np.uint8)
    block_checksums.warm_up()
    library = block_checksums._library_hash() is not None
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; batch through "
          f"{'the xxhash library (GIL released)' if library else 'python-xxhash (library entry point not found)'}")
    results = []
    for block in BLOCKS:
        rows = data.reshape(-1, block)
        seeds = rng.integers(0, 2**64 - 1, rows.shape[0], dtype=np.uint64, endpoint=True)
        rows_per_call = max(1, args.request_mib * MiB // block)
        first = None
        for name, way in (("python", by_python), ("batch", by_batch)):
            for threads in (1, 2):
                out = np.zeros(rows.shape[0], dtype=np.uint64)
                times = [run_threads(way, rows, seeds, threads, rows_per_call, out) for _ in range(args.repeats)]
                first = out.copy() if first is None else first
                if not np.array_equal(out, first):
                    raise SystemExit(f"{name} on {threads} threads disagrees with the first way's sums")
                best, median = data.size / min(times) / 1e9, data.size / statistics.median(times) / 1e9
                results.append({"block_bytes": block, "way": name, "threads": threads, "gbps_best": round(best, 2),
                                "gbps_median": round(median, 2)})
                print(f"{block >> 10:>5} KiB blocks  {name:<6} {threads} thread{'s' * (threads > 1):<1}  "
                      f"{best:6.2f} GB/s best  {median:6.2f} median")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mib": args.mib, "request_mib": args.request_mib, "cpu": cpu_model(), "cpus": os.cpu_count(),
                       "library": library, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
