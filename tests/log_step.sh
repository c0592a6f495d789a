# Sourced by tests/venv.sh and tests/install_vllm_light.sh: run one install step quietly.
#   kvbm_step NAME "what" command...   prints "[kvbm] what ... done (12 s)"; the command's whole output goes to
#   $KVBM_LOG_DIR/NAME.log (default logs/, ignored by git); on failure prints the log's last 40 lines and fails.
KVBM_LOG_DIR="${KVBM_LOG_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/logs}"

kvbm_step() {
    local name="$1" what="$2" start=$SECONDS rc=0
    shift 2
    mkdir -p "$KVBM_LOG_DIR"
    local log="$KVBM_LOG_DIR/$name.log"
    printf '[kvbm] %s ... ' "$what"
    "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "done ($((SECONDS - start)) s)"
        return 0
    fi
    echo "FAILED (exit $rc after $((SECONDS - start)) s); full log: $log; its last lines:"
    tail -n 40 "$log" | sed 's/^/    /'
    return "$rc"
}
