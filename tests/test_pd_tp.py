"""Disaggregated prefill -> decode under tensor parallelism: a prefill and a decode instance of two ranks each, in
separate processes (`pd_peers`, ranks inline, each rank with its own worker, G2 shard and NIXL agent). Rank r of
the decode reads rank r of the prefill; every rank byte-checks what it reads for its own KV heads."""
from __future__ import annotations

import random

from nixl_peers import Processes
from pd_peers import instance_main

BLOCK = 16


def test_1p1d_two_ranks_each_rank_reads_its_peer_rank() -> None:
    rng = random.Random(31)
    procs = Processes()
    try:
        prefill = procs.start(instance_main, "kv_producer", 128, {}, 2)
        decode = procs.start(instance_main, "kv_consumer", 128, {"DYN_KVBM_PD_LOAD_TIMEOUT_SECS": 5}, 2)
        for p in (prefill, decode):
            procs.recv(p, timeout=300)
        for k, length in enumerate([rng.randrange(40, 250) for _ in range(3)]):
            prompt = [rng.randrange(1, 4096) for _ in range(length)]
            params = procs.ask(prefill, "prefill", f"t{k}", prompt, timeout=120)[1]
            assert len(params["kvbm"]["endpoints"]) == 2 and len(params["kvbm"]["slots"]) == length // BLOCK
            summary = procs.ask(decode, "decode", f"t{k}", prompt, params, 4, None, timeout=120)[1]
            assert summary["failed_blocks"] == 0 and summary["external"] == length // BLOCK * BLOCK, summary
            assert summary["computed"] == length % BLOCK + 3 + (length % BLOCK == 0), summary
        pins = 1
        for _ in range(200):
            pins = procs.ask(prefill, "pins")[1]
            if pins == 0:
                break
        assert pins == 0  # both reading ranks told their prefill rank
    finally:
        procs.close()
