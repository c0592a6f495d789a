"""The "G3 hit, cost rule" mode: kvbm's cost-aware hit rule (`kvbm.policies.cost`) on a G3 side, learning online.

The rule starts from the ``DYN_KVBM_*`` cold-start values and learns as in a served engine: the G3 bandwidth from
the loads the side completes (``ConnectorLeader.apply``) and the prefill rate from the engine's steps
(`Engine.run_request` passes each prefill step's tokens and seconds). Its periodic re-measurement is off, so a
timed request never carries a one-batch probe; instead, while the rule has no measurement of the tier, the next
request that finds stored blocks loads them with the rule off (a probe, untimed in the prefix workload). Every
decision the rule makes is kept with the estimates it used, for the row's note, and so are the blocks the side's
store rule left unstored meanwhile (`kvbm.policies.store_backlog`: blocks the cost rule would not load back are not
stored), which is why a workload whose requests store as they go can find nothing stored.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvbm.policies.cost import CostDecision, LoadCostPolicy

from .engine import KvbmSide, RequestResult
from .model import BLOCK_SIZE

__all__ = ["CostRule", "RuleDecision", "rule_note"]


@dataclass(frozen=True)
class RuleDecision:
    """One request through the rule: whether its stored blocks were loaded, recomputed (the rule dropped them) or
    not found; whether it was the probe; the estimates the rule decided with; the blocks the store rule left unstored
    while it ran."""

    outcome: str  #: "load", "recompute" or "none"
    probe: bool
    bandwidth: float  #: the tier's load bandwidth estimate, bytes/s
    prefill_rate: float  #: tokens/s
    latency: float  #: the tier's fixed seconds per load
    found_blocks: int  #: stored blocks the lookup found (before the rule)
    unstored_blocks: int  #: blocks the side's stores left out while the request ran (the store rule's drops)

    def break_even(self, block_bytes: int) -> float:
        """Bytes/s above which the rule loads the blocks found (infinite if their recompute cannot pay the
        latency)."""
        spare = self.found_blocks * BLOCK_SIZE / self.prefill_rate - self.latency
        return self.found_blocks * block_bytes / spare if spare > 0 else math.inf


class _RecordingPolicy(LoadCostPolicy):
    """The rule unchanged, keeping each decision it makes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decisions: list[CostDecision] = []

    def decide(self, hits: Sequence[int]) -> CostDecision:
        decision = super().decide(hits)
        self.decisions.append(decision)
        return decision


class CostRule:
    """The cost rule attached to ``side``'s scheduler side (every lookup goes through it from now on)."""

    def __init__(self, side: KvbmSide) -> None:
        config = dataclasses.replace(side.config, cost_probe_secs=0.0)
        self.tier = side.tier
        self.policy = _RecordingPolicy.from_config(config, [t.name for t in side.tiers], block_bytes=side.block_bytes,
                                                   block_tokens=BLOCK_SIZE)
        side.leader.cost = self.policy
        self._backlog = side.leader.backlog
        self.measured = False  #: whether a load from the tier has been measured

    @property
    def enabled(self) -> bool:
        """False when ``DYN_KVBM_DISABLE_COST_AWARE_HITS`` turns the rule off (every hit is loaded)."""
        return self.policy.enabled

    def run(self, request: Callable[[], RequestResult]) -> tuple[RequestResult, RuleDecision]:
        """Serve one request through the side; the probe while the tier is unmeasured (see the module docstring)."""
        policy = self.policy
        bandwidth, rate, latency = policy.bandwidth(self.tier), policy.prefill_rate, policy.latency(self.tier)
        enabled = policy.enabled
        probe = enabled and not self.measured
        policy.decisions.clear()
        dropped_before = self._backlog.total_dropped(self.tier)
        policy.enabled = enabled and not probe
        try:
            result = request()
        finally:
            policy.enabled = enabled
        found = sum(sum(d.hits) + sum(d.dropped) for d in policy.decisions)
        dropped = sum(sum(d.dropped) for d in policy.decisions)
        outcome = "load" if result.loaded_tokens else "recompute" if dropped else "none"
        self.measured = self.measured or bool(result.loaded_tokens)
        unstored = self._backlog.total_dropped(self.tier) - dropped_before
        return result, RuleDecision(outcome, probe and outcome == "load", bandwidth, rate, latency, found, unstored)


def rule_note(rule: CostRule, decisions: Sequence[RuleDecision]) -> tuple[str, dict[str, Any]]:
    """The row's note and JSON summary: how the rule decided, with the estimates of its last decision and the
    bandwidth above which it would load the last request's blocks, and the blocks the store rule left unstored."""
    counts = {k: sum(d.outcome == k for d in decisions) for k in ("load", "recompute", "none")}
    probes = sum(d.probe for d in decisions)
    unstored = sum(d.unstored_blocks for d in decisions)
    decided = [d for d in decisions if d.outcome != "none"]
    summary: dict[str, Any] = {"enabled": rule.enabled, "loads": counts["load"], "recomputes": counts["recompute"],
                               "not_found": counts["none"], "probes": probes, "unstored_blocks": unstored}
    left_out = f"; stores left {unstored} blocks out (not worth loading back, or over the backlog)" if unstored else ""
    if not rule.enabled:
        return "rule off (DYN_KVBM_DISABLE_COST_AWARE_HITS): every hit loaded" + left_out, summary
    if not decided:
        return "rule: nothing stored was found" + left_out, summary
    last = decided[-1]
    even = last.break_even(rule.policy.block_bytes)
    summary.update(bandwidth_gb_per_s=last.bandwidth / 1e9, prefill_tokens_per_s=last.prefill_rate,
                   break_even_gb_per_s=even / 1e9 if math.isfinite(even) else None)
    parts = [f"{k} {counts[k]}/{len(decided)}" for k in ("recompute", "load") if counts[k]]
    if probes:
        parts.append(f"{probes} of them the probe (rule off)")
    above = f"loads above {even / 1e9:.3g} GB/s" if math.isfinite(even) else "never loads"
    return (f"rule: {', '.join(parts)} ({rule.tier} est. {last.bandwidth / 1e9:.3g} GB/s, prefill "
            f"{last.prefill_rate / 1e3:.1f}k tok/s: {above}){left_out}"), summary
