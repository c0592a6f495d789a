#!/usr/bin/env bash
# Set up a virtual environment (first run only) and run the main job, each part printing a table:
#  1. the transfer benchmark (GPU when present, the numba CPU backend otherwise),
#  2. the block-manager replay of a multi-round chat workload,
#  3. scheduler-side cost per step of our vLLM connector against vLLM's OffloadingConnector on vLLM's real
#     scheduler (installs a light vLLM 0.33 on first use).
# Usage: bash bench/run.sh [transfer_bench args]
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/venv.sh bench
"$PY" -m bench.transfer_bench "$@"
"$PY" -m kvbm.cli replay --json bench/results/replay.json
PYTHON="$PY" bash tests/install_vllm_light.sh
exec "$PY" bench/sched_bench.py --connector OffloadingConnector \
    --connector kvbm.vllm_integration.connector:DynamoConnector --runner v1 --runner v2 \
    --json bench/results/sched_bench.json
