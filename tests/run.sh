#!/usr/bin/env bash
# Set up a virtual environment (first run only) and run the whole test suite. Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/venv.sh test
PYTHON="$PY" bash tests/install_vllm_light.sh
echo "[kvbm] running tests"
# the pytest entry point, not `python -m pytest`: the repo root must not be on sys.path, where the kernels/ folder
# would shadow an optional top-level `kernels` module that transformers probes while vLLM imports
exec "$VENV/bin/pytest" -q -p no:cacheprovider "$@" tests
