#!/usr/bin/env bash
# Set up a virtual environment (first run only) and run the whole test suite. Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KVBM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[kvbm] creating $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# CPU build of torch; a range that the installed torch satisfies installs nothing more.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test]"
if [ -f tests/install_vllm_light.sh ]; then
    PYTHON="$PY" bash tests/install_vllm_light.sh
fi
echo "[kvbm] running tests"
# the pytest entry point, not `python -m pytest`: the repo root must not be on sys.path, where the kernels/ folder
# would shadow an optional top-level `kernels` module that transformers probes while vLLM imports
exec "$VENV/bin/pytest" -q -p no:cacheprovider "$@" tests
