"""Disaggregated prefill -> decode with DynamoConnector: vLLM 0.33's real scheduler in separate OS processes, a
prefill instance (``kv_producer``) and a decode instance (``kv_consumer``), each with its own worker, G2 pool and
NIXL agent, exchanging blocks over UCX on loopback TCP (`pd_peers`). The test is the proxy: it hands the params a
prefill returns to a decode instance. Every byte a decode instance reads is checked against the deterministic model
in that instance; a wrong byte fails the test there.
"""
from __future__ import annotations

import random
import signal

import pytest

from nixl_peers import Processes
from pd_peers import instance_main

BLOCK = 16


def _prompt(rng: random.Random, num_tokens: int) -> list[int]:
    return [rng.randrange(1, 4096) for _ in range(num_tokens)]


def _start(procs: Processes, role: str, host_blocks: int = 256, **extra):
    proc = procs.start(instance_main, role, host_blocks, extra)
    return proc


def _ready(procs: Processes, *instances) -> list[int]:
    return [procs.recv(p, timeout=180)[1] for p in instances]


def _decode(procs, decoder, request_id, prompt, params, max_tokens=4) -> dict:
    return procs.ask(decoder, "decode", request_id, prompt, params, max_tokens, timeout=120)[1]


def _check_loaded(summary: dict, prompt: list[int], max_tokens: int) -> None:
    """The decode computed only what the prefill could not hand over, and produced every token."""
    full = len(prompt) // BLOCK
    loaded = full * BLOCK - (1 if full * BLOCK == len(prompt) else 0)  # a whole-prompt hit recomputes one token
    assert summary["failed_blocks"] == 0, summary
    assert summary["external"] == full * BLOCK, summary
    assert summary["computed"] == len(prompt) - loaded + max_tokens - 1, summary
    assert len(summary["output"]) == max_tokens


def test_1p1d_decode_loads_prefill_blocks_byte_exact() -> None:
    """Prompts of random lengths (partial and whole last blocks) prefilled on P, decoded on D from P's G2: D
    computes only the tail, reads every loaded byte right, and P's pins end when D has read."""
    rng = random.Random(11)
    procs = Processes()
    try:
        prefill, decode = _start(procs, "kv_producer"), _start(procs, "kv_consumer")
        _ready(procs, prefill, decode)
        for k, length in enumerate([rng.randrange(40, 300) for _ in range(4)] + [128]):
            prompt = _prompt(rng, length)
            params = procs.ask(prefill, "prefill", f"p{k}", prompt, timeout=120)[1]
            assert params["do_remote_prefill"] and len(params["kvbm"]["slots"]) == length // BLOCK
            summary = _decode(procs, decode, f"d{k}", prompt, params)
            _check_loaded(summary, prompt, 4)
        for _ in range(200):  # the notifications reach P's workers while it steps
            if procs.ask(prefill, "pins")[1] == 0:
                break
        assert procs.ask(prefill, "pins")[1] == 0
    finally:
        procs.close()


def test_2p2d_requests_cross_instances() -> None:
    """Two prefill and two decode instances; each request is prefilled on one P and decoded on either D, so each D
    reads from both P's (two peers per agent)."""
    rng = random.Random(23)
    procs = Processes()
    try:
        prefills = [_start(procs, "kv_producer") for _ in range(2)]
        decodes = [_start(procs, "kv_consumer") for _ in range(2)]
        _ready(procs, *prefills, *decodes)
        shared = _prompt(rng, 64)  # a common prefix: D's own prefix cache and G2 hits mix with remote loads
        for k in range(6):
            prompt = (shared if k % 2 else []) + _prompt(rng, rng.randrange(20, 200))
            p, d = prefills[k % 2], decodes[(k // 2) % 2]
            params = procs.ask(p, "prefill", f"p{k}", prompt, timeout=120)[1]
            summary = _decode(procs, d, f"d{k}", prompt, params)
            assert summary["failed_blocks"] == 0 and len(summary["output"]) == 4, summary
            assert summary["computed"] < len(prompt) - BLOCK + 4, summary  # most of the prompt came from a P
    finally:
        procs.close()


def test_prefill_instance_killed_decode_recomputes() -> None:
    """P is SIGKILLed after handing out params: D's load fails (no bytes served), D recomputes the whole prompt,
    byte-exact, and stays usable."""
    rng = random.Random(5)
    procs = Processes()
    try:
        prefill, decode = _start(procs, "kv_producer"), _start(procs, "kv_consumer", DYN_KVBM_PD_LOAD_TIMEOUT_SECS=5)
        pid, _ = _ready(procs, prefill, decode)
        prompt = _prompt(rng, 150)
        params = procs.ask(prefill, "prefill", "p0", prompt, timeout=120)[1]
        procs.conns[prefill].close()
        import os

        os.kill(pid, signal.SIGKILL)
        prefill.join(10)
        summary = _decode(procs, decode, "d0", prompt, params)
        assert summary["failed_blocks"] == len(prompt) // BLOCK, summary
        assert summary["computed"] == len(prompt) + 3 and len(summary["output"]) == 4, summary
        again = _decode(procs, decode, "d1", _prompt(rng, 40), None)  # still serving
        assert again["computed"] == 40 + 3
    finally:
        procs.procs = [p for p in procs.procs if p.is_alive()]
        procs.close()


@pytest.mark.parametrize("bad", ["no-section", "bad-endpoint", "other-prompt"])
def test_bad_or_foreign_params_are_computed_locally(bad: str) -> None:
    """Params without the kvbm section, with a garbled endpoint, or for another prompt: D computes the prompt
    itself (nothing loaded from the wrong place), byte-exact."""
    rng = random.Random(7)
    procs = Processes()
    try:
        prefill, decode = _start(procs, "kv_producer"), _start(procs, "kv_consumer", DYN_KVBM_PD_LOAD_TIMEOUT_SECS=5)
        _ready(procs, prefill, decode)
        prompt = _prompt(rng, 100)
        params = procs.ask(prefill, "prefill", "p0", prompt, timeout=120)[1]
        if bad == "no-section":
            params = {"do_remote_prefill": True}
        elif bad == "bad-endpoint":
            params["kvbm"]["endpoints"] = ["bm90IGFuIGVuZHBvaW50"]  # base64 of bytes that are no endpoint
        else:
            prompt = _prompt(rng, 100)
        summary = _decode(procs, decode, "d0", prompt, params)
        assert summary["external"] == 0 or bad == "bad-endpoint", summary
        assert summary["computed"] == len(prompt) + 3, summary
    finally:
        procs.close()
