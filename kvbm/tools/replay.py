"""Replay a multi-round chat workload through the block manager with a G1 too small for the working set.

A small simulated engine stands in for vLLM: it keeps a prefix cache of G1 blocks (LRU), asks the manager for the
rest of each prompt (G2, then G3), onboards what matched, "computes" the other blocks by writing bytes derived
from each block's sequence hash, and offloads every newly computed full block (write-through). Because a block's
bytes follow from its hash, every onboarded block is checked byte for byte. Reports hit rates per tier, blocks and
bytes moved, achieved bandwidth and the CPU time the manager costs per request, and reconciles its counts: blocks
asked to be offloaded = stored + skipped (by reason) + failed, stored = blocks the metrics saw moved out of G1;
blocks asked to be onboarded = loaded + failed, loaded = blocks moved into G1 = prompt hits from G2 and G3 + blocks
loaded after a failed one (recomputed instead).
"""
from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from kvbm.config import KvbmConfig
from kvbm.layouts import KVGeometry, PagedKVCache, allocate
from kvbm.manager import BlockManager, BlockResult, Ticket
from kvbm.metrics import KVBM_BLOCK_COUNTERS
from kvbm.tools.workload import ChatWorkload


@dataclass
class ReplayReport:
    """What a replay measured; `blocks` counts prompt blocks by where they came from."""

    requests: int = 0
    blocks: dict[str, int] = field(default_factory=lambda: {"g1": 0, "g2": 0, "g3": 0, "computed": 0})
    onboard_failed: int = 0
    onboarded_bytes_checked: int = 0
    offloaded_blocks: int = 0  #: blocks passed to ``offload`` (requests, not blocks moved)
    offload: dict[str, int] = field(default_factory=dict)  #: requested, stored, failed, "skipped: <reason>" ...
    onboard: dict[str, int] = field(default_factory=dict)  #: requested, loaded, failed, loaded_unused
    manager_cpu_seconds: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    transfer: dict[str, dict[str, float]] = field(default_factory=dict)

    def hit_rates(self) -> dict[str, float]:
        """Share of prompt blocks from each source (g1, g2, g3, computed)."""
        total = sum(self.blocks.values()) or 1
        return {k: v / total for k, v in self.blocks.items()}


