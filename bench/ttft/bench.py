"""End-to-end time to first token (TTFT) with kvbm, on a random-weight decoder of real shape and real kernels.

Workloads: (a) one request with a cached prefix of each ``--prefixes`` length and ``--new-tokens`` new tokens
(the prefix is first run once, its blocks stored, then evicted from G1, so the timed request loads it from G2 or
G3); (b) LMBenchmark-style multi-round QA (users x rounds, a shared system prompt, long questions, short answers,
G1 smaller than the working set), average TTFT. Modes: recompute (no kvbm), G2 hit with bulk onboard or layer-wise,
G3 hit (disk tier only; POSIX and GPUDirect Storage), G3 through kvbm's cost-aware hit rule (loaded only where the
rule, learning online, expects loading to beat recomputing), and for (a) the lower bound: the PCIe time of the
prefix bytes (a pinned memcpy of the same bytes) plus the new tokens' compute with the prefix already in G1. Every
loaded block is compared byte for byte with the bytes its first computation wrote.

Run: ``python -m bench.ttft`` (see bench/ttft/README.md); ``--smoke`` runs a tiny model on the CPU in seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvbm.tools.checkout import checkout_commit
from kvbm.tools.workload import ChatWorkload

from .cost_rule import CostRule, RuleDecision, rule_note
from .engine import Engine, G1Pool, KvbmSide, Reference, RequestResult, sync
from .graphs import GRAPH_SIZES, GraphedPrefill
from .layer_stores import measure_layer_stores
from .layer_waits import measure_layer_waits
from .model import BLOCK_SIZE, SHAPES, DecoderModel, ModelShape, allocate_kv_caches
from .modes import G1_HIT, G2, G2_LAYERWISE, G3_AUTO, G3_GDS, KVBM_MODES, LOWER_BOUND, MODES, RECOMPUTE, side_mode
from .report import note_lines, plot, table

__all__ = ["Row", "main", "run_model"]

#: assumed rates for the estimates printed before the run (bytes/s)
EST_HOST_RATE, EST_DISK_RATE = 20e9, 2e9
GDS_NOTE = "on these machines cuFile cannot register files, so GDS is expected to be unavailable"

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line with the time since start."""
    print(f"[ttft +{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


@dataclass
class Row:
    """One line of the result table (times in ms; ``ttft_ms`` is the median of the timed repetitions, or the mean
    TTFT of a multi-round workload)."""

    model: str
    workload: str
    mode: str
    prefix_tokens: int | None = None
    new_tokens: int | None = None
    ttft_ms: float | None = None
    ttft_all_ms: list[float] = field(default_factory=list)
    load_ms: float | None = None
    forward_ms: float | None = None
    block_wait_ms: float = 0.0  #: mean per request: waiting for free G1 blocks that stores still read
    requests: int = 0
    g1_hit_tokens: int = 0
    loaded_tokens: int = 0
    computed_tokens: int = 0
    checked_blocks: int = 0
    bad_blocks: int = 0
    load_errors: int = 0
    bytes_ok: bool | None = None
    note: str = ""
    rule: dict[str, Any] | None = None  #: G3 hit, cost rule: how the rule decided (`cost_rule.rule_note`)
    pass_means_ms: list[float] = field(default_factory=list)  #: multi-round workload: each pass's mean TTFT


def median_ms(values: Sequence[float]) -> float:
    """Median of seconds, in ms."""
    return statistics.median(values) * 1e3


def _row_from(model: str, workload: str, mode: str, results: Sequence[RequestResult], *, prefix: int | None,
              new: int | None, mean: bool = False, expect_loaded: tuple[int, ...] | None = None) -> Row:
    ttfts = [r.ttft_s for r in results]
    row = Row(model, workload, mode, prefix, new,
              ttft_ms=(statistics.fmean(ttfts) * 1e3 if mean else median_ms(ttfts)),
              ttft_all_ms=[round(t * 1e3, 3) for t in ttfts], load_ms=median_ms([r.load_wait_s for r in results]),
              forward_ms=median_ms([r.forward_s for r in results]),
              block_wait_ms=statistics.fmean(r.block_wait_s for r in results) * 1e3,
              requests=len(results),
              g1_hit_tokens=sum(r.g1_hit_tokens for r in results), loaded_tokens=sum(r.loaded_tokens for r in results),
              computed_tokens=sum(r.computed_tokens for r in results),
              checked_blocks=sum(r.checked_blocks for r in results), bad_blocks=sum(r.bad_blocks for r in results),
              load_errors=sum(r.load_errors for r in results))
    if mode in KVBM_MODES:
        unchecked = sum(r.unchecked_blocks for r in results)
        ok = row.bad_blocks == 0 and row.load_errors == 0 and unchecked == 0
        if expect_loaded is not None and any(r.loaded_tokens not in expect_loaded for r in results):
            ok = False
            row.note = (f"expected {' or '.join(map(str, expect_loaded))} loaded tokens per request, got "
                        f"{[r.loaded_tokens for r in results]}")
        row.bytes_ok = ok if ok is False or row.loaded_tokens else None  # None: nothing loaded, nothing to check
    return row


# -- options ---------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected comma-separated names from {', '.join(allowed)}, got {text!r}")
        return values
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line (``--smoke`` replaces the defaults by a tiny CPU run)."""
    ap = argparse.ArgumentParser(prog="python -m bench.ttft", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for ttft.json/.md/.png (default: a new bench/runs/<date-time>/)")
    ap.add_argument("--models", type=_choices(list(SHAPES)), default=None,
                    help="comma-separated: " + ", ".join(SHAPES) + " (default llama-3.1-8b,qwen3-0.6b)")
    ap.add_argument("--layers", type=int, default=None, help="override the models' number of layers")
    ap.add_argument("--prefixes", type=_int_list, default=None,
                    help="cached prefix lengths in tokens, multiples of 16 (default 2048,8192,16384,32768)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens after the prefix (default 256)")
    ap.add_argument("--workloads", type=_choices(["prefix", "qa"]), default=["prefix", "qa"],
                    help="prefix: single requests with a cached prefix; qa: multi-round QA (default both)")
    ap.add_argument("--modes", type=_choices(list(MODES)), default=list(MODES),
                    help="comma-separated: " + ", ".join(MODES) + " (default all)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per row, median reported (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repetitions before each row")
    ap.add_argument("--qa-users", type=int, default=None)
    ap.add_argument("--qa-rounds", type=int, default=None)
    ap.add_argument("--qa-system", type=int, default=None, help="shared system prompt tokens")
    ap.add_argument("--qa-question", type=int, default=None, help="tokens of each question (the long input)")
    ap.add_argument("--qa-answer", type=int, default=None, help="tokens of each answer (the short output)")
    ap.add_argument("--qa-active", type=int, default=None,
                    help="users taking turns at a time (default all: a user's next round comes after every other "
                         "user's)")
    ap.add_argument("--qa-passes", type=int, default=1,
                    help="passes of the QA modes, run in turn, each from cold tiers (default 1)")
    ap.add_argument("--qa-g1-tokens", type=int, default=None,
                    help="G1 size for the QA workload in tokens (default: a quarter of the working set, at least "
                         "the largest request)")
    ap.add_argument("--disk-dir", type=Path, default=None,
                    help="where the G3 files go (default DYN_KVBM_DISK_CACHE_DIR, else /tmp)")
    ap.add_argument("--layer-wait-prefix", type=int, default=16384,
                    help="prefix whose layer-wise onboard is timed per layer group alone and beside a prefill (GPU "
                         "only; "
                         "must be one of --prefixes; 0 skips)")
    ap.add_argument("--layer-store-tokens", type=int, default=16384,
                    help="prompt tokens of the measurement of stores started after the forward against per layer "
                         "group (at most the longest prefix; 0 skips)")
    ap.add_argument("--layer-wait-busy", type=int, default=2048, help="tokens of the prefill run beside it")
    ap.add_argument("--device", default=None, help="cuda or cpu (default cuda when available)")
    ap.add_argument("--eager", action="store_true",
                    help="run every forward eagerly: no CUDA graphs between attentions (on a GPU, prefills of up to "
                         f"{GRAPH_SIZES[-1]} tokens replay them by default)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model (2 layers), prefixes 64,128, small QA, on the CPU unless --device is given")
    args = ap.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "models": ["tiny"] if smoke else ["llama-3.1-8b", "qwen3-0.6b"],
        "prefixes": [64, 128] if smoke else [2048, 8192, 16384, 32768],
        "new_tokens": 32 if smoke else 256, "reps": 3 if smoke else 5,
        "qa_users": 3 if smoke else 8, "qa_rounds": 2 if smoke else 4, "qa_system": 64 if smoke else 2000,
        "qa_question": 48 if smoke else 1000, "qa_answer": 16 if smoke else 100, "qa_active": 3 if smoke else 8,
        "device": "cpu" if smoke else ("cuda" if torch.cuda.is_available() else "cpu"),
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if smoke and args.layers is None:
        args.layers = 2
    if smoke and args.layer_wait_prefix == 16384:
        args.layer_wait_prefix = 128
    if smoke and args.layer_store_tokens == 16384:
        args.layer_store_tokens = 128
    if any(p % BLOCK_SIZE for p in args.prefixes):
        ap.error(f"--prefixes must be multiples of {BLOCK_SIZE} (whole blocks)")
    if args.reps < 1 or args.warmup < 0 or args.new_tokens < 1 or args.qa_passes < 1:
        ap.error("--reps, --new-tokens and --qa-passes must be positive, --warmup not negative")
    if args.disk_dir is None:
        args.disk_dir = Path(os.environ.get("DYN_KVBM_DISK_CACHE_DIR") or "/tmp")
    return args


# -- measurements ----------------------------------------------------------------------------------------------


def _random_tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def hidden_share(bulk: Row, layerwise: Row) -> float | None:
    """The share of the bulk onboard's load time the layer-wise row hides: the median over the turns of (bulk TTFT -
    layer-wise TTFT) of the same turn, over the bulk row's median load ms (the goal: 80% where the new tokens'
    compute outlasts the transfer); None without a timed load. The rows run in turns, the bulk request right before
    the layer-wise one, and a host-bound forward's speed drifts between turns more than within one: on an H100 the
    Llama-3.1-8B shape's 2k bulk hits took 33.6-49.7 ms over nine turns, and the medians' difference read 158% of
    the 6.0 ms load where the turns' differences give 80%."""
    turns = [b - w for b, w in zip(bulk.ttft_all_ms, layerwise.ttft_all_ms)]
    if not turns or not bulk.load_ms or bulk.load_ms <= 0:
        return None
    return statistics.median(turns) / bulk.load_ms


