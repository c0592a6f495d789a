"""Disaggregated prefill -> decode with DynamoConnector: vLLM 0.33's real scheduler in separate OS processes, a
prefill instance (``kv_producer``) and a decode instance (``kv_consumer``), each with its own worker, G2 pool and
NIXL agent, exchanging blocks over UCX on loopback TCP (`pd_peers`). The test is the proxy: it hands the params a
prefill returns to a decode instance. Every byte a decode instance reads is checked against the deterministic model
in that instance; a wrong byte fails the test there.
"""
from __future__ import annotations

import random
import time

import pytest

from nixl_peers import Processes
from pd_peers import instance_main

BLOCK = 16


def _prompt(rng: random.Random, num_tokens: int) -> list[int]:
    return [rng.randrange(1, 4096) for _ in range(num_tokens)]


def _start(procs: Processes, role: str, host_blocks: int = 256, **extra):
    return procs.start(instance_main, role, host_blocks, extra)


def _ready(procs: Processes, *instances) -> list[int]:
    return [procs.recv(p, timeout=300)[1] for p in instances]


class Cluster:
    """Two prefill and two decode instances, started once for the module (each imports vLLM: tens of seconds)."""

    def __init__(self) -> None:
        self.procs = Processes()
        self.prefills = [_start(self.procs, "kv_producer"), _start(self.procs, "kv_producer", host_blocks=64)]
        self.decodes = [_start(self.procs, "kv_consumer", DYN_KVBM_PD_LOAD_TIMEOUT_SECS=5) for _ in range(2)]
        _ready(self.procs, *self.prefills, *self.decodes)

    def prefill(self, k: int, request_id: str, prompt: list[int]) -> dict:
        return self.procs.ask(self.prefills[k], "prefill", request_id, prompt, timeout=120)[1]

    def decode(self, k: int, request_id: str, prompt: list[int], params, max_tokens: int = 4) -> dict:
        return _decode(self.procs, self.decodes[k], request_id, prompt, params, max_tokens)

    def pins(self, k: int) -> int:
        """Pins still held by prefill ``k`` once it stepped a while (readers' notifications arrive as it steps, and
        it steps only while no command is waiting: the asks are spaced out, for at most 30 s)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.procs.ask(self.prefills[k], "pins")[1] == 0:
                return 0
            time.sleep(0.05)
        return self.procs.ask(self.prefills[k], "pins")[1]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        yield c
    finally:
        c.procs.close()


def _decode(procs, decoder, request_id, prompt, params, max_tokens=4, kill_pid=None) -> dict:
    return procs.ask(decoder, "decode", request_id, prompt, params, max_tokens, kill_pid, timeout=120)[1]


def _check_loaded(summary: dict, prompt: list[int], max_tokens: int) -> None:
    """The decode computed only what the prefill could not hand over, and produced every token."""
    full = len(prompt) // BLOCK
    loaded = full * BLOCK - (1 if full * BLOCK == len(prompt) else 0)  # a whole-prompt hit recomputes one token
    assert summary["failed_blocks"] == 0, summary
    assert summary["external"] == full * BLOCK, summary
    assert summary["computed"] == len(prompt) - loaded + max_tokens - 1, summary
    assert len(summary["output"]) == max_tokens


def test_1p1d_decode_loads_prefill_blocks_byte_exact(cluster: Cluster) -> None:
    """Prompts of random lengths (partial and whole last blocks) prefilled on P, decoded on D from P's G2: D
    computes only the tail, reads every loaded byte right, and P's pins end when D has read."""
    rng = random.Random(11)
    for k, length in enumerate([rng.randrange(40, 300) for _ in range(4)] + [128]):
        prompt = _prompt(rng, length)
        params = cluster.prefill(0, f"a{k}", prompt)
        assert params["do_remote_prefill"] and len(params["kvbm"]["slots"]) == length // BLOCK
        _check_loaded(cluster.decode(0, f"a{k}", prompt, params), prompt, 4)
    assert cluster.pins(0) == 0
    prompt = _prompt(rng, 100)
    _check_loaded(cluster.decode(0, "a-once", prompt, cluster.prefill(0, "a-once", prompt)), prompt, 4)
    params = cluster.prefill(0, "a-again", prompt)  # D's own prefix cache holds its 6 full blocks now: nothing is
    summary = cluster.decode(0, "a-again", prompt, params)  # read, but P is told so and unpins at once
    assert summary["external"] == 0 and summary["local"] == 96 and summary["computed"] == 4 + 3, summary
    assert cluster.pins(0) == 0


