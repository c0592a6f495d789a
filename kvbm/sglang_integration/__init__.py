"""SGLang integration: `KvbmStorage`, a HiCache storage (L3) backend on kvbm's tiers.

Loaded by SGLang as ``--hicache-storage-backend dynamic`` with ``"module_path": "kvbm.sglang_integration.storage",
"class_name": "KvbmStorage"`` in ``--hicache-storage-backend-extra-config`` (see README.md here). Importing this
package does not import SGLang; ``KvbmStorage`` does.
"""
from typing import Any

__all__ = ["KvbmStorage"]


def __getattr__(name: str) -> Any:
    if name == "KvbmStorage":
        from .storage import KvbmStorage

        return KvbmStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
