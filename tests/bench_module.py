"""Load a ``bench/`` module from its file, for tests: the repo root is not on the tests' path (see tests/run.sh)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_module(filename: str, name: str) -> ModuleType:
    """``bench/<filename>`` executed as a fresh module called ``name`` (not entered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
