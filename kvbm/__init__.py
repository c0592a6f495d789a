"""kvbm: keeps the KV blocks an LLM engine computes (GPU -> pinned host -> disk) and brings them back on a prefix hit.

Importing kvbm registers the transfer library's kernel backends with the conversion API of `kvbm.layouts`.
"""
from kvbm import kernels as _kernels  # noqa: F401  (registers the Triton and numba backends)

__version__ = "0.1.0"
