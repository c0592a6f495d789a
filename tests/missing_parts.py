"""Which parts of a light install are missing from this Python: prints "torch", the package's name and/or
"requirements" (nothing when all is in place). Used by tests/install_vllm_light.sh and install_sglang_light.sh.

Usage: python tests/missing_parts.py PACKAGE VERSION TORCH_VERSION REQUIREMENTS_FILE
"""
import sys
from importlib import metadata

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always vendors packaging
    from pip._vendor.packaging.requirements import Requirement


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(package, version, torch_version, requirements_file):
    missing = []
    torch = installed("torch")
    if torch is None or torch.split("+")[0] != torch_version:
        missing.append("torch")
    if installed(package) != version:
        missing.append(package)
    for line in open(requirements_file):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        found = installed(req.name)
        if found is None or not req.specifier.contains(found, prereleases=True):
            missing.append("requirements")
            break
    print(" ".join(missing))


if __name__ == "__main__":
    main(*sys.argv[1:5])
