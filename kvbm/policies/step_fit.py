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
"""
from __future__ import annotations

import numpy as np

__all__ = ["MIN_PAIRS", "StepFit", "WINDOW"]

#: Steps the fit looks at (the latest ones).
WINDOW = 32
#: Pairs of steps of different enough sizes needed for a fit.
MIN_PAIRS = 8
_SPREAD = 0.2  # a pair counts when its sizes differ by a fifth of the larger (the larger is 1.25x the smaller)
_I, _J = np.triu_indices(WINDOW, 1)  # every pair of slots


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

    def add(self, tokens: int, seconds: float) -> None:
        """Account one step of ``tokens`` tokens that took ``seconds``, and refit."""
        slot = self._count % WINDOW
        self._tokens[slot], self._seconds[slot] = tokens, seconds
        self._count += 1
        self.per_token = self._fit()
        if self.per_token is None:
            self.fixed = None
        else:
            n = min(self._count, WINDOW)
            self.fixed = max(float(np.median(self._seconds[:n] - self.per_token * self._tokens[:n])), 0.0)

    def seconds(self, tokens: int) -> float | None:
        """Expected seconds of a step of ``tokens`` tokens (``fixed + per_token * tokens``), or None without a fit."""
        if self.fixed is None:  # (None exactly when per_token is)
            return None
        return self.fixed + self.per_token * tokens

    def _fit(self) -> float | None:
        x, y = self._tokens, self._seconds
        dx = x[_J] - x[_I]
        keep = np.abs(dx) >= _SPREAD * np.maximum(x[_I], x[_J])
        if self._count < WINDOW:
            keep &= _J < self._count
        keep &= dx != 0
        n = int(np.count_nonzero(keep))
        if n < MIN_PAIRS:
            return None
        slopes = np.partition((y[_J] - y[_I])[keep] / dx[keep], n // 2)
        slope = float(slopes[n // 2])
        return slope if slope > 0 else None
