"""Scheduler-side host time of a prefix hit (CPU only), per prefix length: the sequence hashes of the prompt (the
prefix and 256 new tokens), the connector leader's ``lookup`` and ``plan_load`` of the prefix held whole in G2, the
completion of its load moves (the holds released), and ``plan_stores`` of the whole prompt (the prefix found stored,
the 16 new blocks planned).

These run on the engine's scheduler thread around a hit's step, so they add to its time to first token. Each
figure is the median of ``--reps`` rounds of one request (new tokens each round).

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
NEW_TOKENS = 256  # after the prefix: 16 new blocks to store


def measure(num_blocks: int, reps: int) -> dict:
    """Median microseconds of the prompt's hashes, lookup, plan_load, the loads' completion and the stores' plan for
    a hit of ``num_blocks`` blocks."""
    config = dataclasses.replace(KvbmConfig.from_env(), cpu_cache_gb=None,
                                 cpu_cache_override_num_blocks=2 * num_blocks)
    leader = ConnectorLeader(kvbm_tiers(config, BLOCK_BYTES), config, BLOCK_SIZE, block_bytes=BLOCK_BYTES)
    leader.cost.enabled = False  # every hit reported: the index's own cost
    rng = random.Random(num_blocks)
    prefix = [rng.randrange(32000) for _ in range(num_blocks * BLOCK_SIZE)]
    hashes = sequence_hashes(prefix, BLOCK_SIZE, 0)
    for move in leader.index.plan_store(hashes, list(range(num_blocks))).moves:
        leader.index.complete(move.move_id, {})
    engine_ids = list(range(num_blocks, 2 * num_blocks + NEW_TOKENS // BLOCK_SIZE))
    times: dict[str, list[float]] = {"hashes": [], "lookup": [], "plan_load": [], "complete": [], "stores": []}
    for rep in range(reps + reps // 10):  # the first tenth warms up
        tokens = prefix + [rng.randrange(32000) for _ in range(NEW_TOKENS)]
        t0 = time.perf_counter()
        prompt_hashes = sequence_hashes(tokens, BLOCK_SIZE, 0)
        t1 = time.perf_counter()
        found, _ = leader.lookup(hashes, whole_prompt=False)
        t2 = time.perf_counter()
        load = leader.plan_load(f"r{rep}", hashes[:found], engine_ids[:found])
        t3 = time.perf_counter()
        for move in load.moves:
            leader.index.complete(move.move_id, {})
        t4 = time.perf_counter()
        leader.take_step()  # (hands the planned load out, as the engine's step does)
        if found != num_blocks or load.missing:
            raise AssertionError(f"{num_blocks} blocks stored, {found} found, {len(load.missing)} missing")
        state = leader.track(f"r{rep}", 0)
        state.hashes, state.block_ids = prompt_hashes, engine_ids[:len(prompt_hashes)]
        t5 = time.perf_counter()
        leader.plan_stores(state, tokens, len(prompt_hashes))
        t6 = time.perf_counter()
        stores = [m for store in leader.take_step().stores for m in store.moves]
        if sum(m.num_blocks for m in stores) != NEW_TOKENS // BLOCK_SIZE:
            raise AssertionError(f"{sum(m.num_blocks for m in stores)} blocks planned to store, expected "
                                 f"{NEW_TOKENS // BLOCK_SIZE}")
        for move in stores:
            leader.index.complete(move.move_id, {})
        leader.forget(f"r{rep}")
        if rep >= reps // 10:
            for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t6 - t5)):
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
        print(f"[index_bench] {n} blocks: hashes {r['hashes_us']:.1f} us, lookup {r['lookup_us']:.1f} us, "
              f"plan_load {r['plan_load_us']:.1f} us, completion {r['complete_us']:.1f} us, "
              f"stores planned {r['stores_us']:.1f} us", flush=True)
    table = ["| blocks (tokens) | hashes us | lookup us | plan_load us | loads completed us | stores planned us |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['blocks']} ({r['blocks'] * BLOCK_SIZE}) | {r['hashes_us']:.1f} | {r['lookup_us']:.1f} | "
              f"{r['plan_load_us']:.1f} | {r['complete_us']:.1f} | {r['stores_us']:.1f} |" for r in rows]
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
