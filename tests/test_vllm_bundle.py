"""The vLLM bundler for GPU machines without vLLM (bench/vllm_bundle.py): its import listing under vLLM's CUDA
platform, the bundle it writes (with a listing and no wheels given, so no network is needed), and the site-packages
entries its check hides. Its wheel download and ``--check`` need PyPI and are not run here."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest
from bench_module import load_bench_module

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM installed")


@pytest.fixture(scope="module")
def vb():
    return load_bench_module("vllm_bundle.py", "vllm_bundle_under_test")


def vllm_site() -> Path:
    return Path(importlib.metadata.distribution("vllm").locate_file(""))


@needs_vllm
def test_listing_under_the_cuda_platform(vb):
    listing = vb.imported_files("cuda")
    assert listing["platform"].endswith("CudaPlatform")  # NonNvml without a GPU driver, Nvml with one
    files = set(listing["files"])
    for needed in ("vllm/__init__.py", "vllm/v1/kv_offload/cpu/gpu_worker.py", "vllm/v1/kv_offload/base.py",
                   "vllm/v1/kv_offload/cpu/common.py", "vllm/v1/kv_offload/cpu/swap_blocks_triton.py",
                   "vllm/platforms/cuda.py", "vllm/third_party/pynvml.py", "vllm/_custom_ops.py"):
        assert needed in files, needed
    site = vllm_site()
    assert all(f.startswith("vllm/") and (site / f).is_file() for f in files)
    assert not any(f.endswith((".so", ".pyd")) for f in files)
    assert all(f.endswith((".so", ".pyd")) for f in listing["extensions"])  # none load without CUDA
    assert {"msgspec", "pyzmq", "torch"} <= set(listing["dists"]) and not {"vllm", "kvbm"} & set(listing["dists"])
    assert listing["origins"]["vllm"].startswith(str(vllm_site()))
    with pytest.raises(ValueError, match="platform must be one of"):
        vb.imported_files("tpu")


@needs_vllm
def test_bundle_copies_the_listed_files(vb, tmp_path, monkeypatch):
    listed = {"cpu": ["vllm/__init__.py", "vllm/v1/kv_offload/base.py"],
              "cuda": ["vllm/__init__.py", "vllm/platforms/cuda.py"]}
    monkeypatch.setattr(vb, "imported_files", lambda platform: {
        "platform": f"{platform}Platform", "files": listed[platform], "dists": {"msgspec": "0.23.0"},
        "extensions": ["vllm/_moe_C_stable_libtorch.abi3.so"] if platform == "cuda" else []})
    stale = tmp_path / "site" / "vllm" / "old.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("left from an earlier bundle")
    manifest = vb.bundle(tmp_path, wheels=())
    site = vllm_site()
    files = sorted({*listed["cpu"], *listed["cuda"]})
    assert manifest["files"] == 3 and not stale.exists()
    for rel in files:
        assert (tmp_path / "site" / rel).read_bytes() == (site / rel).read_bytes()
    version = importlib.metadata.version("vllm")
    metadata = (tmp_path / "site" / f"vllm-{version}.dist-info" / "METADATA").read_text()
    assert f"\nVersion: {version}\n" in metadata
    assert "--target /tmp/vllm_site" in (tmp_path / "env.sh").read_text()
    written = json.loads((tmp_path / "manifest.json").read_text())
    assert written["platforms"] == {"cpu": "cpuPlatform", "cuda": "cudaPlatform"} and written["wheels"] == []
    assert written["extensions_left_out"] == ["vllm/_moe_C_stable_libtorch.abi3.so"]
    assert not (tmp_path / "site" / "vllm" / "_moe_C_stable_libtorch.abi3.so").exists()
    assert manifest["total_bytes"] >= manifest["site_bytes"] > 0
    with pytest.raises(RuntimeError, match="pyzmq: not imported"):
        vb.bundle(tmp_path, wheels=("msgspec", "pyzmq"))
    monkeypatch.setattr(vb, "SIZE_LIMIT", 1000)
    with pytest.raises(RuntimeError, match="over"):
        vb.bundle(tmp_path, wheels=())


def test_check_hides_only_what_belongs_to_the_hidden_distributions(vb):
    pytest.importorskip("msgspec")
    site = Path(importlib.metadata.distribution("msgspec").locate_file(""))
    version = importlib.metadata.version("msgspec")
    assert vb._hidden_entries(site, ["msgspec"]) == {"msgspec", f"msgspec-{version}.dist-info"}
    assert vb._hidden_entries(site, ["no-such-distribution"]) == set()
    try:
        bindings = importlib.metadata.distribution("cuda-bindings")
    except importlib.metadata.PackageNotFoundError:
        return
    hidden = vb._hidden_entries(site, ["cuda-bindings"])  # its cuda/ folder is shared with cuda-pathfinder
    assert f"cuda_bindings-{bindings.version}.dist-info" in hidden and "cuda" not in hidden
