"""The engine's prefill rate, measured: which steps are timed, and one time per step from its ranks' timings.

The cost rule compares a load with recomputing the same tokens (`kvbm.policies.cost`), so it needs the rate at
which the engine computes prompt tokens. The scheduler side marks the steps to time (`timed_tokens`); each worker
rank times its forward of such a step (`kvbm.connectors.forward_timer`) and reports a `StepTiming`; `StepTimes`
joins the ranks' timings of a step into the ``(tokens, seconds)`` the rule's ``observe_prefill`` takes.

Which steps: a step is timed when prompt tokens make at least ``PREFILL_SHARE`` of the tokens its forward computes.
A decode-only step says nothing about prefill (a few tokens, bound by reading the weights and the KV); a
prefill-dominated step is bound by compute, where every token of the batch costs about the same in the linear
layers, so the step's rate is its tokens (prompt and the few decode tokens riding along) over its time. Steps below
the share, and steps carrying layer-wise loads (their forward waits for the loads), are not timed.

Which time: tensor-parallel ranks run one forward in lock step, so a stage's time is its slowest rank's; pipeline
stages run one after the other for a batch, so the step's time is the sum of its stages' times. A step is counted
once every rank reported it; a step some rank never reports is forgotten after `KEEP_STEPS` newer steps.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from kvbm.connectors.messages import RequestLoad, StepTiming

__all__ = ["KEEP_STEPS", "PREFILL_SHARE", "StepTimes", "timed_tokens"]

log = logging.getLogger(__name__)

#: Smallest share of a step's tokens that must be prompt tokens for the step to be timed.
PREFILL_SHARE = 0.75
#: Steps whose ranks' timings are kept while some rank's is still missing.
KEEP_STEPS = 64


def timed_tokens(prompt_tokens: int, step_tokens: int, loads: Sequence[RequestLoad] = ()) -> int:
    """The tokens to time of a step whose forward computes ``step_tokens`` tokens, ``prompt_tokens`` of them prompt
    positions, with ``loads``: ``step_tokens`` when the step is prefill-dominated and has no layer-wise load, else 0."""
    if not 0 <= prompt_tokens <= step_tokens:
        raise ValueError(f"expected 0 <= prompt_tokens <= step_tokens, got {prompt_tokens} and {step_tokens}")
    if not prompt_tokens or prompt_tokens < PREFILL_SHARE * step_tokens or any(load.layerwise for load in loads):
        return 0
    return step_tokens


class StepTimes:
    """The ranks' timings of each step, joined into one ``(tokens, seconds)`` per step once all have reported."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self._open: dict[int, dict[int, StepTiming]] = {}  # step -> rank -> timing

    def add(self, timing: StepTiming) -> tuple[int, float] | None:
        """Take one rank's timing; the step's ``(tokens, seconds)`` when it completes the step, else None."""
        ranks = self._open.setdefault(timing.step, {})
        first = next(iter(ranks.values()), None)
        if first is not None and first.tokens != timing.tokens:  # (one plan names the tokens: never expected)
            log.warning("kvbm: step %d: rank %d timed %d tokens, rank %d %d; the step is not counted", timing.step,
                        timing.rank, timing.tokens, first.rank, first.tokens)
            self._open[timing.step] = {}
            return None
        ranks[timing.rank % self.num_workers] = timing
        self._forget_old(timing.step)
        if len(ranks) < self.num_workers:
            return None
        del self._open[timing.step]
        stages: dict[int, float] = {}
        for t in ranks.values():
            stages[t.stage] = max(stages.get(t.stage, 0.0), t.seconds)
        return timing.tokens, sum(stages.values())

    def _forget_old(self, newest: int) -> None:
        for step in [s for s in self._open if s <= newest - KEEP_STEPS]:
            log.debug("kvbm: step %d's timing came from ranks %s only; not counted", step, sorted(self._open[step]))
            del self._open[step]
