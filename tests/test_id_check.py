"""kvbm.kernels.id_check: the compiled block-id check agrees with check_transfer on random and edge-case ids."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvbm.kernels.id_check import ids_valid
from kvbm.layouts import KVGeometry, allocate
from kvbm.layouts.conversion import check_transfer

G = KVGeometry(2, 2, 2, 1, 4, 2)


def accepted_by_check_transfer(src, dst, s, d) -> bool:
    try:
        check_transfer(src, dst, s, d)
    except (IndexError, ValueError):
        return False
    return True


@pytest.mark.parametrize("seed", range(6))
def test_random_ids_agree_with_check_transfer(seed):
    rng = np.random.default_rng(seed)
    n_src, n_dst = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    src = allocate("vllm_flash_attn_nhd", G, n_src, dtype=torch.bfloat16, device="cpu")
    dst = allocate("kvbm_staging", G, n_dst, dtype=torch.bfloat16, device="cpu")
    verdicts = set()
    for _ in range(300):
        n = int(rng.integers(0, min(n_src, n_dst) + 2))
        s = rng.integers(-2, n_src + 2, n).astype(np.int64)
        d = rng.integers(-2, n_dst + 2, n + int(rng.random() < 0.1)).astype(np.int64)
        if rng.random() < 0.5:  # often valid: distinct in-range destinations
            s = rng.integers(0, n_src, n).astype(np.int64)
            d = rng.permutation(n_dst)[:n].astype(np.int64)
        verdict = ids_valid(s, d, n_src, n_dst)
        assert verdict == accepted_by_check_transfer(src, dst, s, d), (s, d)
        verdicts.add(verdict)
    assert verdicts == {True, False}  # both outcomes were drawn


@pytest.mark.parametrize("s,d,ok", [
    ([], [], True),
    ([0, 0, 3], [1, 2, 0], True),  # repeated sources are allowed
    ([0, 1], [2, 2], False),  # repeated destination
    ([-1], [0], False),
    ([4], [0], False),  # == src blocks
    ([0], [5], False),  # == dst blocks
    ([0], [-1], False),
    ([0, 1], [0], False),  # lengths differ
    ([np.iinfo(np.int64).max], [0], False),
])
def test_edge_cases(s, d, ok):
    assert ids_valid(np.array(s, dtype=np.int64), np.array(d, dtype=np.int64), 4, 5) is ok
