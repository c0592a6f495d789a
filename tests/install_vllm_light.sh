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
    "$PYTHON" - "$REQUIREMENTS" "$VLLM_VERSION" "$TORCH_VERSION" <<'EOF'
import sys
from importlib import metadata

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always vendors packaging
    from pip._vendor.packaging.requirements import Requirement

requirements_file, vllm_version, torch_version = sys.argv[1:4]


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


missing = []
torch = installed("torch")
if torch is None or torch.split("+")[0] != torch_version:
    missing.append("torch")
if installed("vllm") != vllm_version:
    missing.append("vllm")
for line in open(requirements_file):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate():
        continue
    version = installed(req.name)
    if version is None or not req.specifier.contains(version, prereleases=True):
        missing.append("requirements")
        break
print(" ".join(missing))
EOF
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
