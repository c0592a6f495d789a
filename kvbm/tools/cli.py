"""The kvbm command line: `python -m kvbm.tools.cli replay [options]` (see `--help`)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def _replay(args: argparse.Namespace) -> int:
    from kvbm.config import KvbmConfig
    from kvbm.layouts import KVGeometry
    from kvbm.tools.replay import format_report, replay
    from kvbm.tools.workload import ChatWorkload

    env = dict(os.environ)
    env.setdefault("DYN_KVBM_CPU_CACHE_GB", str(args.host_gb))
    if args.disk_gb:
        env.setdefault("DYN_KVBM_DISK_CACHE_GB", str(args.disk_gb))
        env.setdefault("DYN_KVBM_DISK_CACHE_DIR", args.disk_dir)
    config = KvbmConfig.from_env(env)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    geometry = KVGeometry(args.layers, 2, args.block_size, args.kv_heads, args.head_dim, 2)
    workload = ChatWorkload(num_users=args.users, num_rounds=args.rounds, system_prompt_tokens=args.system_tokens,
                            question_tokens=args.question_tokens, answer_tokens=args.answer_tokens,
                            active_users=args.active_users, seed=args.seed)
    print(f"[replay] {workload.num_requests} requests on {device}: {args.users} users x {args.rounds} rounds, "
          f"G1 {args.g1_blocks} blocks of {geometry.block_bytes / 2**20:.2f} MiB, G2 {config.cpu_cache_gb} GB, "
          f"G3 {config.disk_cache_gb or 0} GB", flush=True)
    report = replay(workload, geometry, args.g1_blocks, config, device=device,
                    log=lambda line: print(line, flush=True))
    print(format_report(report, geometry))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "args": vars(args), "requests": report.requests, "blocks": report.blocks,
                       "hit_rates": report.hit_rates(), "onboard_failed": report.onboard_failed,
                       "offloaded_blocks": report.offloaded_blocks, "offload": report.offload,
                       "onboard": report.onboard, "transfer": report.transfer,
                       "manager_cpu_seconds": report.manager_cpu_seconds, "wall_seconds": report.wall_seconds}, f,
                      indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="kvbm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("replay", help="multi-round chat workload through the block manager with a small G1")
    r.add_argument("--users", type=int, default=12)
    r.add_argument("--rounds", type=int, default=6)
    r.add_argument("--active-users", type=int, default=4)
    r.add_argument("--system-tokens", type=int, default=1000)
    r.add_argument("--question-tokens", type=int, default=200)
    r.add_argument("--answer-tokens", type=int, default=100)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--g1-blocks", type=int, default=256, help="engine GPU cache size in blocks (small on purpose)")
    r.add_argument("--layers", type=int, default=8)
    r.add_argument("--kv-heads", type=int, default=8)
    r.add_argument("--head-dim", type=int, default=128)
    r.add_argument("--block-size", type=int, default=16)
    r.add_argument("--host-gb", type=float, default=0.15, help="DYN_KVBM_CPU_CACHE_GB unless set in the environment")
    r.add_argument("--disk-gb", type=float, default=2.0, help="DYN_KVBM_DISK_CACHE_GB unless set (0: no disk tier)")
    r.add_argument("--disk-dir", default="/tmp", help="DYN_KVBM_DISK_CACHE_DIR unless set")
    r.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    r.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    return _replay(args)


if __name__ == "__main__":
    sys.exit(main())
