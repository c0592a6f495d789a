"""Disk tier bandwidth against the raw sequential O_DIRECT bandwidth of the same disk, measured in one run.

    python bench/disk_bench.py --dir /path/on/the/disk --gib 4 [--json bench/results/disk.json]

Cases, each writing then reading the same random bytes (never zeros):
  raw   plain os.pwrite / os.preadv of --request-mib requests from a page-aligned mmap, O_DIRECT, one request at a time
  dd    dd oflag=direct / iflag=direct with the same request size (when dd is present; its source is a file in
        /dev/shm so that only the target disk is measured)
  tier  DiskBlockFile.write_slots / read_slots in batches of --batch-mib, for each slot size (2 MiB = one Llama-8B
        block of all 32 layers; 64 KiB), with slot ids in order (runs coalesce) and shuffled (a fragmented free list)
  buffered  the tier without O_DIRECT (2 MiB slots): the file's page cache is dropped (fsync + fadvise DONTNEED)
        between writing and reading, so the read comes from the disk, not from memory
Every write pass ends with fsync inside the timed region. Bandwidth is in GB/s (1e9 bytes/s); "% raw" compares
with the best raw figure (Python or dd) of the same direction. Every read is checked byte for byte. Memory: two
buffers of the case size, plus dd's source in /dev/shm (about 3x --gib in all); disk: one case's bytes at a time.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvbm.kernels.disk_file import DiskBlockFile, plan_requests, slots_per_request
from kvbm.kernels.gds import probe_gds

MiB = 1 << 20


def parse_size(text: str) -> int:
    """Parse '2M', '64K', '4096' into bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def random_mmap(nbytes: int, rng: np.random.Generator) -> mmap.mmap:
    """A page-aligned anonymous mapping filled with random bytes, in chunks to bound the temporary copies."""
    buf = mmap.mmap(-1, nbytes)
    chunk = 64 * MiB
    for off in range(0, nbytes, chunk):
        n = min(chunk, nbytes - off)
        buf[off : off + n] = rng.bytes(n)
    return buf


def same_bytes(a: mmap.mmap, b: mmap.mmap, nbytes: int) -> bool:
    """Whether the first nbytes of two buffers are equal."""
    return bool(np.array_equal(np.frombuffer(a, np.uint8, nbytes), np.frombuffer(b, np.uint8, nbytes)))


def poison(buf: mmap.mmap) -> None:
    """Overwrite a buffer with a non-zero pattern so a read that does nothing cannot pass the check."""
    np.frombuffer(buf, np.uint8)[:] = 0xA5


def mount_of(path: str) -> dict:
    """Filesystem type and device of the mount holding ``path`` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best = {"mount_point": "?", "fs_type": "?", "device": "?"}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best["mount_point"]):
                    best = {"mount_point": mnt, "fs_type": fstype, "device": dev}
    except OSError:
        pass
    return best


def timed(fn) -> float:
    """Seconds taken by fn()."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def raw_case(directory: str, data: mmap.mmap, dst: mmap.mmap, total: int, request: int) -> tuple[float, float, bool]:
    """Sequential O_DIRECT pwrite then preadv of ``total`` bytes in ``request``-byte requests."""
    fd0, path = tempfile.mkstemp(prefix="kvbm-bench-raw-", dir=directory)
    os.close(fd0)
    src, out = memoryview(data), memoryview(dst)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)

        def write():
            for off in range(0, total, request):
                if os.pwrite(fd, src[off : off + request], off) != request:
                    raise OSError(f"short write at {off}")
            os.fsync(fd)

        try:
            tw = timed(write)
        finally:
            os.close(fd)
        poison(dst)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)

        def read():
            for off in range(0, total, request):
                if os.preadv(fd, [out[off : off + request]], off) != request:
                    raise OSError(f"short read at {off}")

        try:
            tr = timed(read)
        finally:
            os.close(fd)
        return tw, tr, same_bytes(data, dst, total)
    finally:
        os.unlink(path)


