"""Bundle the part of vLLM the offloading bench imports, for a GPU machine where vLLM cannot be installed.

    python -m bench.vllm_bundle [--out bench/runs/vllm_lite] [--python-version 3.12] [--check]

Run where vLLM is installed (any machine). It imports the bench's vLLM modules in two subprocesses, one with vLLM's
CPU platform and one with its CUDA platform set as a GPU machine resolves it (vLLM's compiled extension stood in by
``bench/vllm_stand_in.py``), and writes to ``--out``:

- ``site/vllm/...``: every vLLM file those imports read (the ``.py`` files of the modules and packages imported,
  and any data file opened under ``vllm/``), and ``site/vllm-<version>.dist-info/METADATA``: vLLM's platform
  detection asks ``importlib.metadata`` for its version;
- ``wheels/``: manylinux wheels (``--python-version``, default 3.12) of the imported distributions the GPU machine
  lacks (``--wheels``, default msgspec and pyzmq), pinned to the versions installed here;
- ``manifest.json`` (files, sizes, wheels, every third-party distribution the import pulled, with its version) and
  ``env.sh``, the set-up for the GPU machine.

On the GPU machine, from the repository root (kvbm itself installed, e.g. by ``bench/gpu_session.sh``)::

    source bench/runs/vllm_lite/env.sh
    # which runs, with B=bench/runs/vllm_lite:
    #   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vllm_site $B/wheels/*.whl
    #   export PYTHONPATH="$PWD/$B/site:/tmp/vllm_site${PYTHONPATH:+:$PYTHONPATH}"

``--check`` then imports the same modules, under both platforms, in a subprocess that sees this interpreter's
site-packages without vLLM and the bundled distributions (and without any ``--without`` distribution), plus the
bundle and the same wheel versions for this interpreter installed into a temporary folder: what the GPU machine will
import, on this interpreter's Python and torch.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["BENCH_MODULES", "bundle", "check", "imported_files", "main"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "runs" / "vllm_lite"
SIZE_LIMIT = 40 << 20  # what the bundle may weigh: it travels with the checkout (64 MiB in all)
PLATFORMS = ("cpu", "cuda")
# what the offloading bench imports from vLLM (its two paths and kvbm's spec) and what vLLM's CUDA platform imports
BENCH_MODULES = (
    "vllm.v1.kv_offload.base",
    "vllm.v1.kv_offload.cpu.common",
    "vllm.v1.kv_offload.cpu.gpu_worker",
    "kvbm.vllm_offloading.manager",
    "kvbm.vllm_offloading.worker",
    "bench.offloading_bench",
    "vllm.platforms.cuda",
)
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
#: Distributions the bench's vLLM imports pull that the GPU machine lacks.
DEFAULT_WHEELS = ("msgspec", "pyzmq")
ENV_SH = """\
# Source on the GPU machine: vLLM's Python for bench.offloading_bench (written by bench/vllm_bundle.py)
BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if compgen -G "$BUNDLE/wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/vllm_site "$BUNDLE"/wheels/*.whl
fi
export PYTHONPATH="$BUNDLE/site:/tmp/vllm_site${PYTHONPATH:+:$PYTHONPATH}"
"""


# -- the listing (runs in a subprocess: vLLM's platform is chosen once per process) --------------------------------


def _report_imports(platform: str, out: str) -> None:
    """Import :data:`BENCH_MODULES` under vLLM's ``platform`` and write to ``out`` (JSON) the vLLM files read (compiled
    extensions left out), the third-party distributions imported and where each imported top-level module came
    from. Run by :func:`imported_files` in a fresh interpreter."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        raise SystemExit("vLLM is not importable here")
    root = Path(spec.origin).parent
    opened: set[str] = set()

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str) and args[0].startswith(f"{root}{os.sep}"):
            opened.add(args[0])

    sys.addaudithook(audit)
    if platform == "cpu":
        os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    else:
        os.environ.pop("VLLM_TARGET_DEVICE", None)
    from bench.vllm_stand_in import register_stand_in

    register_stand_in()  # vLLM's CUDA platform imports the compiled extension, which need not load here
    import vllm.platforms as platforms

    if platform == "cuda":
        from vllm.plugins import PLATFORM_PLUGINS_GROUP, load_plugins_by_group

        for detect in platforms.builtin_platform_plugins.values():  # what resolving the platform runs
            try:
                detect()
            except Exception:  # noqa: BLE001 - vLLM logs and skips a plugin that fails on this machine
                pass
        load_plugins_by_group(PLATFORM_PLUGINS_GROUP)
        platforms.vllm_version_matches_substr("cpu")
        cuda = importlib.import_module("vllm.platforms.cuda")
        platforms._current_platform = cuda.CudaPlatform()  # what a GPU machine resolves (NVML and vLLM's version)
        platforms._current_platform.import_kernels()
        platforms._current_platform.is_pin_memory_available()
    for name in BENCH_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SystemExit(f"importing {name} under vLLM's {platform} platform failed: missing module "
                             f"{exc.name!r} ({exc})") from exc
    read = {Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
    read = {f for f in read | {Path(p) for p in opened} if root in f.parents and "__pycache__" not in f.parts}
    files = sorted(str(f.relative_to(root.parent)) for f in read if f.is_file())
    extensions = [f for f in files if f.endswith((".so", ".pyd"))]
    files = [f for f in files if f not in extensions]
    dists: dict[str, str] = {}
    origins: dict[str, str | None] = {}
    known = importlib.metadata.packages_distributions()
    for top in sorted({name.partition(".")[0] for name in sys.modules}):
        if top in sys.stdlib_module_names or top in sys.builtin_module_names or top.startswith("_"):
            continue
        origins[top] = getattr(sys.modules.get(top), "__file__", None)
        for dist in known.get(top, []):
            dists[dist] = importlib.metadata.version(dist)
    for own in ("vllm", "kvbm"):
        dists.pop(own, None)
    result = {"platform": type(platforms.current_platform).__name__, "files": files, "dists": dists,
              "origins": origins, "extensions": extensions}
    Path(out).write_text(json.dumps(result))


def _run_listing(platform: str, boot: str, isolated: bool = False) -> dict[str, Any]:
    """Run :func:`_report_imports` under ``platform`` in a fresh interpreter after the ``boot`` code set up its path;
    ``isolated``: without the site module and PYTHONPATH, so ``boot`` alone decides what is importable, and without
    writing bytecode into the bundle."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_TARGET_DEVICE")} if isolated else None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "imports.json"
        code = f"{boot}\nfrom bench.vllm_bundle import _report_imports\n_report_imports({platform!r}, {str(out)!r})"
        proc = subprocess.run([sys.executable, *(["-S", "-B"] if isolated else []), "-c", code], cwd=tmp, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"importing the bench's vLLM modules ({platform} platform) failed:\n"
                               f"{proc.stderr.strip()[-3000:]}")
        return json.loads(out.read_text())


def imported_files(platform: str) -> dict[str, Any]:
    """The vLLM files (relative to site-packages) and third-party distributions the bench's imports read under
    vLLM's ``platform`` ('cpu' or 'cuda'), and the platform class vLLM used, from a fresh interpreter."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    return _run_listing(platform, f"import sys; sys.path.insert(0, {str(REPO)!r})")


# -- the bundle ----------------------------------------------------------------------------------------------------


def _download_wheels(names: list[str], python_version: str, dest: Path) -> list[Path]:
    """manylinux cp``python_version`` wheels of ``names`` at the versions installed here, into ``dest``."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in names]
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp"]
    for tag in WHEEL_PLATFORMS:
        command += ["--platform", tag]
    proc = subprocess.run([*command, "-d", str(dest), *pins], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(pins)} failed:\n{proc.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    got = {_normalized(w.name.split("-")[0]) for w in wheels}
    missing = [p for p, n in zip(pins, names) if _normalized(n) not in got]
    if missing:
        raise RuntimeError(f"pip download left no wheel for {', '.join(missing)} in {dest}")
    return wheels


def _normalized(name: str) -> str:
    """A distribution name as wheel files and metadata compare it (case and ``_`` / ``-`` folded)."""
    return name.lower().replace("_", "-")


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def bundle(out: Path, python_version: str = "3.12", wheels: tuple[str, ...] = DEFAULT_WHEELS) -> dict:
    """Write the bundle (see the module docstring) to ``out``; returns its manifest. Raises if it outweighs 40 MiB."""
    listings = {platform: imported_files(platform) for platform in PLATFORMS}
    files = sorted(set().union(*(set(listing["files"]) for listing in listings.values())))
    extensions = sorted(set().union(*(set(listing["extensions"]) for listing in listings.values())))
    dists: dict[str, str] = {}
    for listing in listings.values():
        dists.update(listing["dists"])
    imported = {_normalized(d) for d in dists}
    unknown = [w for w in wheels if _normalized(w) not in imported]
    if unknown:
        raise RuntimeError(f"{', '.join(unknown)}: not imported by the bench's vLLM modules; nothing to bundle")
    vllm = importlib.metadata.distribution("vllm")
    site = Path(vllm.locate_file(""))
    for sub in ("site", "wheels"):  # only what this tool writes is replaced
        shutil.rmtree(out / sub, ignore_errors=True)
    for rel in files:
        (out / "site" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site / rel, out / "site" / rel)
    meta = out / "site" / f"vllm-{vllm.version}.dist-info" / "METADATA"
    meta.parent.mkdir(parents=True)
    meta.write_text(vllm.read_text("METADATA") or f"Metadata-Version: 2.1\nName: vllm\nVersion: {vllm.version}\n")
    got = _download_wheels(list(wheels), python_version, out / "wheels") if wheels else []
    (out / "env.sh").write_text(ENV_SH)
    manifest = {
        "vllm": vllm.version, "platforms": {p: listing["platform"] for p, listing in listings.items()},
        "files": len(files), "site_bytes": _size(out / "site"), "python_version": python_version,
        "wheels": [w.name for w in got], "wheel_bytes": sum(w.stat().st_size for w in got),
        "third_party": {d: v for d, v in sorted(dists.items())},
        "extensions_left_out": extensions,  # vLLM's compiled modules that loaded while listing (none without CUDA)
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    manifest["total_bytes"] = _size(out)
    if manifest["total_bytes"] > SIZE_LIMIT:
        raise RuntimeError(f"the bundle weighs {manifest['total_bytes'] / 2**20:.1f} MiB, over "
                           f"{SIZE_LIMIT / 2**20:.0f} MiB")
    return manifest


# -- the check -----------------------------------------------------------------------------------------------------


def _hidden_entries(site: Path, dists: list[str]) -> set[str]:
    """The top-level names in ``site`` (packages, modules, .dist-info folders, .pth files) that belong to ``dists``
    and to no other installed distribution."""
    hide = {_normalized(name) for name in dists}
    owners: dict[str, set[bool]] = {}
    for dist in importlib.metadata.distributions():
        hidden = _normalized(dist.metadata["Name"]) in hide
        for file in dist.files or []:
            owners.setdefault(Path(file).parts[0], set()).add(hidden)
    return {top for top, hidden in owners.items() if hidden == {True} and top != ".." and (site / top).exists()}


def check(out: Path, without: tuple[str, ...] = ()) -> dict[str, Any]:
    """Import the bench's vLLM modules from the bundle at ``out`` (see the module docstring) under both platforms;
    returns, per platform, vLLM's platform class and where vllm and each bundled wheel's module was found."""
    manifest = json.loads((out / "manifest.json").read_text())
    wheels = [w.split("-")[0] for w in manifest["wheels"]]
    site = Path(sysconfig.get_paths()["purelib"])
    hidden = _hidden_entries(site, ["vllm", *wheels, *without])
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        view, target = Path(tmp) / "site", Path(tmp) / "target"
        view.mkdir()
        for entry in site.iterdir():  # this interpreter's site-packages without what the GPU machine lacks
            if entry.name not in hidden:
                (view / entry.name).symlink_to(entry)
        target.mkdir()
        if wheels:
            names = [importlib.metadata.distribution(w).metadata["Name"] for w in wheels]
            local = _download_wheels(names, here, Path(tmp) / "wheels")
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                   "--no-compile", "--target", str(target), *map(str, local)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"pip install of {local} failed:\n{proc.stderr.strip()[-2000:]}")
        paths = [str(REPO), str(out / "site"), str(target)]
        boot = f"import site, sys; sys.path[:0] = {paths!r}; site.addsitedir({str(view)!r})"
        tops = _top_levels(target) | {"vllm"}
        for platform in PLATFORMS:
            listing = _run_listing(platform, boot, isolated=True)
            origins = {top: listing["origins"].get(top) for top in sorted(tops)}
            where = {top: str(out / "site") if top == "vllm" else str(target) for top in tops}
            outside = {top: f for top, f in origins.items() if not (f or "").startswith(where[top])}
            if outside:
                raise RuntimeError(f"{platform} platform: not imported from the bundle: {outside}")
            results[platform] = {"platform": listing["platform"], "files": len(listing["files"]), "origins": origins}
    return results


def _top_levels(target: Path) -> set[str]:
    """The importable top-level names a ``pip install --target`` folder holds."""
    return {e.name.removesuffix(".py") for e in target.iterdir()
            if not e.name.endswith((".dist-info", ".libs")) and e.name != "bin" and not e.name.startswith("_")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"bundle folder (default {DEFAULT_OUT})")
    p.add_argument("--python-version", default="3.12", help="Python of the wheels (the GPU machine's; default 3.12)")
    p.add_argument("--wheels", nargs="+", default=list(DEFAULT_WHEELS),
                   help="distributions the import pulls and the GPU machine lacks (default: "
                        f"{' '.join(DEFAULT_WHEELS)})")
    p.add_argument("--check", action="store_true", help="then import the bench's vLLM modules from the bundle")
    p.add_argument("--without", nargs="*", default=[],
                   help="with --check: more distributions to hide, e.g. all that the GPU machine lacks")
    args = p.parse_args(argv)
    manifest = bundle(args.out, args.python_version, tuple(args.wheels))
    print(f"wrote {args.out}: {manifest['files']} vLLM {manifest['vllm']} files ({manifest['site_bytes'] / 2**20:.2f} "
          f"MiB), wheels {', '.join(manifest['wheels'])} ({manifest['wheel_bytes'] / 2**20:.2f} MiB); total "
          f"{manifest['total_bytes'] / 2**20:.2f} MiB")
    print("third-party distributions imported: " + ", ".join(f"{d} {v}" for d, v in manifest["third_party"].items()))
    if args.check:
        for platform, result in check(args.out, tuple(args.without)).items():
            print(f"check ({platform}): vLLM's {result['platform']}, {result['files']} vLLM files read; "
                  + ", ".join(f"{top} from {path}" for top, path in result["origins"].items()))
        manifest["check"] = "passed"
    return manifest


if __name__ == "__main__":
    main()
