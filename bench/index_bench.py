"""Scheduler-side host time of a prefix hit (CPU only): the connector leader's ``lookup`` and ``plan_load`` of a
prompt held whole in G2, and the completion of its load moves (the holds released), per prefix length.

These run on the engine's scheduler thread before a hit's load starts, so they add to its time to first token. Each
figure is the median of ``--reps`` rounds of one request (lookup, plan, then every load move completed).

Usage: ``python -m bench.index_bench [--blocks 128,512,2048] [--reps 2000] [--out DIR]``
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import time
from pathlib import Path

from kvbm.config import KvbmConfig
from kvbm.connectors.leader import ConnectorLeader
from kvbm.hashing import sequence_hashes
from kvbm.tiers import kvbm_tiers

BLOCK_SIZE = 16
BLOCK_BYTES = 2 << 20  # (Llama-3.1-8B's block of 16 tokens; the index never sees bytes)


def measure(num_blocks: int, reps: int) -> dict:
    """Median microseconds of lookup, plan_load and the loads' completion for a hit of ``num_blocks`` blocks."""
    config = dataclasses.replace(KvbmConfig.from_env(), cpu_cache_gb=None,
                                 cpu_cache_override_num_blocks=2 * num_blocks)
    leader = ConnectorLeader(kvbm_tiers(config, BLOCK_BYTES), config, BLOCK_SIZE, block_bytes=BLOCK_BYTES)
    leader.cost.enabled = False  # every hit reported: the index's own cost
    rng = random.Random(num_blocks)
    hashes = sequence_hashes([rng.randrange(32000) for _ in range(num_blocks * BLOCK_SIZE)], BLOCK_SIZE, 0)
    for move in leader.index.plan_store(hashes, list(range(num_blocks))).moves:
        leader.index.complete(move.move_id, {})
    engine_ids = list(range(num_blocks, 2 * num_blocks))
    times: dict[str, list[float]] = {"lookup": [], "plan_load": [], "complete": []}
    for rep in range(reps + reps // 10):  # the first tenth warms up
        t0 = time.perf_counter()
        found, _ = leader.lookup(hashes, whole_prompt=False)
        t1 = time.perf_counter()
        load = leader.plan_load(f"r{rep}", hashes[:found], engine_ids[:found])
        t2 = time.perf_counter()
        for move in load.moves:
            leader.index.complete(move.move_id, {})
        t3 = time.perf_counter()
        leader.take_step()  # (hands the planned load out, as the engine's step does)
        if found != num_blocks or load.missing:
            raise AssertionError(f"{num_blocks} blocks stored, {found} found, {len(load.missing)} missing")
        if rep >= reps // 10:
            for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[name].append(seconds)
    leader.index.check_invariants()
    return {"blocks": num_blocks, **{f"{name}_us": statistics.median(v) * 1e6 for name, v in times.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="128,512,2048", help="prefix lengths in blocks of 16 tokens")
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    rows = []
    for n in (int(b) for b in args.blocks.split(",")):
        rows.append(measure(n, args.reps))
        r = rows[-1]
        print(f"[index_bench] {n} blocks: lookup {r['lookup_us']:.1f} us, plan_load {r['plan_load_us']:.1f} us, "
              f"completion {r['complete_us']:.1f} us", flush=True)
    table = ["| blocks (tokens) | lookup us | plan_load us | loads completed us |", "|---|---|---|---|"]
    table += [f"| {r['blocks']} ({r['blocks'] * BLOCK_SIZE}) | {r['lookup_us']:.1f} | {r['plan_load_us']:.1f} | "
              f"{r['complete_us']:.1f} |" for r in rows]
    print("\n".join(table))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                "reps": args.reps}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "results.md").write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
