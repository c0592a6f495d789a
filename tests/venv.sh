# Sourced by tests/run.sh and bench/run.sh: create .venv on first use and install kvbm with the given extra.
# Usage: source tests/venv.sh EXTRA   -> sets VENV and PY
VENV="${KVBM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[kvbm] creating $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# CPU build of torch where none is installed; a range that the installed torch satisfies installs nothing more.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[$1]"