class SimulatedEngine:
    """G1 blocks with a prefix cache (sequence hash -> block, LRU over blocks no request holds)."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.cached: OrderedDict[int, int] = OrderedDict()  # seq hash -> G1 block
        self.free = list(range(cache.num_blocks))

    def prefix_hits(self, hashes: list[int]) -> int:
        """Leading blocks of ``hashes`` still cached in G1."""
        n = 0
        while n < len(hashes) and hashes[n] in self.cached:
            self.cached.move_to_end(hashes[n])
            n += 1
        return n

    def allocate(self, n: int, keep: set[int]) -> list[int]:
        """n free G1 blocks, evicting least recently used cached blocks that are not in `keep`."""
        out = []
        while len(out) < n:
            if self.free:
                out.append(self.free.pop())
                continue
            victim = next((h for h in self.cached if self.cached[h] not in keep), None)
            if victim is None:
                raise RuntimeError(f"G1 of {self.cache.num_blocks} blocks cannot hold one request of {n} blocks")
            out.append(self.cached.pop(victim))
        return out

    def write_block(self, block: int, seq_hash: int) -> None:
        """'Compute' a block: bytes that follow from its hash, the same however often it is computed."""
        for t, view in self._views(block):
            view.copy_(expected_bytes(seq_hash, t, view.numel(), view.device))

    def check_block(self, block: int, seq_hash: int) -> bool:
        """Whether G1 block ``block`` holds exactly the content written for ``seq_hash``."""
        return all(torch.equal(view, expected_bytes(seq_hash, t, view.numel(), view.device))
                   for t, view in self._views(block))

    def _views(self, block: int):
        g = self.cache.geometry
        for layer in range(g.num_layers):
            for kv in range(g.num_kv):
                yield layer * g.num_kv + kv, self.cache.piece_view(layer, kv, torch.int16)[block].reshape(-1)


def expected_bytes(seq_hash: int, piece: int, n: int, device) -> torch.Tensor:
    """Deterministic int16 content of one piece of a block (never all zeros)."""
    gen = torch.Generator(device="cpu").manual_seed((seq_hash ^ (piece * 0x9E3779B97F4A7C15)) & ((1 << 63) - 1))
    return torch.randint(-(1 << 15), 1 << 15, (n,), dtype=torch.int16, generator=gen).to(device)


def replay(workload: ChatWorkload, geometry: KVGeometry, g1_blocks: int, config: KvbmConfig, *,
           device: str = "cpu", progress_every: int = 10, log=print) -> ReplayReport:
    """Run the workload; `log` receives progress lines. Raises if an onboarded block's bytes are wrong."""
    cache = allocate("vllm_flash_attn_nhd", geometry, g1_blocks, dtype=torch.bfloat16, device=device)
    engine = SimulatedEngine(cache)
    mgr = BlockManager(cache, config)
    report = ReplayReport()
    offload_tickets: list[Ticket] = []
    onboard_tickets: list[Ticket] = []
    bs = geometry.block_size
    start = time.perf_counter()
    try:
        for req in workload.requests():
            sequence = req.prompt + req.answer
            hashes = mgr.sequence_hashes(sequence)
            prompt_blocks = len(req.prompt) // bs
            g1_hits = min(engine.prefix_hits(hashes), prompt_blocks)
            cpu0 = time.process_time()
            match = mgr.lookup(hashes[g1_hits:prompt_blocks], num_tokens=len(req.prompt) - g1_hits * bs)
            cpu = time.process_time() - cpu0
            held = {engine.cached[h] for h in hashes[:g1_hits]}
            new_ids = engine.allocate(len(hashes) - g1_hits, held)
            loaded = hashes[g1_hits:g1_hits + match.num_blocks]
            ok_loaded = 0
            if loaded:
                cpu0 = time.process_time()
                ticket = mgr.onboard(loaded, new_ids[:len(loaded)])
                mgr.wait(ticket)
                onboard_tickets.append(ticket)
                cpu += time.process_time() - cpu0
                for i, (h, block) in enumerate(zip(loaded, new_ids)):
                    if ticket.results[i] is BlockResult.OK:
                        if not engine.check_block(block, h):
                            raise AssertionError(f"onboarded block {h:#x} into G1 block {block} with wrong bytes")
                        report.onboarded_bytes_checked += geometry.block_bytes
                        ok_loaded += 1
                    else:
                        report.onboard_failed += 1
                        break  # the engine recomputes from the first failed block on
            computed = list(zip(hashes[g1_hits + ok_loaded:], new_ids[ok_loaded:]))
            for h, block in computed:
                engine.write_block(block, h)
            cpu0 = time.process_time()
            if computed:
                offload_tickets.append(mgr.offload([h for h, _ in computed], [b for _, b in computed]))
                report.offloaded_blocks += len(computed)
            mgr.poll()
            report.manager_cpu_seconds.append(time.process_time() - cpu0 + cpu)
            for h, block in zip(hashes[g1_hits:], new_ids):
                engine.cached[h] = block
            report.requests += 1
            from_g2 = min(match.host_hits, ok_loaded)
            report.blocks["g1"] += g1_hits
            report.blocks["g2"] += from_g2
            report.blocks["g3"] += ok_loaded - from_g2
            report.blocks["computed"] += prompt_blocks - g1_hits - ok_loaded
            if progress_every and report.requests % progress_every == 0:
                rates = report.hit_rates()
                log(f"[replay] {report.requests}/{workload.num_requests} requests, hits g1 {rates['g1']:.0%} "
                    f"g2 {rates['g2']:.0%} g3 {rates['g3']:.0%}, computed {rates['computed']:.0%}")
        mgr.wait()
        mgr.check_invariants()
        report.wall_seconds = time.perf_counter() - start
        report.transfer = _transfer_figures(mgr)
        report.offload = _offload_outcomes(offload_tickets)
        report.onboard = _onboard_outcomes(onboard_tickets)
    finally:
        mgr.close()
    return report


def _reason_kind(reason: str | None) -> str:
    """A skip reason without its numbers ("priority 3 is below ...=5" -> "below the priority floor")."""
    if not reason:
        return "no reason given"
    if reason.startswith("priority"):
        return "below the priority floor"
    return reason.split(":")[0]


def _offload_outcomes(tickets: list[Ticket]) -> dict[str, int]:
    """Blocks passed to offload: requested = stored + failed + the skipped ones, by reason ("skipped: <reason>")."""
    out: Counter[str] = Counter(requested=0, stored=0, failed=0)
    for t in tickets:
        out["requested"] += len(t.results)
        for i, r in enumerate(t.results):
            if r is BlockResult.OK:
                out["stored"] += 1
            elif r is BlockResult.FAILED:
                out["failed"] += 1
            else:
                out[f"skipped: {_reason_kind(t.reasons.get(i))}"] += 1
    return dict(out)


