#!/usr/bin/env bash
# Set up a virtual environment (first run only) and run the main job: the transfer benchmark (GPU when present,
# the numba CPU backend otherwise), printing a table. Usage: bash bench/run.sh [kvbm bench args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KVBM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[kvbm] creating $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[bench]"
exec "$PY" -m bench.transfer_bench "$@"
