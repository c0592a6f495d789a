#!/usr/bin/env bash
# Set up a virtual environment (first run only) and run the tests.
# Usage: bash tests/run.sh [pytest args] [test paths]   (no path given: the whole tests/ folder)
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/venv.sh test
PYTHON="$PY" bash tests/install_vllm_light.sh
PYTHON="$PY" bash tests/install_sglang_light.sh
paths_given=0
for arg in "$@"; do
    case "$arg" in -*) continue ;; esac
    if [ -e "${arg%%::*}" ]; then paths_given=1; fi
done
[ "$paths_given" -eq 1 ] || set -- "$@" tests
echo "[kvbm] running: pytest $*"
# the pytest entry point, not `python -m pytest`: the repo root must not be on sys.path, where the kernels/ folder
# would shadow an optional top-level `kernels` module that transformers probes while vLLM imports
exec "$VENV/bin/pytest" -q -p no:cacheprovider "$@"
