"""Processes for the disaggregated prefill -> decode tests: each runs one vLLM 0.33 engine (the real scheduler and an
emulated worker, `vllm_harness`) with ``DynamoConnector`` as ``kv_producer`` (prefill) or ``kv_consumer`` (decode),
its own NIXL agent and G2 pool, and obeys commands sent over a pipe by the test, which plays the proxy: it carries
the ``kv_transfer_params`` a prefill returns to the decode instance, as a P/D router does.

Every byte a decode instance's attention reads is checked against the deterministic model (`vllm_harness`'s
``verify="admission"``: the context of every (re)admitted request, i.e. exactly the blocks loaded from the producer,
or recomputed after a failed load); a wrong byte raises in the instance and the test sees the error.

UCX is pinned to TCP on loopback (`nixl_peers.UCX_ENV`). Between commands each instance keeps stepping its engine,
as a serving engine does, so its workers notice NIXL notifications and its scheduler ends pins.
"""
from __future__ import annotations

import os
import signal
import socket
import time
import traceback
from typing import Any

from nixl_peers import UCX_ENV

CONNECTOR = "kvbm.vllm_integration.connector:DynamoConnector"
MODEL = dict(num_layers=2, num_kv_heads=4, num_attention_heads=8, head_dim=16)  # 2 KV heads a rank at tp=2


def _rank_harnesses(h) -> list:
    """The engine's per-rank worker harnesses (one without tensor parallelism)."""
    ranks = getattr(h.worker, "ranks", None)
    return [h.worker] if ranks is None else [r.local.harness for r in ranks]


