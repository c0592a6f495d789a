#!/usr/bin/env bash
# Set up a virtual environment (first run only) and run the main job: the transfer benchmark (GPU when present,
# the numba CPU backend otherwise), then the block-manager replay of a multi-round chat workload; each prints a
# table. Usage: bash bench/run.sh [transfer_bench args]
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/venv.sh bench
"$PY" -m bench.transfer_bench "$@"
exec "$PY" -m kvbm.cli replay --json bench/results/replay.json