def slot_runs(slots: np.ndarray, slot_bytes: int, max_request: int, batch: int) -> list[tuple[int, int, int]]:
    """The requests the disk tier makes of distinct ``slots``: sorted, cut into batches of ``batch`` slots, each
    batch planned as the tier plans it (`plan_requests`: consecutive slots joined up to ``max_request`` bytes); each
    (first slot, slot count, index of the first in sorted order)."""
    per_request = slots_per_request(slot_bytes, max_request)
    ordered = np.sort(slots).tolist()
    return [(run[0][0], len(run), run[0][1])
            for lo in range(0, len(ordered), batch)
            for run in plan_requests([(s, lo + i) for i, s in enumerate(ordered[lo:lo + batch])], per_request)]


def raw_pattern_case(directory: str, data: mmap.mmap, dst: mmap.mmap, slot_bytes: int, file_slots: int,
                     runs: list[tuple[int, int, int]], threads: int) -> tuple[float, float, bool]:
    """O_DIRECT pwrite then preadv of ``runs`` (from `slot_runs`) on a preallocated file of ``file_slots`` slots,
    ``threads`` requests in flight, no checksums: the disk's own bandwidth for the tier's access pattern. Run ``k``
    moves the bytes at sorted index ``k`` of ``data`` / ``dst``."""
    fd0, path = tempfile.mkstemp(prefix="kvbm-bench-pattern-", dir=directory)
    os.close(fd0)
    src, out = memoryview(data), memoryview(dst)
    total = sum(n for _, n, _ in runs) * slot_bytes
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            os.posix_fallocate(fd, 0, file_slots * slot_bytes)

            def each(move) -> None:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    for done in pool.map(move, runs):
                        if done is not None:
                            raise OSError(done)

            def write_run(run) -> str | None:
                s, n, k = run
                size = n * slot_bytes
                if os.pwrite(fd, src[k * slot_bytes : k * slot_bytes + size], s * slot_bytes) != size:
                    return f"short write at slot {s}"
                return None

            def read_run(run) -> str | None:
                s, n, k = run
                size = n * slot_bytes
                if os.preadv(fd, [out[k * slot_bytes : k * slot_bytes + size]], s * slot_bytes) != size:
                    return f"short read at slot {s}"
                return None

            tw = timed(lambda: (each(write_run), os.fsync(fd)))
            poison(dst)
            tr = timed(lambda: each(read_run))
        finally:
            os.close(fd)
        return tw, tr, same_bytes(data, dst, total)
    finally:
        os.unlink(path)


