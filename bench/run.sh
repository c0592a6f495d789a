#!/usr/bin/env bash
# Set up a virtual environment (first run only) and run the main job, each part printing a table:
#  1. the transfer benchmark (GPU when present, the numba CPU backend otherwise),
#  2. the block-manager replay of a multi-round chat workload,
#  3. scheduler-side cost per step of our vLLM connector against vLLM's OffloadingConnector on vLLM's real
#     scheduler (installs a light vLLM 0.33 on first use),
#  4. where a GPU is present: time to first token end to end (`python -m bench.ttft`: a random-weight decoder of
#     real shape loading its prefix from G2 and G3 through kvbm, against recompute and the lower bound).
# Results go to a new run folder bench/runs/<date-time>/ (ignored by git); with --save they are also copied into
# bench/results/, the reference results kept in git (do that only for a run on the machine the README names).
# Usage: bash bench/run.sh [--save] [transfer_bench args]
set -euo pipefail
cd "$(dirname "$0")/.."
save=0
args=()
for arg in "$@"; do
    if [ "$arg" = "--save" ]; then save=1; else args+=("$arg"); fi
done
source tests/venv.sh bench
RUN="bench/runs/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN"
echo "[kvbm] results of this run go to $RUN/"
"$PY" -m bench.transfer_bench --out "$RUN" ${args[@]+"${args[@]}"}
"$PY" -m kvbm.tools.cli replay --json "$RUN/replay.json"
PYTHON="$PY" bash tests/install_vllm_light.sh
"$PY" bench/sched_bench.py --connector OffloadingConnector \
    --connector kvbm.vllm_integration.connector:DynamoConnector --runner v1 --runner v2 \
    --json "$RUN/sched_bench.json"
if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    "$PY" -m bench.ttft --out "$RUN"
else
    echo "[kvbm] no GPU: the time-to-first-token benchmark (python -m bench.ttft) is skipped"
fi
if [ "$save" -eq 1 ]; then
    cp "$RUN"/* bench/results/
    echo "[kvbm] copied $RUN/* into bench/results/ (tracked by git: review with git diff before committing)"
else
    echo "[kvbm] done; results in $RUN/ (bench/results/ is untouched; --save copies a run there)"
fi