def share_bound(bulk: Row, layerwise: Row) -> float | None:
    """The share of the bulk onboard's load time a layer-wise row hides when its forward takes as long as the bulk
    row's: ``1 - layer-wise load ms / bulk load ms``. Its own time before the forward (hashes, lookup, load plan,
    the start of the loads: the steps the bulk load begins with) is never hidden; waits for layer groups then
    lower the share further, a forward's drift between turns moves it either way. None without both load
    times."""
    if not bulk.load_ms or bulk.load_ms <= 0 or layerwise.load_ms is None:
        return None
    return 1.0 - layerwise.load_ms / bulk.load_ms


def _note_hidden_share(rows: list[Row], model_name: str, prefix: int) -> None:
    """Add the layer-wise row's `hidden_share` of this prefix (and its `share_bound`) to its note and the log, when
    the bulk row ran too."""
    mine = {r.mode: r for r in rows if r.model == model_name and r.workload == "prefix" and r.prefix_tokens == prefix}
    bulk, layerwise = mine.get(G2), mine.get(G2_LAYERWISE)
    share = None if bulk is None or layerwise is None else hidden_share(bulk, layerwise)
    if share is not None:
        text = f"hides {100 * share:.0f}% of the bulk load ({bulk.load_ms:.1f} ms)"
        bound = share_bound(bulk, layerwise)
        if bound is not None:
            text += f"; its {layerwise.load_ms:.1f} ms before the forward leave {100 * bound:.0f}% at equal forwards"
        layerwise.note = "; ".join(n for n in (layerwise.note, text) if n)
        log(f"{model_name} prefix {prefix}: {G2_LAYERWISE} {text}")


