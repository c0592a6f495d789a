"""When a prefill's stores end, started after the forward or per group of layers as the forward saves them.

A prompt of new tokens (nothing cached) is prefilled with a G2 side storing its full blocks, twice per repetition
with fresh tokens: once with the stores started after the forward (vLLM's ``wait_for_save``), once started per group
of layers as each layer's K/V is written (``DYN_KVBM_LAYERWISE_STORE``, vLLM's ``save_kv_layer``). For each: the
time to first token, and how long after the first token the stores were done (``tail``: the engine's G1 blocks are
held until then, and a decode instance in disaggregated serving can read them only then).
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Any

from .engine import Engine, KvbmSide
from .model import BLOCK_SIZE

__all__ = ["measure_layer_stores"]

MODES = {"after the forward": False, "per layer group": True}


def measure_layer_stores(engine: Engine, side: KvbmSide, num_tokens: int, vocab: int, reps: int) -> dict[str, Any]:
    """``{mode: {"ttft_ms": median, "tail_ms": median, "blocks": per request}}`` over ``reps`` repetitions after
    one warm-up, the two modes alternating."""
    rng = random.Random(num_tokens + 17)
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for rep in range(reps + 1):
        for mode, layered in MODES.items():
            engine.evict_all()
            engine.drain([side])
            prompt = [rng.randrange(vocab) for _ in range(num_tokens)]
            t0 = time.perf_counter()
            result = engine.run_request(prompt, [side], layer_stores=layered)
            engine.drain([side])
            total = time.perf_counter() - t0
            if rep:
                times[mode].append((result.ttft_s, total - result.ttft_s))
    return {mode: {"ttft_ms": 1e3 * statistics.median(t for t, _ in v),
                   "tail_ms": 1e3 * statistics.median(tail for _, tail in v),
                   "blocks": num_tokens // BLOCK_SIZE} for mode, v in times.items()}
