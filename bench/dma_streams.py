"""Copy-engine time of bursts of 16-block transfers whose host blocks are scattered (one DMA piece per block, as the
staged path issues them for scattered G2 blocks), issued as batched driver copies (cuMemcpyBatchAsync, one call per
stream per transfer) over 1, 2, 3, 4 or 8 streams, against the same bursts as one piece per transfer and against one
copy of all the bytes; no kvbm code but the batched-copy call. The whole burst is enqueued while the streams wait
behind a GPU sleep and is timed with events from the end of the sleep to the last stream's end, so the host's issue
rate is out of the figure: whether more streams, or fewer pieces, would let the copy engines move scattered small
blocks faster. Usage on a GPU machine: ``python3 bench/dma_streams.py``.
"""
import statistics

import numpy as np
import torch

from kvbm.kernels.batch_memcpy import memcpy_batch_unchecked

HOST_BLOCKS, PER, BURST_BYTES = 1024, 16, 256 << 20  # host blocks to scatter over, blocks per transfer, burst bytes
STREAMS = (1, 2, 3, 4, 8)
CYCLES_PER_MS = 1.5e6  # about (the GPU clock); the sleep only has to outlast the enqueue


class Burst:
    """Streams that wait behind a GPU sleep while a burst of batched copies is enqueued on them."""

    def __init__(self) -> None:
        self.gate = torch.cuda.Stream()
        self.streams = [torch.cuda.Stream() for _ in range(max(STREAMS))]
        self.raw = [s.cuda_stream for s in self.streams]

    def gpu_ms(self, calls_per_transfer, direction: str, n_streams: int, sleep_ms: float = 20.0) -> float:
        """GPU ms from the end of the sleep to the last of the first `n_streams` streams' ends."""
        torch.cuda.synchronize()
        go = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.gate):
            torch.cuda._sleep(int(sleep_ms * CYCLES_PER_MS))
            go.record(self.gate)
        for s in self.streams[:n_streams]:
            s.wait_event(go)
        for calls in calls_per_transfer:
            for dst, src, sizes, stream in calls:
                memcpy_batch_unchecked(dst, src, sizes, stream, direction=direction, device=0)
        ends = []
        for s in self.streams[:n_streams]:
            ends.append(torch.cuda.Event(enable_timing=True))
            ends[-1].record(s)
        torch.cuda.synchronize()
        return max(go.elapsed_time(e) for e in ends)


def u64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def variants(burst: Burst, direction: str, block: int, transfers: int, host: int, dev: int, big_h: int,
             big_d: int, rng: np.random.Generator) -> dict[str, tuple[list, int]]:
    """name -> (calls per transfer, streams): the scattered pieces over each stream count, one piece per transfer,
    and one copy of the whole burst."""
    out = {}
    for n in STREAMS:
        per_transfer = []
        for t in range(transfers):
            ids = rng.choice(HOST_BLOCKS, PER, replace=False)
            hs = np.array([host + int(b) * block for b in ids], dtype=np.uint64)
            ds = np.array([dev + ((t % 2) * PER + j) * block for j in range(PER)], dtype=np.uint64)
            dst, src = (ds, hs) if direction == "h2d" else (hs, ds)
            cuts = np.linspace(0, PER, n + 1).astype(int)
            per_transfer.append([(dst[a:b].copy(), src[a:b].copy(), np.full(b - a, block, dtype=np.uint64),
                                  burst.raw[j]) for j, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])) if b > a])
        out[f"{n}s"] = (per_transfer, n)
    whole = []
    for t in range(transfers):
        h, d = u64(host + (t % (HOST_BLOCKS // PER)) * PER * block), u64(dev + (t % 2) * PER * block)
        whole.append([((d, h) if direction == "h2d" else (h, d)) + (u64(PER * block), burst.raw[0])])
    out["1 piece"] = (whole, 1)
    h, d = u64(big_h), u64(big_d)
    out["big"] = ([[((d, h) if direction == "h2d" else (h, d)) + (u64(transfers * PER * block), burst.raw[0])]], 1)
    return out


def main() -> None:
    print(torch.cuda.get_device_name(), flush=True)
    torch.cuda.init()
    rng = np.random.default_rng(0)
    burst = Burst()
    for block_kib in (128, 256, 1024):
        block = block_kib << 10
        transfers = BURST_BYTES // (PER * block)
        host = torch.randint(0, 255, (HOST_BLOCKS * block,), dtype=torch.uint8).pin_memory()
        dev = torch.randint(0, 255, (2 * PER * block,), dtype=torch.uint8, device="cuda")
        big_d = torch.empty(transfers * PER * block, dtype=torch.uint8, device="cuda")
        big_h = torch.randint(0, 255, (transfers * PER * block,), dtype=torch.uint8).pin_memory()
        for direction in ("h2d", "d2h"):
            cases = variants(burst, direction, block, transfers, host.data_ptr(), dev.data_ptr(), big_h.data_ptr(),
                             big_d.data_ptr(), rng)
            for calls, n in cases.values():
                burst.gpu_ms(calls, direction, n, 5.0)  # warm-up
            times: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(7):  # in turns, so that drift touches every case alike
                for k, (calls, n) in cases.items():
                    times[k].append(burst.gpu_ms(calls, direction, n))
            med = {k: statistics.median(v) for k, v in times.items()}
            gb = transfers * PER * block / 1e9
            line = " ".join(f"{k}: {gb / v * 1e3:5.1f} GB/s ({100 * med['big'] / v:5.1f}%)" for k, v in med.items())
            print(f"{block_kib:5d} KiB pieces x {PER} per transfer, {transfers} transfers, {direction}: {line}",
                  flush=True)
        del host, big_h, big_d, dev


if __name__ == "__main__":
    main()
