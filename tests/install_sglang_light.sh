#!/usr/bin/env bash
# Install SGLang 0.5.23 "light" into the current Python environment: SGLang without its dependencies (--no-deps)
# plus the few non-CUDA packages in sglang-light-requirements.txt. Enough to import SGLang's HiCache storage
# interface (HiCacheStorage, HiCacheStorageConfig, StorageBackendFactory, its page-hash helpers) on a CPU-only
# machine, for the kvbm SGLang storage backend's tests. Run after install_vllm_light.sh (whose requirements cover
# the rest of what these modules import).
#
# SGLang declares torch==2.14.1 and CUDA-only packages (sglang-kernel, flashinfer, ...); the CPU torch 2.13.0 is
# kept: every pip call passes --no-warn-conflicts and names torch==$TORCH_VERSION so that no resolver step may
# replace it. SGLang's host memory pools (MHATokenToKVPoolHost, ...) do not import here: their module chain
# imports torchvision, whose only wheels need CUDA torch; the tests build host pools of the same shapes instead.
# Each step prints one line; pip's output goes to logs/ (see log_step.sh), shown on failure.
#
# Idempotent: when everything is already installed at the right versions it only checks (a few seconds).
# Usage: bash tests/install_sglang_light.sh        (uses `python`; set PYTHON=/path/to/python to choose)
set -euo pipefail

PYTHON="${PYTHON:-python}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/log_step.sh"
REQUIREMENTS="$HERE/sglang-light-requirements.txt"
SGLANG_VERSION="0.5.23"
TORCH_VERSION="2.13.0"

if [ ! -f "$REQUIREMENTS" ]; then
    echo "[kvbm] install_sglang_light: missing $REQUIREMENTS" >&2
    exit 1
fi

# Prints which parts are missing: "torch", "sglang", "requirements" (nothing when all is in place).
missing_parts() {
    "$PYTHON" "$HERE/missing_parts.py" sglang "$SGLANG_VERSION" "$TORCH_VERSION" "$REQUIREMENTS"
}

missing="$(missing_parts)"
if [ -z "$missing" ]; then
    echo "[kvbm] SGLang $SGLANG_VERSION light: already installed"
    exit 0
fi
case " $missing " in *" torch "*)
    echo "[kvbm] SGLang light: torch $TORCH_VERSION (CPU) is not installed; run tests/install_vllm_light.sh first" >&2
    exit 1 ;;
esac
PIP=("$PYTHON" -m pip install --no-warn-conflicts)
case " $missing " in *" requirements "*)
    kvbm_step sglang-light-requirements "installing SGLang's non-CUDA requirements" \
        "${PIP[@]}" -r "$REQUIREMENTS" "torch==$TORCH_VERSION" ;;
esac
case " $missing " in *" sglang "*)
    kvbm_step sglang-light "installing SGLang $SGLANG_VERSION without its dependencies" \
        "${PIP[@]}" --no-deps "sglang==$SGLANG_VERSION" ;;
esac

missing="$(missing_parts)"
if [ -n "$missing" ]; then
    echo "[kvbm] SGLang light: still missing after install: $missing (logs in $KVBM_LOG_DIR)" >&2
    exit 1
fi
