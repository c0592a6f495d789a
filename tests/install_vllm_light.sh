#!/usr/bin/env bash
# Install vLLM 0.33 "light" into the current Python environment: CPU torch, vLLM without its CUDA
# dependencies (--no-deps), and the non-CUDA requirements listed in vllm-light-requirements.txt.
# Enough to build and step vLLM's real Scheduler and KV connectors on a CPU-only machine.
#
# vLLM 0.33.0 declares torch==2.14.0 (a CUDA build that pulls several GB of NVIDIA libraries); the scheduler and
# connector code used here runs on the CPU torch 2.13.0 kept instead. So vLLM goes in with --no-deps, and every pip
# call passes --no-warn-conflicts: pip would otherwise print its "dependency resolver" error about that pin.
# Each step prints one line; pip's output goes to logs/ (see log_step.sh), shown on failure.
#
# Idempotent: when everything is already installed at the right versions it only checks (a few seconds).
# Usage: bash tests/install_vllm_light.sh        (uses `python`; set PYTHON=/path/to/python to choose)
set -euo pipefail

PYTHON="${PYTHON:-python}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/log_step.sh"
REQUIREMENTS="$HERE/vllm-light-requirements.txt"
VLLM_VERSION="0.33.0"
TORCH_VERSION="2.13.0"

if [ ! -f "$REQUIREMENTS" ]; then
    echo "[kvbm] install_vllm_light: missing $REQUIREMENTS" >&2
    exit 1
fi

# Prints which parts are missing: "torch", "vllm", "requirements" (nothing when all is in place).
missing_parts() {
    "$PYTHON" "$HERE/missing_parts.py" vllm "$VLLM_VERSION" "$TORCH_VERSION" "$REQUIREMENTS"
}

missing="$(missing_parts)"
if [ -z "$missing" ]; then
    echo "[kvbm] vLLM $VLLM_VERSION light: already installed"
    exit 0
fi
PIP=("$PYTHON" -m pip install --no-warn-conflicts)
case " $missing " in *" torch "*)
    kvbm_step vllm-light-torch "installing torch $TORCH_VERSION (CPU)" "${PIP[@]}" "torch==$TORCH_VERSION" ;;
esac
case " $missing " in *" requirements "*)
    kvbm_step vllm-light-requirements "installing vLLM's non-CUDA requirements" "${PIP[@]}" -r "$REQUIREMENTS" ;;
esac
case " $missing " in *" vllm "*)
    kvbm_step vllm-light "installing vLLM $VLLM_VERSION without its dependencies" \
        "${PIP[@]}" --no-deps "vllm==$VLLM_VERSION" ;;
esac

missing="$(missing_parts)"
if [ -n "$missing" ]; then
    echo "[kvbm] vLLM light: still missing after install: $missing (logs in $KVBM_LOG_DIR)" >&2
    exit 1
fi
