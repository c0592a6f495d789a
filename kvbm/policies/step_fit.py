"""The engine's marginal prefill cost per token, fitted from timed steps, for the cost rule's recompute time
(`kvbm.policies.cost`).

A step's seconds are modelled as ``fixed + per_token * tokens``: the fixed part (kernel launches, the weights read
once per step, sampling) is paid by every step, so recomputing a prefix costs only ``per_token`` for each of its
tokens (they join a step that runs anyway). The fit is Theil-Sen over the last ``window`` steps: the median of the
slopes between pairs of steps, which a few outlying timings (a preempted or contended step) cannot move far, where
a least-squares fit follows them. Only pairs whose sizes differ by at least a quarter of the smaller one count: a
slope between steps of about the same size is mostly noise. Until ``min_pairs`` such pairs are in the window, or
while their median slope is not positive, there is no fit (``per_token`` is None) and the caller keeps its
average rate.
"""
from __future__ import annotations

from collections import deque

import numpy as np

__all__ = ["StepFit"]

_SIZE_SPREAD = 1.25  # a pair counts when its larger step has at least this many times the smaller one's tokens


class StepFit:
    """Theil-Sen fit of step seconds against step tokens over the last ``window`` steps (see the module)."""

    def __init__(self, window: int = 32, min_pairs: int = 8) -> None:
        if window < 2 or min_pairs < 1:
            raise ValueError(f"window must be at least 2 and min_pairs at least 1, got {window}, {min_pairs}")
        self.min_pairs = min_pairs
        self._tokens: deque[float] = deque(maxlen=window)
        self._seconds: deque[float] = deque(maxlen=window)
        #: Fitted seconds per token (positive), or None while the steps seen do not give a slope.
        self.per_token: float | None = None

    def add(self, tokens: int, seconds: float) -> None:
        """Account one step of ``tokens`` tokens that took ``seconds``, and refit."""
        self._tokens.append(float(tokens))
        self._seconds.append(float(seconds))
        self.per_token = self._fit()

    def _fit(self) -> float | None:
        x = np.fromiter(self._tokens, dtype=np.float64, count=len(self._tokens))
        y = np.fromiter(self._seconds, dtype=np.float64, count=len(self._seconds))
        i, j = np.triu_indices(len(x), 1)
        small, large = np.minimum(x[i], x[j]), np.maximum(x[i], x[j])
        spread = (large > small) & (large >= _SIZE_SPREAD * small)
        if np.count_nonzero(spread) < self.min_pairs:
            return None
        i, j = i[spread], j[spread]
        slope = float(np.median((y[j] - y[i]) / (x[j] - x[i])))
        return slope if slope > 0 else None
