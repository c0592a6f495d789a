#!/usr/bin/env bash
# On a GPU machine without network: install kvbm from this checkout into a private folder (no dependencies: the
# machine's torch, triton, numba, cuda-bindings, xxhash and prometheus_client are used), then run the parts named.
# Usage: OUT=dir bash bench/gpu_session.sh PART...   parts: tests, manager, transfers, pieces, g3, ttft, ttft-ab,
# ttft-later, offloading, pack (last: everything under $OUT into one $OUT/session.tgz, for a device call that brings
# back few files)
# (offloading: bench.offloading_bench, with vLLM's Python from bench/runs/vllm_lite when bench/vllm_bundle.py wrote it)
# Each part writes its log (and results) under $OUT; a part that fails is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/runs/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
REPO="$(pwd)"
export PYTHONUNBUFFERED=1
SITE=/tmp/kvbm_site
if [ ! -d "$SITE/kvbm" ]; then
    python3 -m pip install -q --no-deps --no-build-isolation --target "$SITE" . > "$OUT/install.log" 2>&1 \
        || { tail -20 "$OUT/install.log"; exit 1; }
fi
# Run from a scratch folder: the checkout's own kvbm/ (without kernels/ and layouts/ mapped into it) must not
# shadow the installed package; the checkout stays importable for bench/ and tests/.
export PYTHONPATH="$SITE:$REPO"
mkdir -p /tmp/kvbm_run && cd /tmp/kvbm_run
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
git_commit="$(cat "$REPO/.kvbm_commit" 2>/dev/null || echo unknown)"
echo "commit $git_commit" | tee -a "$OUT/gpu.txt"

T="$REPO/tests"
GPU_TESTS="$T/test_transfer_engine.py $T/test_retention.py $T/test_kernels.py $T/test_transfer_plan.py
 $T/test_staged_enqueue.py $T/test_staged_schedule.py $T/test_batch_memcpy.py $T/test_host_memory.py
 $T/test_id_check.py $T/test_disk_paths.py $T/test_disk_cache.py $T/test_disk_file.py $T/test_gds.py
 $T/test_transfer_face.py $T/test_layer_view.py $T/test_ttft_bench.py::test_graphed_prefill_matches_the_eager_prefill
 $T/test_ttft_bench.py::test_paged_attention_runs_flash_with_grouped_kv_heads"
MANAGER_TESTS="$T/test_manager.py $T/test_manager_faults.py $T/test_toy_tier.py $T/test_manager_soak.py"

run_part() {
    local name="$1"; shift
    echo "[gpu-session $(date +%H:%M:%S)] $name"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -4 "$OUT/$name.log"
    echo "[gpu-session $(date +%H:%M:%S)] $name exit $rc"
}

for part in "$@"; do
    case "$part" in
        tests) run_part tests timeout 320 python3 -m pytest -q -p no:cacheprovider --maxfail=25 $GPU_TESTS ;;
        manager) run_part manager env KVBM_TEST_G1_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider \
            $MANAGER_TESTS ;;
        transfers) run_part transfers timeout 400 python3 -m bench.transfer_bench --pin-thread 3 --sections transfers \
            --batches 16,256 --out "$OUT" --stem transfer ;;
        pieces) run_part pieces timeout 400 python3 -m bench.transfer_bench --pin-thread 3 --sections pieces \
            --out "$OUT" --stem pieces ;;
        g3) mkdir -p /tmp/kvbm_g3 && run_part g3 timeout 300 python3 -m bench.g3_bench --dir /tmp/kvbm_g3 --gib 1 \
            --out "$OUT/g3" ;;
        ttft) run_part ttft timeout 500 python3 -m bench.ttft --out "$OUT/ttft" ;;
        ttft-ab) for forward in graphs eager; do  # the G2 rows at 2k and 8k with CUDA graphs, then eager, one machine
                run_part "ttft_$forward" timeout 240 python3 -m bench.ttft --workloads prefix --prefixes 2048,8192 \
                    --modes g2,g2-layerwise --reps 9 --layer-wait-prefix 0 --layer-store-tokens 0 \
                    $([ "$forward" = eager ] && echo --eager) --out "$OUT/ttft_$forward"
            done ;;
        ttft-later) for run in 1 2 3 4; do  # the G2 rows with the later layer groups enqueued in the forward (odd
                later=$((run % 2))                # runs) or before it (even runs), alternating on one machine
                run_part "ttft_later${later}_$run" env DYN_KVBM_ONBOARD_LATER_GROUPS_IN_FORWARD=$later timeout 150 \
                    python3 -m bench.ttft --models llama-3.1-8b --workloads prefix --prefixes 2048,8192 \
                    --modes g2,g2-layerwise --reps 9 --layer-wait-prefix 0 --layer-store-tokens 0 \
                    --out "$OUT/ttft_later${later}_$run"
            done ;;
        offloading) if [ -f "$REPO/bench/runs/vllm_lite/env.sh" ]; then source "$REPO/bench/runs/vllm_lite/env.sh"; fi
            run_part offloading timeout 500 python3 -m bench.offloading_bench --out "$OUT/offloading" ;;
        pack) tar czf /tmp/kvbm_session.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete \
                && mv /tmp/kvbm_session.tgz "$OUT/session.tgz" && echo "[gpu-session] everything in $OUT/session.tgz" ;;
        *) echo "unknown part $part" ;;
    esac
done