def _onboard_outcomes(tickets: list[Ticket]) -> dict[str, int]:
    """Blocks passed to onboard: requested = loaded + failed; loaded_unused = loaded after a failed block of the same
    ticket (the engine recomputes from the first failure on, so those do not count as hits)."""
    out = Counter(requested=0, loaded=0, failed=0, loaded_unused=0)
    for t in tickets:
        out["requested"] += len(t.results)
        first_failure = next((i for i, r in enumerate(t.results) if r is not BlockResult.OK), len(t.results))
        for i, r in enumerate(t.results):
            if r is BlockResult.OK:
                out["loaded"] += 1
                out["loaded_unused"] += i > first_failure
            else:
                out["failed"] += 1
    return dict(out)


def _transfer_figures(mgr: BlockManager) -> dict[str, dict[str, float]]:
    out = {}
    for direction in ("g1_to_g2", "g2_to_g3", "g1_to_g3", "g2_to_g1", "g3_to_g1"):
        nbytes = mgr.metrics.value("kvbm_transfer_bytes", direction)
        seconds = mgr.metrics.registry.get_sample_value("kvbm_transfer_seconds_sum", {"direction": direction}) or 0.0
        if nbytes:
            out[direction] = {"bytes": nbytes, "seconds": seconds, "gbps": nbytes / seconds / 1e9 if seconds else 0.0,
                              "failed_blocks": mgr.metrics.value("kvbm_transfer_failed_blocks", direction),
                              "blocks": mgr.metrics.value(KVBM_BLOCK_COUNTERS[direction])}
    return out


def format_report(report: ReplayReport, geometry: KVGeometry) -> str:
    """A short table of the replay's figures, with the lines that reconcile offload and onboard counts."""
    rates = report.hit_rates()
    cpu = sorted(report.manager_cpu_seconds)
    gb = geometry.block_bytes / 1e9
    moved = {d: int(f.get("blocks", 0)) for d, f in report.transfer.items()}
    off, on = report.offload, report.onboard
    skipped = {k: v for k, v in off.items() if k.startswith("skipped: ")}
    out_of_g1 = " + ".join(f"{d} {moved.get(d, 0)}" for d in ("g1_to_g2", "g1_to_g3") if d in moved) or "none"
    into_g1 = " + ".join(f"{d} {moved.get(d, 0)}" for d in ("g2_to_g1", "g3_to_g1") if d in moved) or "none"
    lines = [
        f"requests: {report.requests}, wall {report.wall_seconds:.1f} s",
        "prompt blocks by source: " + ", ".join(f"{k} {report.blocks[k]} ({rates[k]:.1%})" for k in report.blocks),
        f"onboard failures: {report.onboard_failed}; onboarded bytes verified: {report.onboarded_bytes_checked}",
        f"offload requests: {off.get('requested', 0)} blocks ({off.get('requested', 0) * gb:.3f} GB) = "
        f"stored {off.get('stored', 0)} + failed {off.get('failed', 0)} + skipped {sum(skipped.values())} ("
        + ("; ".join(f"{k[9:]}: {v}" for k, v in sorted(skipped.items())) or "none") + ")",
        f"stored {off.get('stored', 0)} blocks ({off.get('stored', 0) * gb:.3f} GB) = moved out of G1: {out_of_g1}",
        f"onboard requests: {on.get('requested', 0)} blocks = loaded {on.get('loaded', 0)} + failed "
        f"{on.get('failed', 0)}",
        f"loaded {on.get('loaded', 0)} blocks ({on.get('loaded', 0) * gb:.3f} GB) = moved into G1: {into_g1}"
        f" = prompt hits g2 {report.blocks['g2']} + g3 {report.blocks['g3']} + loaded after a failed block "
        f"(recomputed) {on.get('loaded_unused', 0)}",
        "(hits are split as the lookup counts them: G2's leading run, then G3 from there; a block after that run "
        "that G2 also holds loads from G2, so G2 -> G1 can move more blocks than the G2 hits)",
        f"manager CPU time per request (on CPU it includes the synchronous copies; on a GPU the first request "
        f"compiles the copy kernels): median {cpu[len(cpu) // 2] * 1e3:.2f} ms, "
        f"p90 {cpu[int(len(cpu) * 0.9)] * 1e3:.2f} ms, max {cpu[-1] * 1e3:.2f} ms"
        if cpu else "manager CPU time per request: no requests",
        "batch-seconds: summed lifetimes of the transfer batches, from start to the poll that saw them finish "
        "(batches overlap and wait for the next poll, so GB per batch-second is not a link bandwidth)",
        "| direction | blocks moved | GB moved | batch-seconds | GB per batch-second | failed blocks |",
        "|---|---|---|---|---|---|",
    ]
    for direction, f in report.transfer.items():
        lines.append(f"| {direction} | {int(f.get('blocks', 0))} | {f['bytes'] / 1e9:.3f} | {f['seconds']:.3f} | "
                     f"{f['gbps']:.2f} | {int(f['failed_blocks'])} |")
    return "\n".join(lines)
