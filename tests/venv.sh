# Sourced by tests/run.sh and bench/run.sh: create .venv on first use and install kvbm with the given extra, one
# line per step (full pip output under logs/, see tests/log_step.sh).
# Usage: source tests/venv.sh EXTRA   -> sets VENV and PY
source "$(dirname "${BASH_SOURCE[0]}")/log_step.sh"
VENV="${KVBM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    kvbm_step venv "creating $VENV" python3 -m venv "$VENV"
    kvbm_step pip "upgrading pip in $VENV" "$VENV/bin/python" -m pip install --upgrade pip
fi
PY="$VENV/bin/python"
# CPU build of torch where none is installed (torch 2.13.0 comes from this machine's wheel folder when present;
# vLLM's torch==2.14.0 pin is not followed, see tests/install_vllm_light.sh).
if ! "$PY" -c "import torch" 2>/dev/null; then
    kvbm_step torch "installing torch 2.13.0" "$PY" -m pip install --no-warn-conflicts "torch==2.13.0"
fi
# kvbm itself (editable) with the extra; skipped while setup.py and the extra are unchanged since the last install.
_kvbm_stamp="$VENV/.kvbm-installed-$1"
_kvbm_want="$(cksum < setup.py) $1"
if [ "$(cat "$_kvbm_stamp" 2>/dev/null)" != "$_kvbm_want" ]; then
    kvbm_step "kvbm-$1" "installing kvbm[$1] and its dependencies" \
        "$PY" -m pip install --no-warn-conflicts -e ".[$1]"
    echo "$_kvbm_want" > "$_kvbm_stamp"
fi
unset _kvbm_stamp _kvbm_want
