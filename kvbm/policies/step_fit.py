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

Whatever the fit says, the steps seen also bound the marginal cost directly (`marginal_bound`): with a fixed part of
at least 0, ``per_token * n`` is at most ``s * max(1, n / t)`` for every step of ``t`` tokens that took ``s``
seconds. Short steps of a host-bound engine take about the same time whatever their size, so their slopes are noise
of either sign, and a few of them can give a median slope far too steep (measured on an H100: 8.9k tokens/s fitted
for Qwen3-0.6B, whose 2304-token prefill took 20.8 ms); and a window of short steps alone gives no slope, so the
caller's average rate charges their fixed cost to every token. The bound keeps either from claiming that a prefix
costs more to recompute than a step of its size was seen to take. It looks beyond the window: the last ``KEEP``
steps of each size class (token counts within a power of two) are kept, so one long step still bounds a prefix's
cost after many short ones.

The fit runs in the scheduler after every timed prefill step, so it is kept incrementally: the slopes of every pair
are held in a matrix, and a new step recomputes only its own row (one vectorised pass over 31 steps) before the
median is taken. On the 2-core CPU machine, in `bench/sched_bench.py`'s run with kvbm's connector, the cost rule's
``observe_prefill`` took 93-148 us per timed step (median; three runs alternating) when every slope was recomputed,
67-76 us this way; in a loop of fits alone, 25 against 18 us.
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections import deque

import numpy as np

__all__ = ["KEEP", "MIN_PAIRS", "StepFit", "WINDOW"]

#: Steps the fit looks at (the latest ones).
WINDOW = 32
#: Pairs of steps of different enough sizes needed for a fit.
MIN_PAIRS = 8
#: Steps of each size class (tokens within a power of two) kept for `StepFit.marginal_bound`.
KEEP = 4
_CLASSES = 24  # size classes 1..2**23 tokens; longer steps share the last
_SPREAD = 0.2  # a pair counts when its sizes differ by a fifth of the larger (the larger is 1.25x the smaller)
_I, _J = np.triu_indices(WINDOW, 1)  # every pair of slots


class StepFit:
    """Theil-Sen fit of step seconds against step tokens over the last ``WINDOW`` steps (see the module)."""

    def __init__(self) -> None:
        self._tokens = np.zeros(WINDOW)  # a ring of the last steps
        self._seconds = np.zeros(WINDOW)
        self._slopes = np.full((WINDOW, WINDOW), np.nan)  # of each pair of slots; NaN: the pair does not count
        self._count = 0
        #: Fitted seconds per token (positive), or None while the steps seen do not give a slope.
        self.per_token: float | None = None
        #: Fitted seconds every step pays (at least 0), or None without a fit.
        self.fixed: float | None = None
        # the last KEEP steps of each size class as (tokens, seconds), for the bound
        self._class_steps: list[deque[tuple[float, float]]] = [deque(maxlen=KEEP) for _ in range(_CLASSES)]
        # the kept steps by tokens: (tokens ascending, least seconds from each on, least seconds per token up to
        # each), rebuilt on the first bound after a step was added; None until then
        self._bound_table: tuple[list[float], list[float], list[float]] | None = None

    def add(self, tokens: int, seconds: float) -> None:
        """Account one step of ``tokens`` tokens that took ``seconds``, and refit."""
        slot = self._count % WINDOW
        x, y = self._tokens, self._seconds
        x[slot], y[slot] = tokens, seconds
        self._count += 1
        if tokens > 0:
            self._class_steps[min(int(tokens).bit_length(), _CLASSES) - 1].append((float(tokens), float(seconds)))
            self._bound_table = None
        n = min(self._count, WINDOW)  # slots not yet filled keep NaN slopes: never paired
        dx = x[:n] - tokens
        counts = (dx != 0) & (np.abs(dx) >= _SPREAD * np.maximum(x[:n], tokens))  # (dx is 0 at its own slot)
        row = np.divide(y[:n] - seconds, dx, out=np.full(n, np.nan), where=counts)
        self._slopes[slot, :n] = row
        self._slopes[:n, slot] = row
        slopes = self._slopes[_I, _J]
        slopes = slopes[~np.isnan(slopes)]
        m = slopes.size
        slope = float(np.partition(slopes, m // 2)[m // 2]) if m >= MIN_PAIRS else 0.0
        if slope > 0:
            self.per_token = slope
            left = sorted((y[:n] - slope * x[:n]).tolist())  # (a list's sort: a tenth of np.median's time here)
            self.fixed = max(left[n // 2] if n % 2 else (left[n // 2 - 1] + left[n // 2]) / 2, 0.0)
        else:
            self.per_token = self.fixed = None

    def marginal_bound(self, tokens: int) -> float | None:
        """The most ``tokens`` tokens can add to a step, by the steps kept (the last ``KEEP`` of each size class):
        the least of ``s * max(1, tokens / t)`` over steps of ``t > 0`` tokens that took ``s`` seconds; None before
        such a step."""
        if self._bound_table is None:  # (plain lists: a few dozen steps, where numpy's per-call cost dominates)
            kept = sorted(step for steps in self._class_steps for step in steps)
            if not kept:
                return None
            seconds_from = [s for _, s in kept]
            for i in range(len(seconds_from) - 2, -1, -1):
                seconds_from[i] = min(seconds_from[i], seconds_from[i + 1])
            per_token_upto = list(itertools.accumulate((s / t for t, s in kept), min))
            self._bound_table = ([t for t, _ in kept], seconds_from, per_token_upto)
        steps, seconds_from, per_token_upto = self._bound_table
        i = bisect.bisect_left(steps, tokens)  # steps[i:] have at least `tokens` tokens: each bounds them by its s
        bound = seconds_from[i] if i < len(steps) else math.inf
        return min(bound, tokens * per_token_upto[i - 1]) if i else bound  # shorter ones by s * tokens / t

    def seconds(self, tokens: int) -> float | None:
        """Expected seconds of a step of ``tokens`` tokens (``fixed + per_token * tokens``), or None without a fit."""
        if self.fixed is None:  # (None exactly when per_token is)
            return None
        return self.fixed + self.per_token * tokens