def dd_case(directory: str, data: mmap.mmap, total: int, request: int) -> tuple[float, float, bool] | str:
    """dd oflag=direct from a /dev/shm copy of the data, then dd iflag=direct to /dev/null; or why it was skipped."""
    if shutil.which("dd") is None:
        return "dd not found"
    if not os.path.isdir("/dev/shm") or shutil.disk_usage("/dev/shm").free < total + 256 * MiB:
        return "no room in /dev/shm for dd's source file"
    fd0, path = tempfile.mkstemp(prefix="kvbm-bench-dd-", dir=directory)
    os.close(fd0)
    src_fd, src_path = tempfile.mkstemp(prefix="kvbm-bench-dd-src-", dir="/dev/shm")
    try:
        with open(src_fd, "wb", closefd=True) as f:
            f.write(memoryview(data)[:total])
        bs, count = f"{request // MiB}M", str(total // request)
        write = ["dd", f"if={src_path}", f"of={path}", f"bs={bs}", f"count={count}", "oflag=direct", "conv=fsync",
                 "status=none"]
        read = ["dd", f"if={path}", "of=/dev/null", f"bs={bs}", f"count={count}", "iflag=direct", "status=none"]
        tw = timed(lambda: subprocess.run(write, check=True))
        tr = timed(lambda: subprocess.run(read, check=True))
        with open(path, "rb") as f:  # check through the page cache, after the timed O_DIRECT read
            ok = f.read(total) == memoryview(data)[:total]
        return tw, tr, ok
    except subprocess.CalledProcessError as e:
        return f"dd failed: {e}"
    finally:
        os.unlink(path)
        os.unlink(src_path)


def tier_case(
    directory: str, data: mmap.mmap, dst: mmap.mmap, total: int, slot_bytes: int, batch_bytes: int,
    shuffled: bool, o_direct: bool, threads: int, max_io_bytes: int, rng: np.random.Generator,
) -> tuple[float, float, bool]:
    """write_slots then read_slots of all ``total`` bytes in batches; data block i goes to slot order[i]."""
    n = total // slot_bytes
    per_batch = max(1, batch_bytes // slot_bytes)
    order = rng.permutation(n).tolist() if shuffled else list(range(n))
    batches = [(k, order[k : k + per_batch]) for k in range(0, n, per_batch)]
    src, out = memoryview(data), memoryview(dst)
    with DiskBlockFile(directory, n, slot_bytes, use_o_direct=o_direct, io_threads=threads,
                       max_io_bytes=max_io_bytes) as f:
        failed = []

        def write():
            for k, slots in batches:
                r = f.write_slots(slots, src[k * slot_bytes : (k + len(slots)) * slot_bytes])
                failed.extend(r.failed_slots)
            os.fsync(f.fileno())

        tw = timed(write)
        if not o_direct:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        poison(dst)

        def read():
            for k, slots in batches:
                r = f.read_slots(slots, out[k * slot_bytes : (k + len(slots)) * slot_bytes])
                failed.extend(r.failed_slots)

        tr = timed(read)
        return tw, tr, not failed and same_bytes(data, dst, n * slot_bytes)


def main(argv: list[str] | None = None) -> int:
    """Run every case, print the table, write JSON; exit status 1 if any read-back check failed."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="directory on the disk to measure")
    p.add_argument("--gib", type=float, default=4.0, help="bytes per case, GiB (default 4)")
    p.add_argument("--request-mib", type=int, default=16, choices=[8, 16], help="raw/dd request size")
    p.add_argument("--slot-sizes", default="2M,64K", help="tier slot sizes, comma-separated (default 2M,64K)")
    p.add_argument("--batch-mib", type=int, default=256, help="bytes per write_slots/read_slots call, MiB")
    p.add_argument("--threads", type=int, default=4, help="DiskBlockFile io_threads")
    p.add_argument("--max-io-mib", type=int, default=16, help="DiskBlockFile max_io_bytes, MiB")
    p.add_argument("--repeat", type=int, default=1, help="repeat each case, report the median")
    p.add_argument("--no-dd", action="store_true", help="skip the dd cases")
    p.add_argument("--no-buffered", action="store_true", help="skip the non-O_DIRECT tier case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    if not os.path.isdir(args.dir):
        p.error(f"--dir {args.dir!r} is not a directory")
    request = args.request_mib * MiB
    slot_sizes = [parse_size(s) for s in args.slot_sizes.split(",")]
    unit = max([request] + slot_sizes)
    total = int(args.gib * (1 << 30)) // unit * unit
    if total == 0:
        p.error(f"--gib {args.gib} is smaller than one request or slot ({unit} bytes)")
    free = shutil.disk_usage(args.dir).free
    if free < total + 256 * MiB:
        p.error(f"{args.dir} has {free} bytes free, the benchmark needs {total} plus headroom")

    rng = np.random.default_rng(args.seed)
    mount = mount_of(args.dir)
    gds = probe_gds()
    print(f"disk bench: {total / 1e9:.2f} GB per case in {args.dir} ({mount['fs_type']} on {mount['device']}), "
          f"requests {args.request_mib} MiB, tier batches {args.batch_mib} MiB, {args.threads} I/O threads")
    print(f"GDS probe: {gds.path} ({gds.reason})", flush=True)
    data = random_mmap(total, rng)
    dst = mmap.mmap(-1, total)

    cases: list[tuple[str, str, object]] = [
        ("raw", f"raw os.pwrite/preadv O_DIRECT {args.request_mib} MiB",
         lambda: raw_case(args.dir, data, dst, total, request)),
    ]
    if not args.no_dd:
        cases.append(("dd", f"dd oflag/iflag=direct bs={args.request_mib}M",
                      lambda: dd_case(args.dir, data, total, request)))
    for sb in slot_sizes:
        for shuffled in (False, True):
            label = f"tier {sb // 1024} KiB slots, {'shuffled' if shuffled else 'sequential'} ids"
            cases.append(("tier", label, lambda sb=sb, sh=shuffled: tier_case(
                args.dir, data, dst, total, sb, args.batch_mib * MiB, sh, True, args.threads,
                args.max_io_mib * MiB, rng)))
    if not args.no_buffered:
        sb = 2 * MiB if total % (2 * MiB) == 0 else slot_sizes[0]
        cases.append(("buffered", f"tier {sb // 1024} KiB slots, no O_DIRECT (cache dropped before read)",
                      lambda: tier_case(args.dir, data, dst, total, sb, args.batch_mib * MiB, False, False,
                                        args.threads, args.max_io_mib * MiB, rng)))

    # Rounds run every case once, in turn, so that drift of the disk's speed touches all cases alike.
    runs: dict[str, dict] = {label: {"kind": kind, "writes": [], "reads": [], "ok": True} for kind, label, _ in cases}
    notes: list[str] = []
    skipped: set[str] = set()
    for rnd in range(args.repeat):
        for _, label, run in cases:
            if label in skipped:
                continue
            out = run()
            if isinstance(out, str):
                skipped.add(label)
                notes.append(f"{label}: skipped, {out}")
                print(f"  {label}: skipped, {out}", flush=True)
                continue
            tw, tr, good = out
            r = runs[label]
            r["writes"].append(total / tw / 1e9)
            r["reads"].append(total / tr / 1e9)
            r["ok"] = r["ok"] and good
            print(f"  round {rnd + 1}: {label}: write {r['writes'][-1]:.2f} GB/s, read {r['reads'][-1]:.2f} GB/s"
                  f"{'' if good else '  READ-BACK MISMATCH'}", flush=True)
    rows = [
        {"kind": r["kind"], "case": label, "write_GBps": statistics.median(r["writes"]),
         "read_GBps": statistics.median(r["reads"]), "write_runs": r["writes"], "read_runs": r["reads"],
         "verified": r["ok"]}
        for label, r in runs.items() if r["writes"]
    ]

    raw_rows = [r for r in rows if r["kind"] in ("raw", "dd")]
    ref = {d: max(r[f"{d}_GBps"] for r in raw_rows) for d in ("write", "read")}
    for r in rows:
        for d in ("write", "read"):
            r[f"{d}_pct_raw"] = 100.0 * r[f"{d}_GBps"] / ref[d]

    print()
    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  write GB/s  read GB/s  write %raw  read %raw  verified")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['write_GBps']:10.2f} {r['read_GBps']:10.2f} {r['write_pct_raw']:10.1f}"
              f" {r['read_pct_raw']:10.1f}  {'yes' if r['verified'] else 'NO'}")
    notes.append(f"% raw is against the best raw case per direction: write {ref['write']:.2f}, read "
                 f"{ref['read']:.2f} GB/s")
    notes.append(f"raw and dd keep one request in flight; the tier keeps up to {args.threads} (its I/O threads)")
    notes.append("write passes include the final fsync; O_DIRECT cases bypass the page cache; the no-O_DIRECT case "
                 "drops the file's page cache (fsync + POSIX_FADV_DONTNEED) before reading")
    for n in notes:
        print(f"note: {n}")

    if args.json:
        result = {
            "benchmark": "disk_bench", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
            "kernel": platform.release(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "dir": os.path.realpath(args.dir), "mount": mount, "bytes_per_case": total,
            "request_bytes": request, "batch_bytes": args.batch_mib * MiB, "io_threads": args.threads,
            "max_io_bytes": args.max_io_mib * MiB, "repeat": args.repeat,
            "gds_probe": {"available": gds.available, "path": gds.path, "reason": gds.reason},
            "raw_reference_GBps": ref, "rows": rows, "notes": notes,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
