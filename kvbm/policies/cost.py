"""Cost-aware hits: a tier's prefix hit is reported to the engine only where loading it is expected to be faster
than recomputing it.

A stored block is not always worth loading: a slow or contended disk, or another instance's G2 across a slow
network, can take longer to read a prefix than the engine takes to prefill it again. For a match that is a run of
``hits[0]`` blocks in the first tier (G2), then ``hits[1]`` in the next (G3), then those of the shared G4 tier
(another instance's G2, `kvbm.connectors.directory_view`) ..., the rule models

- loading a prefix: for each tier it uses, ``latency[tier] + blocks * block_bytes / bandwidth[tier]`` (tiers are
  read one after the other; the sum is the conservative bound),
- recomputing it: ``blocks * block_tokens / prefill_rate``, with the prefill rate the engine's marginal one:
  recomputed tokens join a step that runs anyway, so they cost the step's per-token time, not its average time
  per token (which also spreads the step's fixed cost over its tokens),

and reports the prefix that saves the most time, ``recompute - load > 0``, or nothing. Within one tier's run the
saving is linear in the number of blocks (a fixed latency, then a per-block difference), so the best prefix ends
at a tier boundary: a tier's part is reported whole or not at all, a G3 part whose load is slower than its
recompute is never reported, and a G2 prefix that pays for itself is kept when the G3 part after it is dropped.

Inputs are cold-start values (``DYN_KVBM_*``, see `kvbm.config`) replaced by online estimates:

- per-tier load bandwidth from completed loads into the engine's cache (``observe_load``, with each move's share
  of the time its direction's moves ran, see `kvbm.worker.store`): an exponentially weighted average of bytes and
  of seconds (the tier's latency taken off each move), whose ratio is the estimate, so large moves weigh more;
- the prefill rate from step timings the connector passes in (``observe_prefill``; the vLLM connector times its
  prefill-dominated forward steps on the workers, `kvbm.connectors.prefill`): ``1 / per_token`` of a fit of step
  seconds as ``fixed + per_token * tokens`` over the last 32 steps (`kvbm.policies.step_fit`, robust to a few
  outlying steps). While those steps do not spread enough in size to give a positive slope (e.g. all of one
  size), it is the average rate instead: an exponentially weighted average of tokens and of seconds, whose ratio
  is the estimate. A step's fixed cost counts as per-token cost there, so the average rate is lower than the
  marginal one: measured on an H100 (Llama-3.1-8B shape), a 256-token step after a 2k cached prefix took 18 ms
  (14k tokens/s), while recomputing the 2k prefix added 54 ms (38k tokens/s). Either way, a prefix's recompute time
  is capped by what the steps seen allow (a step of ``t`` tokens that took ``s`` seconds: ``n`` tokens add at most
  ``s * max(1, n / t)``), so a fit thrown off by noisy short steps cannot make a slow tier look worth loading.

A tier whose hits are dropped is no longer loaded, so its estimate would never recover from a bad period: every
``probe_seconds`` without a measurement of it, one batch of its hits (``probe_blocks``) is reported anyway.
``enabled=False`` (``DYN_KVBM_DISABLE_COST_AWARE_HITS``) reports every hit; estimates are still kept and exported.
Decisions are logged at DEBUG, estimates at INFO when they move by more than 20% since last logged.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kvbm.config import GB, KvbmConfig
from kvbm.metrics import KvbmMetrics
from kvbm.policies.step_fit import StepFit

__all__ = ["CostDecision", "LoadCostPolicy", "MAX_BANDWIDTH"]

log = logging.getLogger(__name__)

#: Bytes/s an estimate is capped at (a move that finished within its tier's latency reads as this fast).
MAX_BANDWIDTH = 1e13
_ENGINE_TIER = "G1"
_HOST_TIER = "G2"
_SHARED_TIER = "G4"  # another instance's G2, found through the shared tier's directory
_LOG_CHANGE = 0.2  # relative change of an estimate that is logged at INFO


@dataclass(frozen=True)
class CostDecision:
    """What the rule reports of one match: ``num_blocks`` leading blocks, ``hits`` of them per tier, ``dropped``
    per tier (found but not reported), the expected ``load_seconds`` of what is reported and ``recompute_seconds``
    of the same tokens; ``probe`` when a batch was reported only to re-measure a tier."""

    num_blocks: int
    hits: tuple[int, ...]
    dropped: tuple[int, ...]
    load_seconds: float
    recompute_seconds: float
    probe: bool = False


class _Rate:
    """Exponentially weighted amount and seconds; their ratio is the rate (unbiased from the first sample on)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.amount = 0.0
        self.seconds = 0.0
        self.samples = 0

    def add(self, amount: float, seconds: float) -> None:
        a = self.alpha
        self.amount = (1 - a) * self.amount + a * amount
        self.seconds = (1 - a) * self.seconds + a * seconds
        self.samples += 1

    def rate(self, cap: float) -> float | None:
        if not self.samples:
            return None
        if self.seconds <= 0:
            return cap
        return min(self.amount / self.seconds, cap)