def measure_pcie(reference: Reference, num_blocks: int, device: torch.device, reps: int,
                 scratch: dict[str, torch.Tensor], capacity: int = 0) -> tuple[float, int]:
    """``(median seconds, bytes)`` of one pinned host -> device copy of the first ``num_blocks`` recorded blocks'
    bytes (copied into the pinned buffer first); on the CPU a plain memcpy. The buffers stay in ``scratch``,
    allocated for at least ``capacity`` bytes."""
    parts = [t[:, :num_blocks].reshape(-1).view(torch.uint8) for t in reference.store]
    nbytes = sum(p.numel() for p in parts)
    gpu = device.type == "cuda"
    if scratch.get("host") is None or scratch["host"].numel() < nbytes:
        scratch.clear()
        size = max(nbytes, capacity)
        scratch["host"] = torch.empty(size, dtype=torch.uint8, pin_memory=gpu)
        scratch["dev"] = torch.empty(size, dtype=torch.uint8, device=device)
    host, dev = scratch["host"][:nbytes], scratch["dev"][:nbytes]
    offset = 0
    for p in parts:
        host[offset:offset + p.numel()].copy_(p)
        offset += p.numel()
    times = []
    for _ in range(reps + 1):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync(device)
            start.record()
            dev.copy_(host, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dev.copy_(host)
            times.append(time.perf_counter() - t)
    chunk = 1 << 28
    for start in range(0, nbytes, chunk):
        if not torch.equal(dev[start:start + chunk], host[start:start + chunk].to(device)):
            raise RuntimeError("the PCIe copy did not reproduce its bytes")
    return statistics.median(times[1:]), nbytes


class Calibration:
    """Prefill time as ``a*T + b*T^2`` fitted on two lengths, for the estimates printed before each part."""

    def __init__(self, engine: Engine, vocab: int, lengths: tuple[int, int]) -> None:
        rng = random.Random(1)
        times = []
        for n in lengths:
            engine.evict_all()
            engine.run_request(_random_tokens(rng, n, vocab))
            times.append(min(engine.run_request(_random_tokens(rng, n, vocab)).ttft_s for _ in range(2)))
            engine.evict_all()
        (n1, n2), (t1, t2) = lengths, times
        self.b = max((t2 / n2 - t1 / n1) / (n2 - n1), 0.0)
        self.a = max(t1 / n1 - self.b * n1, 1e-9)

    def prefill(self, tokens: int, cached: int = 0) -> float:
        """Seconds for ``tokens`` new tokens after ``cached`` cached ones."""
        return self.a * tokens + self.b * tokens * (tokens + 2 * cached)


@dataclass
class Setup:
    """One model's engine, kvbm sides and what is shared between its parts."""

    shape: ModelShape
    engine: Engine
    caches: list[torch.Tensor]
    sides: dict[str, KvbmSide]
    unavailable: dict[str, str]
    block_bytes: int
    forward: str  #: how the forwards run (`_runner`)
    calibration: Calibration | None = None
    layer_waits: dict[str, Any] | None = None
    rule: CostRule | None = None  #: the cost rule on the G3_AUTO side (kept across parts, as it learns)
    layer_stores: dict[str, Any] | None = None  #: stores after the forward against per layer group


@contextlib.contextmanager
def whole_stores(sides: Sequence[KvbmSide]) -> Iterator[None]:
    """Within: the sides' store backlog rule is off (``DYN_KVBM_MAX_STORE_BACKLOG_MS`` 0), so a store is never cut."""
    saved = [s.leader.backlog.max_seconds for s in sides]
    for s in sides:
        s.leader.backlog.max_seconds = 0.0
    try:
        yield
    finally:
        for s, seconds in zip(sides, saved):
            s.leader.backlog.max_seconds = seconds


def _probe(engine: Engine, side: KvbmSide, vocab: int) -> str | None:
    """Store two blocks through ``side`` and load them back; why that failed, or None."""
    rng = random.Random(7)
    prompt = _random_tokens(rng, 2 * BLOCK_SIZE, vocab)
    reference = Reference(engine.caches, 4)
    try:
        engine.evict_all()
        engine.run_request(prompt, [side], record=reference)
        engine.drain([side])
        engine.evict_all()
        result = engine.run_request(prompt + _random_tokens(rng, BLOCK_SIZE, vocab), [side], reference=reference)
        engine.evict_all()
    except Exception as exc:  # noqa: BLE001 - any failure: the mode is reported with its reason
        engine.abandon(side)
        return f"{type(exc).__name__}: {exc}"
    if result.loaded_tokens != 2 * BLOCK_SIZE or result.bad_blocks or result.load_errors:
        return (f"probe loaded {result.loaded_tokens} of {2 * BLOCK_SIZE} tokens, {result.bad_blocks} bad blocks, "
                f"{result.load_errors} load errors")
    return None


def build(args: argparse.Namespace, name: str, device: torch.device, dtype: torch.dtype) -> Setup:
    """The model, G1 sized for the largest part, and one kvbm side per kvbm mode asked for."""
    shape = SHAPES[name] if args.layers is None else SHAPES[name].with_layers(args.layers)
    t = time.perf_counter()
    model = DecoderModel(shape, device, dtype, seed=0)
    sync(device)
    log(f"{shape.name}: {model.num_parameters() / 1e9:.2f} B parameters ({dtype}) on {device} in "
        f"{time.perf_counter() - t:.1f} s")
    runner, forward = _runner(args, model)
    log(f"{shape.name}: forwards {forward}")
    prefix_blocks = 2 * (max(args.prefixes) + args.new_tokens) // BLOCK_SIZE + 8 if "prefix" in args.workloads else 0
    qa = qa_workload(args, shape.vocab)
    qa_blocks = qa_g1_blocks(args, qa) if "qa" in args.workloads else 0
    num_g1 = max(prefix_blocks, qa_blocks, 256)
    with torch.inference_mode(False):  # normal tensors: kvbm's threads may write them outside inference mode
        caches = allocate_kv_caches(shape, num_g1, dtype, device)
    block_bytes = shape.block_bytes_per_element * caches[0].element_size()
    engine = Engine(runner, caches, G1Pool(range(num_g1)))
    tier_blocks = max(max(args.prefixes) // BLOCK_SIZE if "prefix" in args.workloads else 0,
                      qa_unique_blocks(qa) if "qa" in args.workloads else 0) * 11 // 10 + 128
    log(f"{shape.name}: G1 {num_g1} blocks of {block_bytes / 2**20:.2f} MiB ({num_g1 * block_bytes / 1e9:.1f} GB); "
        f"offload tiers {tier_blocks} blocks ({tier_blocks * block_bytes / 1e9:.1f} GB each)")
    sides: dict[str, KvbmSide] = {}
    unavailable: dict[str, str] = {}
    for mode in dict.fromkeys(side_mode(MODES[m]) for m in args.modes if MODES[m] in KVBM_MODES):
        if mode == G3_GDS and device.type != "cuda":
            unavailable[mode] = "needs a GPU"
            continue
        t = time.perf_counter()
        try:
            if mode == G2:
                side = KvbmSide.create(mode, caches, host_blocks=tier_blocks)
            else:  # G3_AUTO: a G3 posix side of its own (its own file, its own rule)
                side = KvbmSide.create(mode, caches, disk_blocks=tier_blocks, disk_dir=args.disk_dir,
                                       disk_io="gds" if mode == G3_GDS else "posix")
        except Exception as exc:  # noqa: BLE001 - any failure: the mode is reported with its reason
            unavailable[mode] = f"{type(exc).__name__}: {exc}"
            log(f"{shape.name}: {mode} unavailable: {unavailable[mode]}")
            continue
        why = _probe(engine, side, shape.vocab)
        if why is not None:
            unavailable[mode] = why
            log(f"{shape.name}: {mode} unavailable: {why}")
            with contextlib.suppress(Exception):  # the side is dropped either way
                side.close()
            continue
        sides[mode] = side
        log(f"{shape.name}: {mode} ready ({side.tier}, {tier_blocks} blocks) in {time.perf_counter() - t:.1f} s")
    rule = CostRule(sides[G3_AUTO]) if G3_AUTO in sides else None  # attached after the probe: nothing learned yet
    engine.sides = list(sides.values())  # from now on each side's rule learns from every step the engine runs
    return Setup(shape, engine, caches, sides, unavailable, block_bytes, forward, rule=rule)


def _runner(args: argparse.Namespace, model: DecoderModel) -> tuple[DecoderModel | GraphedPrefill, str]:
    """What runs the forwards, and how it runs them in words: on a GPU, unless ``--eager``, the model with CUDA
    graphs between attentions (`GraphedPrefill`); the model itself (eager) without a GPU, with ``--eager``, or where
    the capture fails (the reason is in the words)."""
    if model.device.type != "cuda":
        return model, "eager (no GPU)"
    if args.eager:
        return model, "eager (--eager)"
    t = time.perf_counter()
    try:
        runner = GraphedPrefill(model)
        sync(model.device)
    except Exception as exc:  # noqa: BLE001 - the bench goes on with eager forwards, and says so
        return model, f"eager: CUDA graphs not captured ({type(exc).__name__}: {exc})"
    return runner, (f"CUDA graphs between attentions for up to {runner.sizes[-1]} tokens "
                    f"({', '.join(map(str, runner.sizes))}; captured in {time.perf_counter() - t:.1f} s), "
                    f"longer prefills eager")


def _bytes_word(ok: bool | None) -> str:
    return {None: "not checked (nothing loaded)", True: "ok", False: "WRONG"}[ok]


def _timed(reps: int, warmup: int, run: Callable[[], RequestResult]) -> list[RequestResult]:
    results = [run() for _ in range(warmup + reps)]
    return results[warmup:]


def _timed_in_turns(reps: int, warmup: int, runs: dict[str, Callable[[], RequestResult]]
                    ) -> tuple[dict[str, list[RequestResult]], dict[str, Exception]]:
    """Run every one of ``runs`` ``warmup`` times, then ``reps`` times, one request of each in turn, so that a drift
    of the host's speed during the run (the eager-mode runner is host-bound at short prompts) is shared by every row
    compared; the results after the warm-ups by name, and the exception of each run that raised (not run again)."""
    results: dict[str, list[RequestResult]] = {name: [] for name in runs}
    raised: dict[str, Exception] = {}
    for _ in range(warmup + reps):
        for name, run in runs.items():
            if name in raised:
                continue
            try:
                results[name].append(run())
            except Exception as exc:  # noqa: BLE001 - reported by the caller as that row's failure
                raised[name] = exc
    return {name: r[warmup:] for name, r in results.items() if name not in raised}, raised


def _failed(setup: Setup, mode: str, exc: Exception, row: Row) -> Row:
    """A kvbm mode that raised: drop its side (the engine starts from an empty G1) and say why in ``row``."""
    side = setup.sides.pop(mode)
    setup.engine.abandon(side)
    with contextlib.suppress(Exception):  # the side is dropped either way
        side.close()
    setup.unavailable[mode] = f"failed: {type(exc).__name__}: {exc}"
    row.bytes_ok, row.note = False, setup.unavailable[mode]
    log(f"{row.model} {row.workload} {row.prefix_tokens or ''}: {mode} {row.note}")
    return row


def run_prefix(args: argparse.Namespace, setup: Setup, prefix: int, scratch: dict[str, torch.Tensor]) -> list[Row]:
    """Workload (a) for one prefix length: recompute, G1 hit, each kvbm mode, lower bound."""
    eng, shape, new = setup.engine, setup.shape, args.new_tokens
    rng = random.Random(prefix)
    tokens = _random_tokens(rng, prefix, shape.vocab)
    fresh = lambda: _random_tokens(rng, new, shape.vocab)  # new tokens differ per repetition
    name, rows = shape.name, []
    modes = [MODES[m] for m in args.modes]

    def quiet() -> None:
        """Every side's moves done (the last request's stores, cascades to disk), so that no request is timed beside
        another row's background work."""
        eng.drain(eng.sides)
    if RECOMPUTE in modes:
        def recompute() -> RequestResult:
            eng.evict_all()
            quiet()
            return eng.run_request(tokens + fresh())
        t = time.perf_counter()
        rows.append(_row_from(name, "prefix", RECOMPUTE, _timed(args.reps, args.warmup, recompute),
                              prefix=prefix, new=new))
        log(f"{name} prefix {prefix}: {RECOMPUTE} median {rows[-1].ttft_ms:.1f} ms ({time.perf_counter() - t:.1f} s)")
    sides = list(setup.sides.values())
    reference = Reference(setup.caches, prefix // BLOCK_SIZE)
    eng.evict_all()
    t = time.perf_counter()
    with whole_stores(sides):  # every row loads the whole prefix, so it is stored whole however slow the tier
        first = eng.run_request(tokens, sides, record=reference)
        eng.drain(sides)
    log(f"{name} prefix {prefix}: first run (prefill {first.ttft_s * 1e3:.1f} ms, stored to "
        f"{', '.join(s.name for s in sides) or 'nothing'}) in {time.perf_counter() - t:.1f} s")

    def hit(side: KvbmSide, layerwise: bool) -> RequestResult:
        eng.evict_all()
        quiet()
        return eng.run_request(tokens + fresh(), [side], reference=reference, layerwise=layerwise)

    def g1_hit() -> RequestResult:
        quiet()
        return eng.run_request(tokens + fresh())
    # the G1 hit and the modes without a rule run in turns (a kvbm hit leaves the prefix in G1 for the next G1 hit)
    plain: dict[str, Callable[[], RequestResult]] = {G1_HIT: g1_hit}
    for mode in modes:
        if mode in KVBM_MODES and mode != G3_AUTO and setup.sides.get(side_mode(mode)) is not None:
            plain[mode] = functools.partial(hit, setup.sides[side_mode(mode)], mode == G2_LAYERWISE)
    t = time.perf_counter()
    in_turns, raised = _timed_in_turns(args.reps, args.warmup, plain)
    if G1_HIT in raised:
        raise raised[G1_HIT]
    g1 = in_turns[G1_HIT]
    g1_row = _row_from(name, "prefix", G1_HIT, g1, prefix=prefix, new=new)
    if any(r.g1_hit_tokens != prefix for r in g1):
        g1_row.note = f"G1 hits {[r.g1_hit_tokens for r in g1]} tokens, expected {prefix}"
    rows.append(g1_row)
    log(f"{name} prefix {prefix}: {', '.join(plain)} in turns ({time.perf_counter() - t:.1f} s); "
        f"{G1_HIT} median {g1_row.ttft_ms:.1f} ms")
    for mode in modes:
        if mode not in KVBM_MODES:
            continue
        side = setup.sides.get(side_mode(mode))
        if side is None:
            rows.append(Row(name, "prefix", mode, prefix, new, note=f"unavailable: "
                            f"{setup.unavailable.get(side_mode(mode))}" + (f"; {GDS_NOTE}" if mode == G3_GDS else "")))
            continue
        t = time.perf_counter()
        rule = setup.rule if mode == G3_AUTO else None
        decisions: list[RuleDecision] = []
        probe_note = ""
        try:
            if mode in raised:
                raise raised[mode]
            if rule is not None:
                hit_rule = functools.partial(hit, side, False)
                if not rule.measured and rule.enabled:  # untimed: the rule's first measurement of the disk
                    result, _ = rule.run(hit_rule)
                    probe_note = (f"probe before warm-up: {result.loaded_tokens} tokens loaded with the rule off in "
                                  f"{result.load_wait_s * 1e3:.1f} ms")

                def through_rule() -> RequestResult:
                    result, decision = rule.run(hit_rule)
                    decisions.append(decision)
                    return result
                timed = _timed(args.reps, args.warmup, through_rule)
                decisions = decisions[args.warmup:]
            else:
                timed = in_turns[mode]
        except Exception as exc:  # noqa: BLE001 - any failure: the mode is reported with its reason
            rows.append(_failed(setup, side_mode(mode), exc, Row(name, "prefix", mode, prefix, new)))
            continue
        rows.append(_row_from(name, "prefix", mode, timed, prefix=prefix, new=new,
                              expect_loaded=(prefix,) if rule is None else (0, prefix)))
        r = rows[-1]
        rule_text = ""
        if rule is not None:
            rule_text, r.rule = rule_note(rule, decisions)
        r.note = "; ".join(n for n in (r.note, rule_text, probe_note, side.disk_note) if n)
        log(f"{name} prefix {prefix}: {mode} median {r.ttft_ms:.1f} ms (load {r.load_ms:.1f} ms), "
            f"{r.checked_blocks} blocks checked, bytes {_bytes_word(r.bytes_ok)}"
            + (f" ({time.perf_counter() - t:.1f} s); {rule_text}" if rule is not None else ""))
    _note_hidden_share(rows, name, prefix)
    eng.evict_all()
    pcie_s, nbytes = measure_pcie(reference, prefix // BLOCK_SIZE, setup.engine.device, args.reps, scratch,
                                  max(args.prefixes) // BLOCK_SIZE * setup.block_bytes)
    bound = Row(name, "prefix", LOWER_BOUND, prefix, new, ttft_ms=pcie_s * 1e3 + g1_row.ttft_ms, load_ms=pcie_s * 1e3,
                forward_ms=g1_row.ttft_ms,
                note=f"PCIe {nbytes / 1e6:.1f} MB at {nbytes / pcie_s / 1e9:.1f} GB/s + G1-hit compute")
    rows.append(bound)
    log(f"{name} prefix {prefix}: {LOWER_BOUND} {bound.ttft_ms:.1f} ms ({bound.note})")
    side = setup.sides.get(G2)
    if prefix == args.layer_wait_prefix and G2_LAYERWISE in modes and side is not None:
        if eng.device.type != "cuda":
            setup.layer_waits = {"note": "needs a GPU (CUDA events time each layer)"}
        else:
            t = time.perf_counter()
            setup.layer_waits = measure_layer_waits(eng, side, tokens, args.layer_wait_busy, shape.vocab, args.reps)
            w = setup.layer_waits
            log(f"{name} prefix {prefix}: layer-wise onboard beside a {args.layer_wait_busy}-token prefill: "
                f"layer groups finish at most {w['max_delay_us']:.0f} us (median {w['median_delay_us']:.0f} us) later "
                f"than alone; {w['per_group_alone_us']:.0f} us per layer group alone; each scatter waits at most "
                f"{w['max_scatter_wait_us']:.0f} us (median {w['median_scatter_wait_us']:.0f} us) longer "
                f"({time.perf_counter() - t:.1f} s)")
    return rows


def qa_workload(args: argparse.Namespace, vocab: int) -> ChatWorkload:
    """The multi-round QA workload of the options."""
    return ChatWorkload(num_users=args.qa_users, num_rounds=args.qa_rounds, system_prompt_tokens=args.qa_system,
                        question_tokens=args.qa_question, answer_tokens=args.qa_answer, active_users=args.qa_active,
                        vocab_size=vocab, seed=0)


def qa_unique_blocks(qa: ChatWorkload) -> int:
    """Distinct full blocks of every prompt and answer (the working set)."""
    per_user = (qa.num_rounds * (qa.question_tokens + qa.answer_tokens)) // BLOCK_SIZE + 2
    return qa.system_prompt_tokens // BLOCK_SIZE + qa.num_users * per_user


def qa_g1_blocks(args: argparse.Namespace, qa: ChatWorkload) -> int:
    """G1 blocks for the QA workload: ``--qa-g1-tokens``, else a quarter of the working set, at least the largest
    request with its answer."""
    largest = qa.system_prompt_tokens + qa.num_rounds * (qa.question_tokens + qa.answer_tokens)
    need = -(-largest // BLOCK_SIZE) + 2
    if args.qa_g1_tokens is not None:
        blocks = args.qa_g1_tokens // BLOCK_SIZE
        if blocks < need:
            raise SystemExit(f"--qa-g1-tokens {args.qa_g1_tokens} cannot hold the largest request ({largest} tokens)")
        return blocks
    return max(need, qa_unique_blocks(qa) // 4)


def run_qa(args: argparse.Namespace, setup: Setup) -> list[Row]:
    """Workload (b): every request of the multi-round QA in arrival order, per mode; mean TTFT. With ``--qa-passes``
    N the modes run N times in turn (a pass of each, then the next), each pass from cold tiers, so that a drift of
    the machine between passes touches every mode; a row is over all passes' requests and lists each pass's mean."""
    eng, shape = setup.engine, setup.shape
    qa = qa_workload(args, shape.vocab)
    g1_blocks = qa_g1_blocks(args, qa)
    label = (f"QA {qa.num_users}u x {qa.num_rounds}r, sys {qa.system_prompt_tokens}, q {qa.question_tokens}, "
             f"a {qa.answer_tokens}, G1 {g1_blocks * BLOCK_SIZE} tok / working set "
             f"{qa_unique_blocks(qa) * BLOCK_SIZE} tok")
    modes = [MODES[m] for m in args.modes]
    results: dict[str, list[RequestResult]] = {mode: [] for mode in modes}  # each pass's requests in turn
    decisions: list[RuleDecision] = []  # the cost rule's, over its mode's passes
    seconds = dict.fromkeys(modes, 0.0)
    failed: dict[str, Row] = {}
    full_pool = eng.pool
    eng.evict_all()
    # each pass of each mode hashes its blocks with a salt of its own: its tier starts cold, as the recompute row's
    # G1 does, whatever an earlier pass or mode on the same side stored (the G2 side serves two modes)
    try:
        eng.pool = G1Pool(range(g1_blocks))
        for qa_pass in range(args.qa_passes):
            for k, mode in enumerate(modes):
                side = setup.sides.get(side_mode(mode))
                if mode in failed or (mode in KVBM_MODES and side is None):
                    continue
                salt = qa_pass * len(modes) + k + 1
                eng.pool.reset()
                eng.poison()
                reference = None  # the previous mode's is freed before this one's is allocated
                reference = Reference(setup.caches, qa_unique_blocks(qa) + 16) if side is not None else None
                passes = f" (pass {qa_pass + 1} of {args.qa_passes})" if args.qa_passes > 1 else ""
                log(f"{shape.name} QA: {mode}{passes}: {qa.num_requests} requests")
                rule = setup.rule if mode == G3_AUTO else None
                mine: list[RequestResult] = []
                t = time.perf_counter()
                try:
                    for req in qa.requests():
                        def request(req: Any = req, side: KvbmSide | None = side) -> RequestResult:
                            return eng.run_request(req.prompt, [side] if side else [], answer=req.answer,
                                                   reference=reference, record=reference,
                                                   request_id=f"qa-{req.user}-{req.round}",
                                                   layerwise=mode == G2_LAYERWISE, salt=salt)
                        if rule is None:
                            mine.append(request())
                        else:
                            result, decision = rule.run(request)
                            mine.append(result)
                            decisions.append(decision)
                    eng.finish_held()
                except Exception as exc:  # any failure: the mode is reported with its reason
                    if side is None:
                        raise
                    failed[mode] = _failed(setup, side_mode(mode), exc, Row(shape.name, label, mode))
                    continue
                results[mode] += mine
                seconds[mode] += time.perf_counter() - t
                if args.qa_passes > 1:
                    mean_ms = statistics.fmean(r.ttft_s for r in mine) * 1e3
                    log(f"{shape.name} QA: {mode}{passes} mean TTFT {mean_ms:.1f} ms")
    finally:
        eng.finish_held()
        eng.pool = full_pool
        eng.evict_all()
    rows = []
    for mode in modes:
        side = setup.sides.get(side_mode(mode))
        if mode in failed:
            rows.append(failed[mode])
            continue
        if not results[mode]:
            rows.append(Row(shape.name, label, mode, note=f"unavailable: {setup.unavailable.get(side_mode(mode))}"))
            continue
        row = _row_from(shape.name, label, mode, results[mode], prefix=None, new=None, mean=True)
        per_pass_requests = qa.num_requests
        row.pass_means_ms = [round(statistics.fmean(r.ttft_s for r in results[mode][i:i + per_pass_requests]) * 1e3, 3)
                             for i in range(0, len(results[mode]), per_pass_requests)]
        rule_text = ""
        if mode == G3_AUTO and setup.rule is not None:
            rule_text, row.rule = rule_note(setup.rule, decisions)
        waits = (f"waited {row.block_wait_ms:.1f} ms a request for G1 blocks stores still read"
                 if row.block_wait_ms >= 0.05 else "")
        per_pass = ("pass means " + " / ".join(f"{m:.1f}" for m in row.pass_means_ms) + " ms"
                    if len(row.pass_means_ms) > 1 else "")
        row.note = "; ".join(n for n in (rule_text, waits, per_pass, side.disk_note if side is not None else "")
                             if n)
        rows.append(row)
        log(f"{shape.name} QA: {mode} mean TTFT {row.ttft_ms:.1f} ms over {row.requests} requests; tokens from "
            f"G1 {row.g1_hit_tokens}, loaded {row.loaded_tokens}, computed {row.computed_tokens}"
            + (f", bytes {_bytes_word(row.bytes_ok)}" if side is not None else "")
            + (f"; {rule_text}" if rule_text else "") + (f"; {per_pass}" if per_pass else "")
            + f" ({seconds[mode]:.1f} s)")
    return rows


def estimate(args: argparse.Namespace, setup: Setup) -> dict[str, float]:
    """Seconds each part should take (from the calibration and assumed G2/G3 rates)."""
    c, new, bb = setup.calibration, args.new_tokens, setup.block_bytes
    runs = args.reps + args.warmup
    est: dict[str, float] = {}
    if "prefix" in args.workloads:
        for p in args.prefixes:
            nbytes = p // BLOCK_SIZE * bb
            hit = c.prefill(new, p)
            s = c.prefill(p) + hit * runs
            if "recompute" in args.modes:
                s += c.prefill(p + new) * runs
            for mode in [MODES[m] for m in args.modes if side_mode(MODES[m]) in setup.sides]:
                rate = EST_HOST_RATE if side_mode(mode) == G2 else EST_DISK_RATE
                s += nbytes / rate + runs * (nbytes / rate + hit)
            est[f"prefix {p}"] = s
    if "qa" in args.workloads:
        qa = qa_workload(args, setup.shape.vocab)
        full = sum(c.prefill(len(r.prompt)) + c.prefill(len(r.answer), len(r.prompt)) for r in qa.requests())
        fresh = sum(c.prefill(qa.question_tokens, len(r.prompt)) for r in qa.requests())
        est["qa"] = 0.0
        for mode in [MODES[m] for m in args.modes]:
            if mode == RECOMPUTE:
                est["qa"] += full
            elif side_mode(mode) in setup.sides:
                rate = EST_HOST_RATE if side_mode(mode) == G2 else EST_DISK_RATE
                moved = sum(len(r.prompt) for r in qa.requests()) // BLOCK_SIZE * bb * 2
                est["qa"] += fresh + moved / rate
        est["qa"] *= args.qa_passes
    return est


def run_model(args: argparse.Namespace, name: str, device: torch.device, dtype: torch.dtype,
              part_times: dict[str, float]) -> tuple[list[Row], dict[str, Any]]:
    """Every part for one model; rows and the model's notes."""
    t = time.perf_counter()
    setup = build(args, name, device, dtype)
    rows: list[Row] = []
    try:
        lengths = (64, 256) if args.smoke else (1024, 4096)
        setup.calibration = Calibration(setup.engine, setup.shape.vocab, lengths)
        part_times[f"{setup.shape.name} init"] = time.perf_counter() - t
        est = estimate(args, setup)
        for part, seconds in est.items():
            log(f"{setup.shape.name}: estimate {part}: ~{seconds:.1f} s")
        log(f"{setup.shape.name}: estimate total ~{sum(est.values()):.1f} s")
        scratch: dict[str, torch.Tensor] = {}
        if "prefix" in args.workloads:
            for prefix in args.prefixes:
                log(f"{setup.shape.name} prefix {prefix}: start (estimate ~{est[f'prefix {prefix}']:.0f} s)")
                t = time.perf_counter()
                rows += run_prefix(args, setup, prefix, scratch)
                part_times[f"{setup.shape.name} prefix {prefix}"] = time.perf_counter() - t
            side = setup.sides.get(G2)
            if args.layer_store_tokens and side is not None:
                tokens = min(args.layer_store_tokens, max(args.prefixes))  # (G1 and G2 are sized for the prefixes)
                t = time.perf_counter()
                setup.layer_stores = measure_layer_stores(setup.engine, side, tokens, setup.shape.vocab, args.reps)
                log(f"{setup.shape.name}: stores of a {tokens}-token prefill" + "".join(
                    f"; {mode}: TTFT {v['ttft_ms']:.1f} ms, done {v['tail_ms']:.1f} ms after the first token"
                    for mode, v in setup.layer_stores.items()) + f" ({time.perf_counter() - t:.1f} s)")
        scratch.clear()
        if "qa" in args.workloads:
            log(f"{setup.shape.name} QA: start (estimate ~{est['qa']:.0f} s)")
            t = time.perf_counter()
            rows += run_qa(args, setup)
            part_times[f"{setup.shape.name} qa"] = time.perf_counter() - t
        notes = {"forward": setup.forward, "unavailable": dict(setup.unavailable), "estimates_s": est,
                 "layer_waits": setup.layer_waits,
                 "layer_stores": setup.layer_stores,
                 "block_bytes": setup.block_bytes, "shape": asdict(setup.shape)}
    finally:
        for side in setup.sides.values():
            side.close()
        del setup
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, notes


# -- the run ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every loaded block's bytes matched."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = args.out or Path(__file__).resolve().parents[1] / "runs" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "triton": triton_version, "cuda": torch.version.cuda, "python": platform.python_version(),
        "commit": checkout_commit(Path(__file__).resolve().parents[2]),
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench.ttft", *argv]),
        "new_tokens": args.new_tokens, "reps": args.reps, "warmup": args.warmup,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "kvbm_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DYN_KVBM_")},
    }
    log(f"results go to {out}/; {meta['gpu'] or 'CPU'}, torch {meta['torch']}, triton {triton_version}")
    rows: list[Row] = []
    notes: dict[str, Any] = {}
    part_times: dict[str, float] = {}
    result: dict[str, Any] = {"meta": meta, "rows": [], "notes": notes, "part_times_s": part_times}

    def save() -> None:
        result["rows"] = [asdict(r) for r in rows]
        (out / "ttft.json").write_text(json.dumps(result, indent=1))

    with torch.inference_mode():
        for name in args.models:
            model_rows, notes[name] = run_model(args, name, device, dtype, part_times)
            rows.extend(model_rows)
            save()
    notes["layer-wise"] = (f"{G2_LAYERWISE}: the load starts with the request and runs beside its forward, one "
                           f"transfer per group of layers (DYN_KVBM_ONBOARD_LAYERS_PER_GROUP), each layer's attention "
                           f"waiting on the GPU for its own group; its load ms is the host time to start the load, "
                           f"the rest is in forward ms")
    notes["gds"] = GDS_NOTE
    result["total_s"] = time.perf_counter() - _T0
    save()
    md = table(result["rows"]) + note_lines(notes)
    (out / "ttft.md").write_text(f"# TTFT\n\n```\n{json.dumps(meta, indent=1)}\n```\n\n{md}\n")
    why_not = plot(result, out / "ttft.png")
    log("part times: " + ", ".join(f"{k} {v:.1f} s" for k, v in part_times.items()))
    log(f"wrote {out}/ttft.json, ttft.md" + (", ttft.png" if why_not is None else f" (no plot: {why_not})")
        + f"; total {result['total_s']:.1f} s")
    bad = [r for r in rows if r.bytes_ok is False]
    print(md, flush=True)
    if bad:
        log(f"{len(bad)} rows failed or loaded wrong bytes (see the bytes and note columns)")
    return 1 if bad else 0
