"""The shared G4 tier end to end: two vLLM 0.33 instances (the real scheduler, `pd_peers`'s processes, role
``kv_both``, no P/D params) with ``DYN_KVBM_G4_ETCD_ENDPOINT`` pointing at an etcd server this test starts. Instance A
serves prompts (its G2 holds their blocks and it publishes them); instance B gets the same prompts and loads their
prefixes from A's G2 over NIXL, found through its local copy of the directory; every byte B's attention reads is
checked in B against the deterministic model. B's copy is then held stale while A's G2 reuses every slot: B's load
of the stale entries fails at the seal check and B recomputes. Then A is killed: a load in flight fails
(recomputed), and once A's lease ended B finds nothing of A's any more."""
from __future__ import annotations

import base64
import json
import random
import time
import urllib.request

import pytest

from etcd_server import EtcdServer
from nixl_peers import Processes
from pd_peers import instance_main

BLOCK = 16
LEASE_S = 2
HOST_BLOCKS = 96


def _prompt(rng: random.Random, num_tokens: int) -> list[int]:
    return [rng.randrange(1, 4096) for _ in range(num_tokens)]


@pytest.fixture(scope="module")
def pair():
    etcd = EtcdServer()
    procs = Processes()
    try:
        # The cost rule learns the harness's prefill rate from its timed forward steps (thousands of tokens/s on a
        # CPU: a few ms a block), against which a G4 load over loopback TCP on a CPU machine is slower, so it drops
        # the hits, as it should; this test is about the load path, so the rule is off (every hit reported).
        extra = {"DYN_KVBM_G4_ETCD_ENDPOINT": etcd.url, "DYN_KVBM_G4_LEASE_SECS": LEASE_S,
                 "DYN_KVBM_PD_LOAD_TIMEOUT_SECS": 5, "DYN_KVBM_DISABLE_COST_AWARE_HITS": "true"}
        a, b = (procs.start(instance_main, "kv_both", HOST_BLOCKS, extra) for _ in range(2))
        for p in (a, b):
            procs.recv(p, timeout=300)
        yield procs, a, b, etcd
    finally:
        procs.close()
        etcd.close()


def _serve(procs: Processes, instance, request_id: str, prompt: list[int], kill_pid: int | None = None) -> dict:
    return procs.ask(instance, "decode", request_id, prompt, None, 4, kill_pid, timeout=120)[1]


def _published(procs: Processes, instance, at_least: int) -> int:
    """Wait until ``instance`` holds ``at_least`` blocks in G2 and etcd holds them all; the blocks it holds."""
    for _ in range(400):
        _, held, synced, _, _ = procs.ask(instance, "g4")
        if held >= at_least and synced:
            return held
        time.sleep(0.01)
    raise AssertionError(f"instance published {held} blocks (synced: {synced}), expected {at_least}")


def _copied(procs: Processes, instance, entries: int) -> None:
    """Wait until ``instance``'s copy of the directory is in sync and holds ``entries`` entries of the other's."""
    for _ in range(400):
        _, _, _, held, in_sync = procs.ask(instance, "g4")
        if held == entries and in_sync:
            return
        time.sleep(0.01)
    raise AssertionError(f"the copy holds {held} entries (in sync: {in_sync}), expected {entries}")


def _instances(etcd: EtcdServer) -> int:
    """Instance records in the directory (read straight from etcd)."""
    body = {"key": base64.b64encode(b"kvbm/g4/i/").decode(), "range_end": base64.b64encode(b"kvbm/g4/i0").decode(),
            "count_only": True}
    request = urllib.request.Request(etcd.url + "/v3/kv/range", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=5) as reply:
        return int(json.loads(reply.read()).get("count", 0))


def test_instance_loads_another_instances_prefix_then_forgets_it_when_it_dies(pair) -> None:
    procs, a, b, etcd = pair
    rng = random.Random(31)
    prompts = [_prompt(rng, n) for n in (150, 231, 90, 170)]
    total = 0
    for k, prompt in enumerate(prompts):  # A computes every prompt; its G2 holds them
        summary = _serve(procs, a, f"a{k}", prompt)
        assert summary["external"] == 0 and summary["computed"] == len(prompt) + 3, summary
        total += len(prompt) // BLOCK
    _copied(procs, b, _published(procs, a, total))
    assert _instances(etcd) == 2

    for k, prompt in enumerate(prompts[:2]):  # B has none of them: it loads every full block from A's G2
        full = len(prompt) // BLOCK
        summary = _serve(procs, b, f"b{k}", prompt)
        assert summary["failed_blocks"] == 0, summary
        assert summary["external"] == full * BLOCK, summary
        assert summary["computed"] == len(prompt) - full * BLOCK + 3 and len(summary["output"]) == 4, summary

    shared = prompts[0][:5 * BLOCK] + _prompt(rng, 100)  # 5 blocks B holds now, the rest new to both
    summary = _serve(procs, b, "b-own", shared)
    assert summary["failed_blocks"] == 0 and summary["computed"] == len(shared) - 5 * BLOCK + 3, summary

    procs.ask(b, "g4-freeze")  # B's copy goes stale while A's G2 reuses every slot for new blocks
    for k in range(HOST_BLOCKS // 16 + 1):
        procs.ask(a, "fill", f"a-fill{k}", _prompt(rng, 16 * BLOCK), timeout=120)
    summary = _serve(procs, b, "b-stale", prompts[2])  # the stale entries: every block fails its seal check
    assert summary["failed_blocks"] == len(prompts[2]) // BLOCK, summary
    assert all("holds another block now" in reason for reason in summary["reasons"]), summary["reasons"]
    assert summary["computed"] == len(prompts[2]) + 3 and len(summary["output"]) == 4, summary
    procs.ask(b, "g4-thaw")  # its watch broken: B reads the directory again

    doomed = _prompt(rng, 90)
    summary = _serve(procs, a, "a-doomed", doomed)
    assert summary["external"] == 0 and summary["computed"] == len(doomed) + 3, summary
    _copied(procs, b, _published(procs, a, HOST_BLOCKS))
    pid = procs.ask(a, "pid")[1]  # A dies once B's worker is handed that prompt's load: its blocks fail, B recomputes
    summary = _serve(procs, b, "b-killed", doomed, kill_pid=pid)
    assert summary["failed_blocks"] == len(doomed) // BLOCK, summary
    assert summary["computed"] == len(doomed) + 3 and len(summary["output"]) == 4, summary
    a.join(10)
    assert not a.is_alive()
    procs.procs.remove(a)

    deadline = time.monotonic() + LEASE_S + 10  # A's lease ends: the directory names none of A's blocks
    while _instances(etcd) != 1:
        assert time.monotonic() < deadline, "the dead instance's record outlived its lease"
        time.sleep(0.2)
    summary = _serve(procs, b, "b-after", prompts[3])
    assert summary["external"] == 0 and summary["failed_blocks"] == 0, summary
    assert summary["computed"] == len(prompts[3]) + 3 and len(summary["output"]) == 4, summary