def _positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite, {'non-negative' if allow_zero else 'positive'} number, "
                         f"got {value!r}")
    return float(value)


class LoadCostPolicy:
    """The cost-aware hit rule over an ordered list of tiers (see the module docstring). Thread-safe."""

    def __init__(self, tiers: Sequence[str], *, block_bytes: int, block_tokens: int,
                 bandwidth: Mapping[str, float], latency: Mapping[str, float], prefill_rate: float,
                 enabled: bool = True, probe_seconds: float = 60.0, probe_blocks: int = 16, alpha: float = 0.2,
                 metrics: KvbmMetrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """``tiers``: names in lookup order; ``block_bytes``: bytes one block's load moves (summed over ranks when
        ranks load their shards in parallel); ``block_tokens``: tokens per block; ``bandwidth`` (bytes/s) and
        ``latency`` (seconds) per tier and ``prefill_rate`` (tokens/s): cold-start values; ``alpha``: weight of
        a new measurement; ``clock``: seconds, for the probes (injectable for tests)."""
        if not tiers or len(set(tiers)) != len(tiers):
            raise ValueError(f"tiers must be distinct names, at least one, got {list(tiers)!r}")
        for name, value in (("block_bytes", block_bytes), ("block_tokens", block_tokens),
                            ("probe_blocks", probe_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        missing = [t for t in tiers if t not in bandwidth or t not in latency]
        if missing:
            raise ValueError(f"no bandwidth or latency given for tiers {missing}")
        if not 0 < _positive("alpha", alpha) <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.tiers = tuple(tiers)
        self.block_bytes = block_bytes
        self.block_tokens = block_tokens
        self.enabled = bool(enabled)
        self.probe_seconds = _positive("probe_seconds", probe_seconds, allow_zero=True)
        self.probe_blocks = probe_blocks
        self.metrics = metrics
        self._clock = clock
        self._default_bw = {t: _positive(f"bandwidth[{t!r}]", bandwidth[t]) for t in self.tiers}
        self._latency = {t: _positive(f"latency[{t!r}]", latency[t], allow_zero=True) for t in self.tiers}
        self._default_prefill = _positive("prefill_rate", prefill_rate)
        self._bw = {t: _Rate(alpha) for t in self.tiers}
        self._prefill = _Rate(alpha)
        self._prefill_fit = StepFit()
        now = clock()
        self._last_seen = {t: now for t in self.tiers}  # last measurement or probe of each tier
        self._logged: dict[str, float] = {}
        self._lock = threading.Lock()
        for t in self.tiers:
            self._publish(f"{t} load bandwidth", self.bandwidth(t), "B/s", t)
        self._publish("prefill rate", self.prefill_rate, "tokens/s", None)

    @classmethod
    def from_config(cls, config: KvbmConfig, tiers: Sequence[str], *, block_bytes: int, block_tokens: int,
                    probe_blocks: int | None = None, metrics: KvbmMetrics | None = None,
                    clock: Callable[[], float] = time.monotonic) -> LoadCostPolicy:
        """The rule as the ``DYN_KVBM_*`` variables set it: G2 gets the host values, G4 (the shared tier) the G4
        values, every other tier the disk values; a probe is one batch (``DYN_KVBM_MAX_TRANSFER_BATCH_SIZE``
        blocks) unless ``probe_blocks``."""
        host = (config.host_load_gb_per_s * GB, config.host_load_latency_ms / 1e3)
        disk = (config.disk_load_gb_per_s * GB, config.disk_load_latency_ms / 1e3)
        shared = (config.g4_load_gb_per_s * GB, config.g4_load_latency_ms / 1e3)
        values = {t: host if t == _HOST_TIER else shared if t == _SHARED_TIER else disk for t in tiers}
        return cls(tiers, block_bytes=block_bytes, block_tokens=block_tokens,
                   bandwidth={t: v[0] for t, v in values.items()}, latency={t: v[1] for t, v in values.items()},
                   prefill_rate=config.prefill_tokens_per_s, enabled=not config.disable_cost_aware_hits,
                   probe_seconds=config.cost_probe_secs,
                   probe_blocks=probe_blocks if probe_blocks is not None else config.max_transfer_batch_size,
                   metrics=metrics, clock=clock)

    # -- estimates ---------------------------------------------------------------------------------------------

    def bandwidth(self, tier: str) -> float:
        """Current load bandwidth estimate of ``tier`` in bytes/s (measured, else the configured value)."""
        rate = self._bw[tier].rate(MAX_BANDWIDTH)
        return self._default_bw[tier] if rate is None else rate

    def latency(self, tier: str) -> float:
        """Fixed seconds per load from ``tier`` (configured)."""
        return self._latency[tier]

    @property
    def prefill_rate(self) -> float:
        """Current prefill rate estimate in tokens/s: the marginal rate fitted from the steps seen, else their
        average rate while they do not give a fit, else the configured value."""
        per_token = self._prefill_fit.per_token
        if per_token is not None:
            return 1.0 / per_token
        rate = self._prefill.rate(math.inf)
        return self._default_prefill if rate is None else rate

    def step_seconds(self, tokens: int) -> float:
        """Expected seconds of a forward step that computes ``tokens`` tokens: the fit's fixed and per-token cost
        where the steps seen give one, else the tokens at the average (else configured) prefill rate."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a non-negative int, got {tokens!r}")
        with self._lock:
            fitted = self._prefill_fit.seconds(tokens)
            return fitted if fitted is not None else tokens / self.prefill_rate

    def observe_load(self, tier: str, *, num_bytes: int, seconds: float) -> None:
        """Account one completed load from ``tier`` into the engine's cache: ``num_bytes`` arrived intact (failed
        blocks count as time spent for nothing) in ``seconds`` (its share of the time when loads overlapped: see
        `kvbm.leader.MoveResult`)."""
        if tier not in self._bw:
            log.debug("load from %s not measured: not a tier of this rule (%s)", tier, ", ".join(self.tiers))
            return
        if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0:
            raise ValueError(f"num_bytes must be a non-negative int, got {num_bytes!r}")
        seconds = _positive("seconds", seconds, allow_zero=True)
        with self._lock:
            self._bw[tier].add(num_bytes, max(seconds - self._latency[tier], 0.0))
            self._last_seen[tier] = self._clock()
            bw = self.bandwidth(tier)
        self._publish(f"{tier} load bandwidth", bw, "B/s", tier)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Account one engine step that prefilled ``tokens`` tokens in ``seconds`` (steps with no prefill are not
        passed in): it feeds both the marginal fit and the average rate."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a non-negative int, got {tokens!r}")
        seconds = _positive("seconds", seconds)
        with self._lock:
            self._prefill.add(tokens, seconds)
            self._prefill_fit.add(tokens, seconds)
            rate = self.prefill_rate
        self._publish("prefill rate", rate, "tokens/s", None)

    # -- the rule ----------------------------------------------------------------------------------------------

    def load_seconds(self, hits: Sequence[int]) -> float:
        """Expected seconds to load a prefix of ``hits[k]`` blocks from tier k."""
        return sum(self._tier_seconds(t, n) for t, n in zip(self.tiers, hits) if n)

    def recompute_seconds(self, num_blocks: int) -> float:
        """Expected seconds to prefill ``num_blocks`` blocks' tokens again: at the prefill rate, but never more than
        the steps seen bound it to (`StepFit.marginal_bound`: a prefix costs at most what a step of its size took)."""
        with self._lock:
            return self._recompute_seconds(num_blocks)

    def _recompute_seconds(self, num_blocks: int) -> float:
        """`recompute_seconds`, the lock held."""
        tokens = num_blocks * self.block_tokens
        estimate = tokens / self.prefill_rate
        bound = self._prefill_fit.marginal_bound(tokens)
        return estimate if bound is None else min(estimate, bound)

    def pays_off(self, tier: str, num_blocks: int) -> bool:
        """Whether loading ``num_blocks`` blocks from ``tier`` is expected to beat recomputing them: the rule's own
        comparison, without its probes (True while the rule is disabled)."""
        if tier not in self._bw:
            raise ValueError(f"no tier {tier!r} in this rule (tiers {', '.join(self.tiers)})")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if not self.enabled:
            return True
        with self._lock:
            return self._tier_seconds(tier, num_blocks) < self._recompute_seconds(num_blocks)

    def decide(self, hits: Sequence[int]) -> CostDecision:
        """The leading blocks of a match (``hits[k]`` blocks of tier k, in order) worth reporting."""
        hits = tuple(hits)
        if len(hits) != len(self.tiers) or any(isinstance(n, bool) or not isinstance(n, int) or n < 0
                                               for n in hits):
            raise ValueError(f"hits must be {len(self.tiers)} non-negative ints (tiers {', '.join(self.tiers)}), "
                             f"got {hits!r}")
        total = sum(hits)
        if not self.enabled or not total:
            return CostDecision(total, hits, (0,) * len(hits), self.load_seconds(hits),
                                self.recompute_seconds(total))
        with self._lock:
            best_k, best_saving = 0, 0.0
            load = 0.0
            for k, (t, n) in enumerate(zip(self.tiers, hits), start=1):
                if not n:
                    continue
                load += self._tier_seconds(t, n)
                saving = self._recompute_seconds(sum(hits[:k])) - load
                if saving > best_saving:
                    best_k, best_saving = k, saving
            kept = list(hits[:best_k]) + [0] * (len(hits) - best_k)
            probe = False
            first = next((k for k in range(best_k, len(hits)) if hits[k]), None)
            if first is not None and self.probe_seconds > 0:
                t = self.tiers[first]
                now = self._clock()
                if now - self._last_seen[t] >= self.probe_seconds:
                    self._last_seen[t] = now
                    kept[first] = min(hits[first], self.probe_blocks)
                    probe = True
        kept_t = tuple(kept)
        dropped = tuple(h - k for h, k in zip(hits, kept_t))
        n = sum(kept_t)
        decision = CostDecision(n, kept_t, dropped, self.load_seconds(kept_t), self.recompute_seconds(n), probe)
        if self.metrics is not None:
            for t, d in zip(self.tiers, dropped):
                self.metrics.record_cost_dropped(t, d)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("cost-aware hits: found %s, report %s%s: load %.3f ms < recompute %.3f ms of those tokens "
                      "(full match: load %.3f ms, recompute %.3f ms); %s; prefill %.0f tokens/s",
                      _per_tier(self.tiers, hits), _per_tier(self.tiers, kept_t), " (probe)" if probe else "",
                      decision.load_seconds * 1e3, decision.recompute_seconds * 1e3,
                      self.load_seconds(hits) * 1e3, self.recompute_seconds(total) * 1e3,
                      ", ".join(f"{t} {self.bandwidth(t) / GB:.3g} GB/s + {self._latency[t] * 1e3:.3g} ms"
                                for t in self.tiers), self.prefill_rate)
        return decision

    # -- internals ---------------------------------------------------------------------------------------------

    def _tier_seconds(self, tier: str, num_blocks: int) -> float:
        """Expected seconds to load ``num_blocks`` blocks from ``tier``: its latency, then each block."""
        return self._latency[tier] + num_blocks * self._block_seconds(tier)

    def _block_seconds(self, tier: str) -> float:
        """Expected seconds to load one block from ``tier`` past its latency (infinite after only failed loads)."""
        bw = self.bandwidth(tier)
        return self.block_bytes / bw if bw > 0 else math.inf

    def _publish(self, what: str, value: float, unit: str, tier: str | None) -> None:
        """Export an estimate; log it at INFO when it moved by more than 20% since it was last logged."""
        if self.metrics is not None:
            if tier is None:
                self.metrics.set_prefill_rate(value)
            else:
                self.metrics.set_load_bandwidth(tier, value)
        last = self._logged.get(what)
        if last is None or abs(value - last) > _LOG_CHANGE * last:
            self._logged[what] = value
            scaled = f"{value / GB:.3g} GB/s" if unit == "B/s" else f"{value:.4g} {unit}"
            log.info("cost-aware hits: %s %s %s%s", what, "now" if last is not None else "starts at", scaled,
                     "" if self.enabled else " (rule disabled by DYN_KVBM_DISABLE_COST_AWARE_HITS)")


def _per_tier(tiers: Sequence[str], hits: Sequence[int]) -> str:
    return " + ".join(f"{n} {t}" for t, n in zip(tiers, hits)) or "0"