def test_2p2d_requests_cross_instances(cluster: Cluster) -> None:
    """Two prefill and two decode instances; requests are prefilled on either P and decoded on either D, so each D
    reads from both P's (two peers per agent), some with a prefix D already holds."""
    rng = random.Random(23)
    shared = _prompt(rng, 64)
    for k in range(8):
        prompt = (shared if k % 2 else []) + _prompt(rng, rng.randrange(20, 200))
        params = cluster.prefill(k % 2, f"b{k}", prompt)
        summary = cluster.decode((k // 2) % 2, f"b{k}", prompt, params)
        assert summary["failed_blocks"] == 0 and len(summary["output"]) == 4, summary
        assert summary["external"] > 0 and summary["computed"] <= BLOCK + 3, summary  # only the tail computed
        whole = len(prompt) % BLOCK == 0  # a whole-prompt hit recomputes the last token
        assert summary["computed"] + summary["external"] + summary["local"] == len(prompt) + 3 + whole, summary
    assert cluster.pins(0) == 0 and cluster.pins(1) == 0


@pytest.mark.parametrize("bad", ["no-section", "bad-endpoint", "other-prompt"])
def test_bad_or_foreign_params_are_computed_locally(cluster: Cluster, bad: str) -> None:
    """Params without the kvbm section, with a garbled endpoint, or for another prompt: D computes the prompt
    itself (nothing loaded from the wrong place), byte-exact."""
    rng = random.Random(f"foreign-{bad}")  # (a str seed is hashed the same in every process)
    prompt = _prompt(rng, 100)
    params = cluster.prefill(0, f"c-{bad}", prompt)
    if bad == "no-section":
        params = {"do_remote_prefill": True}
    elif bad == "bad-endpoint":
        params["kvbm"]["endpoints"] = ["bm90IGFuIGVuZHBvaW50"]  # base64 of bytes that are no endpoint
    else:
        prompt = _prompt(rng, 100)
    summary = cluster.decode(1, f"c-{bad}", prompt, params)
    assert summary["computed"] == len(prompt) + 3, summary
    if bad == "bad-endpoint":
        assert summary["failed_blocks"] == len(prompt) // BLOCK, summary
    else:
        assert summary["external"] == 0, summary


def test_slots_reused_after_the_pin_timed_out_are_not_served(cluster: Cluster) -> None:
    """P1 (64 G2 slots) hands out params, its pin times out unread, and later requests reuse every slot: D's load
    finds the slots sealed with other hashes, fails every block and recomputes the prompt, byte-exact."""
    rng = random.Random(9)
    prompt = _prompt(rng, 150)
    params = cluster.prefill(1, "r0", prompt)
    assert cluster.procs.ask(cluster.prefills[1], "expire")[1] >= 1
    for k in range(8):  # 80 new blocks through 64 slots
        cluster.procs.ask(cluster.prefills[1], "fill", f"r-fill{k}", _prompt(rng, 10 * BLOCK), timeout=120)
    summary = cluster.decode(0, "r0", prompt, params)
    assert summary["failed_blocks"] == len(prompt) // BLOCK, summary
    assert all("holds another block now" in reason for reason in summary["reasons"]), summary["reasons"]
    assert summary["computed"] == len(prompt) + 3 and len(summary["output"]) == 4, summary


def test_prefill_instance_killed_decode_recomputes(cluster: Cluster) -> None:
    """(Last: it kills the second P.) P1 hands out params for two requests and is SIGKILLed once D's worker is
    handed the load of the first (planned while P1 lived), before the read starts; the second load is planned with
    P1 dead. Both fail (no byte served from P1), D recomputes the whole prompts byte-exact, and still loads from
    P0."""
    rng = random.Random(5)
    procs, victim = cluster.procs, cluster.prefills[1]
    prompts = [_prompt(rng, 150), _prompt(rng, 200)]
    params = [cluster.prefill(1, f"k{i}", prompt) for i, prompt in enumerate(prompts)]
    pid = procs.ask(victim, "pid")[1]
    for i, kill in enumerate((pid, None)):
        summary = _decode(procs, cluster.decodes[0], f"k{i}", prompts[i], params[i], kill_pid=kill)
        assert summary["failed_blocks"] == len(prompts[i]) // BLOCK, summary
        assert summary["computed"] == len(prompts[i]) + 3 and len(summary["output"]) == 4, summary
    victim.join(10)
    assert not victim.is_alive()
    procs.procs.remove(victim)
    prompt = _prompt(rng, 90)
    _check_loaded(cluster.decode(0, "k2", prompt, cluster.prefill(0, "k2", prompt)), prompt, 4)
