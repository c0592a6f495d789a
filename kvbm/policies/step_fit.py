"""The engine's marginal prefill cost per token, fitted from timed steps, for the cost rule's recompute time
(`kvbm.policies.cost`).

A step's seconds are modelled as ``fixed + per_token * tokens``: the fixed part (kernel launches, the weights read
once per step, sampling) is paid by every step, so recomputing a prefix costs only ``per_token`` for each of its
tokens (they join a step that runs anyway). The fit is Theil-Sen over the last ``WINDOW`` steps: the median (the
upper one of an even count) of the slopes between pairs of steps, which a few outlying timings (a preempted or
contended step) cannot move far, where a least-squares fit follows them. Only pairs whose sizes differ by at least a
quarter of the smaller one count: a slope between steps of about the same size is mostly noise. Until ``MIN_PAIRS``
such pairs are in the window, or while their median slope is not positive, there is no fit (``per_token`` is None)
and the caller keeps its average rate. With a fit, ``fixed`` is the median over the window's steps of what the slope
leaves of each (at least 0), so `seconds` gives a whole step's expected time.

The fit runs in the scheduler after every timed prefill step, so it is one compiled function (numba; compiled or
loaded from numba's cache when the first `StepFit` is made). On the 2-core CPU machine, in `bench/sched_bench.py`'s
run with kvbm's connector, the cost rule's ``observe_prefill`` took 107 us per timed step (median) with the fit in
numpy calls, 22 us with it compiled; in a loop of fits alone, 25 against 8 us.
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["MIN_PAIRS", "StepFit", "WINDOW"]

#: Steps the fit looks at (the latest ones).
WINDOW = 32
#: Pairs of steps of different enough sizes needed for a fit.
MIN_PAIRS = 8
_SPREAD = 0.2  # a pair counts when its sizes differ by a fifth of the larger (the larger is 1.25x the smaller)


@numba.njit(cache=True, nogil=True)
def _theil_sen(tokens: np.ndarray, seconds: np.ndarray, n: int, spread: float, min_pairs: int
               ) -> tuple[float, float]:  # pragma: no cover (compiled)
    """(per_token, fixed) over the first ``n`` steps, or (nan, nan) without a positive slope (see the module)."""
    slopes = np.empty(n * (n - 1) // 2)
    m = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = tokens[j] - tokens[i]
            if dx != 0 and abs(dx) >= spread * max(tokens[i], tokens[j]):
                slopes[m] = (seconds[j] - seconds[i]) / dx
                m += 1
    if m < min_pairs:
        return np.nan, np.nan
    slope = np.partition(slopes[:m], m // 2)[m // 2]
    if not slope > 0:
        return np.nan, np.nan
    return slope, max(np.median(seconds[:n] - slope * tokens[:n]), 0.0)


class StepFit:
    """Theil-Sen fit of step seconds against step tokens over the last ``WINDOW`` steps (see the module)."""

    def __init__(self) -> None:
        self._tokens = np.zeros(WINDOW)  # a ring of the last steps; slots not yet filled are never paired
        self._seconds = np.zeros(WINDOW)
        self._count = 0
        #: Fitted seconds per token (positive), or None while the steps seen do not give a slope.
        self.per_token: float | None = None
        #: Fitted seconds every step pays (at least 0), or None without a fit.
        self.fixed: float | None = None
        _theil_sen(self._tokens, self._seconds, 0, _SPREAD, MIN_PAIRS)  # compiled (or loaded) now, not in a step

    def add(self, tokens: int, seconds: float) -> None:
        """Account one step of ``tokens`` tokens that took ``seconds``, and refit."""
        slot = self._count % WINDOW
        self._tokens[slot], self._seconds[slot] = tokens, seconds
        self._count += 1
        per_token, fixed = _theil_sen(self._tokens, self._seconds, min(self._count, WINDOW), _SPREAD, MIN_PAIRS)
        self.per_token, self.fixed = (None, None) if math.isnan(per_token) else (float(per_token), float(fixed))

    def seconds(self, tokens: int) -> float | None:
        """Expected seconds of a step of ``tokens`` tokens (``fixed + per_token * tokens``), or None without a fit."""
        if self.fixed is None:  # (None exactly when per_token is)
            return None
        return self.fixed + self.per_token * tokens
