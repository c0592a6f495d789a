"""Scheduler-side CPU cost of a vLLM KV connector, on vLLM 0.33's real scheduler (CPU only).

Runs a multi-turn chat workload (default 12 users x 6 rounds, few GPU blocks so later turns must come
back from the connector) through ``tests/vllm_harness.py`` and reports, per engine step:

* ``connector``: time inside the connector's scheduler-side methods (``get_num_new_matched_tokens``,
  ``update_state_after_alloc``, ``build_connector_meta``, ``update_connector_output``,
  ``request_finished``, ...), measured around each call;
* ``sched``: time in ``Scheduler.schedule()`` plus ``update_from_output()`` (connector included);
* the same ``sched`` figure for vLLM's scheduler without any connector (baseline), and the hit rates.

Worker-side work (the emulated forward, the connector's data movement) is not in these numbers.
Default connector: vLLM's own ``OffloadingConnector`` (its CUDA data mover replaced by the harness's CPU
one).  ``--connector kvbm.vllm_integration.connector:DynamoConnector`` runs this project's connector with a
G2 of ``--cpu-bytes``.  Another connector: ``--connector package.module:ClassName --extra '{"key": "value"}'``.

Needs vLLM 0.33 light in the running Python (``bash tests/install_vllm_light.sh``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import vllm_harness as H  # noqa: E402  (needs the tests/ folder on sys.path)

# vLLM warns on every scheduler the benchmark builds (experimental API, CPU block size): keep its errors only,
# unless VLLM_LOGGING_LEVEL asks for more
if "VLLM_LOGGING_LEVEL" not in os.environ:
    logging.getLogger("vllm").setLevel(logging.ERROR)

OFFLOADING = "OffloadingConnector"
KVBM = "kvbm.vllm_integration.connector:DynamoConnector"


@dataclass
class RunResult:
    """Per-step scheduler figures of one run."""

    label: str
    runner: str
    steps: int
    sched_us_per_step: float
    connector_us_per_step: float
    connector_share: float
    gpu_hit_rate: float
    external_hit_rate: float
    external_hit_tokens: int
    wall_s: float
    process_cpu_s: float
    connector_calls: dict[str, int]


def workload_from_args(args: argparse.Namespace) -> H.MultiTurnChatWorkload:
    """The chat workload the command line describes (fresh each run: workloads are single-use)."""
    return H.MultiTurnChatWorkload(
        num_users=args.users,
        num_rounds=args.rounds,
        system_prompt_tokens=args.system_tokens,
        user_tokens=(args.user_tokens[0], args.user_tokens[1]),
        answer_tokens=(args.answer_tokens[0], args.answer_tokens[1]),
        seed=args.seed,
    )


def harness_config(args: argparse.Namespace, connector: str | None, runner: str) -> H.HarnessConfig:
    """Harness settings for one run; ``connector=None`` is the no-connector baseline."""
    extra: dict[str, Any] = {}
    if connector == OFFLOADING:
        extra = H.offloading_connector_config(args.cpu_bytes)
    elif connector == KVBM:
        extra = {"DYN_KVBM_CPU_CACHE_GB": args.cpu_bytes / 1e9}  # the same host budget as the peer
    if connector is not None:
        extra.update(args.extra)
    return H.HarnessConfig(
        connector=connector,
        connector_extra_config=extra,
        num_gpu_blocks=args.gpu_blocks,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens,
        runner=runner,
        verify=args.verify,
    )


def run_once(args: argparse.Namespace, connector: str | None, runner: str) -> RunResult:
    """Build a fresh harness, drive the workload, and return per-step figures."""
    with H.VllmHarness(harness_config(args, connector, runner)) as harness:
        workload = workload_from_args(args)
        sched_ns = 0
        step = harness.step

        def timed_step() -> H.StepResult:
            nonlocal sched_ns
            result = step()
            sched_ns += result.schedule_ns + result.update_ns
            return result

        harness.step = timed_step
        wall, cpu = time.perf_counter(), time.process_time()
        harness.run_workload(workload)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if not workload.done:
            raise RuntimeError("workload did not complete")
        timer = harness.timer
        connector_ns = timer.total_ns if timer is not None else 0
        steps = max(harness.steps, 1)
        stats = harness.cache_stats
        return RunResult(
            label=connector or "no connector",
            runner=runner,
            steps=harness.steps,
            sched_us_per_step=sched_ns / steps / 1e3,
            connector_us_per_step=connector_ns / steps / 1e3,
            connector_share=connector_ns / sched_ns if sched_ns else 0.0,
            gpu_hit_rate=stats.gpu_hits / stats.gpu_queries if stats.gpu_queries else 0.0,
            external_hit_rate=stats.external_hits / stats.external_queries if stats.external_queries else 0.0,
            external_hit_tokens=stats.external_hits,
            wall_s=wall,
            process_cpu_s=cpu,
            connector_calls=dict(timer.calls) if timer is not None else {},
        )


def median_run(runs: list[RunResult]) -> RunResult:
    """The run with the median connector time (scheduler time for the baseline)."""
    key = (lambda r: r.connector_us_per_step) if runs[0].connector_calls else (lambda r: r.sched_us_per_step)
    ordered = sorted(runs, key=key)
    return ordered[len(ordered) // 2]


def format_table(results: list[RunResult]) -> str:
    """Fixed-width table of the median runs."""
    header = (
        f"{'connector':<54} {'runner':<6} {'steps':>6} {'sched us/step':>14} {'connector us/step':>18} "
        f"{'share':>6} {'gpu hit':>8} {'ext hit':>8} {'ext tokens':>11} {'wall s':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.label[-54:]:<54} {r.runner:<6} {r.steps:>6} {r.sched_us_per_step:>14.1f} "
            f"{r.connector_us_per_step:>18.1f} {r.connector_share:>6.0%} {r.gpu_hit_rate:>8.1%} "
            f"{r.external_hit_rate:>8.1%} {r.external_hit_tokens:>11} {r.wall_s:>7.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connector", action="append", default=None,
                        help=f"'package.module:ClassName' or a vLLM connector name; repeatable (default {OFFLOADING})")
    parser.add_argument("--extra", type=json.loads, default={}, help="JSON merged into kv_connector_extra_config")
    parser.add_argument("--runner", choices=["v1", "v2"], action="append", default=None,
                        help="worker call order / engine loop: v1 (sync) or v2 (async scheduling); repeatable "
                             "(default v1)")
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--system-tokens", type=int, default=128)
    parser.add_argument("--user-tokens", type=int, nargs=2, default=(32, 96), metavar=("MIN", "MAX"))
    parser.add_argument("--answer-tokens", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-blocks", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--cpu-bytes", type=int, default=64 << 20,
                        help="host tier bytes: OffloadingConnector cpu_bytes_to_use, DynamoConnector G2")
    parser.add_argument("--verify", choices=["admission", "every_step", "off"], default="admission",
                        help="KV byte checks in the emulated worker (not timed)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration; the median is reported")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without a connector")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    if args.repeat <= 0:
        parser.error(f"--repeat must be positive, got {args.repeat}")
    if not isinstance(args.extra, dict):
        parser.error(f"--extra must be a JSON object, got {args.extra!r}")
    args.connector = args.connector or [OFFLOADING]
    args.runner = args.runner or ["v1"]
    return args


def main(argv: list[str] | None = None) -> list[RunResult]:
    """Run every (connector, runner) configuration and the baseline; print the table."""
    args = parse_args(argv)
    configurations: list[str | None] = list(args.connector)
    if not args.no_baseline:
        configurations.append(None)
    results = []
    total = len(args.runner) * len(configurations) * args.repeat
    done, start = 0, time.perf_counter()
    print(f"[sched] {total} runs: runners {', '.join(args.runner)} x "
          f"{', '.join(c or 'no connector' for c in configurations)} x {args.repeat}", flush=True)
    for runner in args.runner:
        for connector in configurations:
            runs = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                runs.append(run_once(args, connector, runner))
                done += 1
                print(f"[sched] {done}/{total} runner {runner}, {connector or 'no connector'}: "
                      f"{time.perf_counter() - t0:.1f} s (total {time.perf_counter() - start:.0f} s)", flush=True)
            results.append(median_run(runs))
    print(
        f"workload: {args.users} users x {args.rounds} rounds, system prompt {args.system_tokens} tokens, "
        f"{args.gpu_blocks} GPU blocks of {args.block_size} tokens; median of {args.repeat} runs"
    )
    print(format_table(results))
    if args.json:
        payload = json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                              "results": [asdict(r) for r in results]}, indent=1, default=str)
        if args.json == "-":
            print(payload)
        else:
            Path(args.json).write_text(payload)
    return results


if __name__ == "__main__":
    main()