def instance_main(conn, kv_role: str, host_blocks: int, extra: dict[str, Any], tp: int = 1) -> None:
    """One engine. Commands: ("prefill", request id, prompt) -> ("ok", kv_transfer_params): a request with
    ``do_remote_decode`` and max_tokens 1, run to its end (``tp`` ranks, each with its worker, G2 shard and NIXL
    agent); ("decode", request id, prompt, params, max_tokens) ->
    ("ok", summary): a request carrying a prefill's params, run to its end (with ``kill pid``: SIGKILL that process
    right after this instance's worker started the load from it) (summary: tokens computed here, tokens
    the connector reported as external hits, prompt tokens vLLM's own prefix cache held, output tokens, blocks
    whose load failed and why); ("fill", request id, prompt) -> ("ok",): a plain request of max_tokens 1 (stored, not
    kept);
    ("expire",) -> ("ok", pins expired so far): every pin times out now; ("pins",) -> ("ok", pins held);
    ("g4",) -> ("ok", blocks in the G4 directory's mirror of G2, whether etcd holds them all, other instances'
    entries in the local copy of the directory, whether the copy is in sync); ("g4-freeze",) -> ("ok",): the copy
    stops taking etcd's changes (its entries go stale, still answering lookups); ("g4-thaw",) -> ("ok",): it takes
    them again, its watch broken so that it reads the whole directory again;
    ("pid",) -> ("ok", pid); ("stop",)."""
    os.environ.update(UCX_ENV)
    try:
        import vllm_harness as H

        config = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": host_blocks, **extra}
        harness = H.HarnessConfig(connector=CONNECTOR, connector_extra_config=config, kv_role=kv_role,
                                  model=H.TinyModelSpec(**MODEL), num_gpu_blocks=64)
        if tp == 1:
            h = H.VllmHarness(harness)
        else:
            import vllm_ranks as R

            h = R.RankedVllmHarness(harness, tp)  # ranks in this process, each with its own NIXL agent
        ranks = _rank_harnesses(h)
        scheduler_connector = h.scheduler.connector
        # what vLLM's engine core gathers from the workers after KV cache init, keyed (pipeline rank, tensor rank)
        metas = {(0, r): rank.connector.get_handshake_metadata() for r, rank in enumerate(ranks)}
        if all(m is not None for m in metas.values()):
            scheduler_connector.set_xfer_handshake_metadata_pp_aware(metas)
        returned: dict[str, Any] = {}
        def recording(finish):  # vLLM calls request_finished_all_groups of a connector supporting HMA
            def recording_finished(request, block_ids):
                delay, params = finish(request, block_ids)
                returned[request.request_id] = params
                return delay, params
            return recording_finished

        for name in ("request_finished", "request_finished_all_groups"):
            setattr(scheduler_connector, name, recording(getattr(scheduler_connector, name)))
        conn.send(("ready", os.getpid()))
        leader = scheduler_connector.scheduler_side.leader
        while True:
            while not conn.poll(0.005):
                h.step()  # an idle engine keeps stepping: notifications, pins, reports
            cmd = conn.recv()
            if cmd[0] == "prefill":
                _, request_id, prompt = cmd
                h.add_request(request_id, prompt, 1, kv_transfer_params={"do_remote_decode": True})
                h.run_until_idle()
                conn.send(("ok", returned.get(request_id)))
            elif cmd[0] == "decode":
                _, request_id, prompt, params, max_tokens, kill_pid = cmd
                if kill_pid is not None:
                    _kill_when_remote_load_starts(ranks[0].connector.worker.store, kill_pid)
                computed, reasons = 0, []
                before, local = h.cache_stats.external_hits, h.cache_stats.gpu_hits
                h.add_request(request_id, prompt, max_tokens, kv_transfer_params=params)
                while h.busy():
                    h.step()
                    computed += ranks[0].last_report.computed_tokens
                    reasons += ranks[0].connector.worker.take_failed_loads().get(request_id, [])
                conn.send(("ok", {"computed": computed, "external": h.cache_stats.external_hits - before,
                                  "local": h.cache_stats.gpu_hits - local,
                                  "output": h.outputs[request_id], "failed_blocks": len(reasons),
                                  "reasons": reasons,
                                  "finish": h.finish_reasons.get(request_id)}))
            elif cmd[0] == "fill":  # a plain request: its blocks are stored, not kept for a reader
                _, request_id, prompt = cmd
                h.add_request(request_id, prompt, 1)
                h.run_until_idle()
                conn.send(("ok",))
            elif cmd[0] == "expire":  # every pin times out at the next step
                leader.pins.clock = lambda: float("inf")
                h.step()
                leader.pins.clock = time.monotonic
                conn.send(("ok", leader.pins.expired))
            elif cmd[0] == "pins":
                conn.send(("ok", len(leader.pins)))
            elif cmd[0] == "g4":  # the shared G4 tier's directory: blocks held in G2, all of them in etcd; the copy
                d, view = leader.directory, leader.directory_view
                conn.send(("ok", len(d), d.synced, len(view), view.in_sync))
            elif cmd[0] == "g4-freeze":
                leader.directory_view._changes = lambda kvs: iter(())
                conn.send(("ok",))
            elif cmd[0] == "g4-thaw":
                view = leader.directory_view
                del view._changes
                view._sock.shutdown(socket.SHUT_RDWR)
                conn.send(("ok",))
            elif cmd[0] == "pid":
                conn.send(("ok", os.getpid()))
            elif cmd[0] == "stop":
                h.close()
                conn.send(("ok",))
                return
    except Exception:  # noqa: BLE001 - reported to the test
        conn.send(("error", traceback.format_exc()))


def _kill_when_remote_load_starts(store, pid: int) -> None:
    """SIGKILL ``pid`` when ``store`` is handed a load from another instance, and let the store start the read only
    once ``pid`` is dead: the load was planned while its peer lived, its read finds the peer gone. (Killed just
    after the read is posted instead, a small read could finish first: UCX reads a peer's memory one-sided.)"""
    execute = store.execute

    def killing_execute(moves):
        moves = list(moves)
        if any(m.remote is not None for m in moves) and store.execute is killing_execute:
            store.execute = execute
            os.kill(pid, signal.SIGKILL)
            _wait_dead(pid)
        execute(moves)

    store.execute = killing_execute


def _wait_dead(pid: int, timeout_s: float = 10.0) -> None:
    """Until process ``pid`` (another process's child) has exited: gone, or a zombie its parent has not reaped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.002)
    raise TimeoutError(f"process {pid} still runs {timeout_s} s after SIGKILL")
