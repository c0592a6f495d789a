"""What the TensorRT-LLM leader sends its worker each step, and its view of one request's progress.

Plain data, importable without TensorRT-LLM. ``ConnectorMetadata`` carries one step's `StepPlan` (the executor
pickles it to broadcast). ``RequestProgress`` follows one request through the executor's ``RequestData`` reports:
it accumulates the tokens and the engine block ids (kept in the shared `TrackedRequest`, which hashes them), and
knows how many tokens have valid KV once the step being planned has run.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Sequence

from kvbm.connectors.leader import TrackedRequest
from kvbm.connectors.messages import StepPlan

__all__ = ["ConnectorMetadata", "RequestProgress", "non_negative_int"]


@dataclass(frozen=True)
class ConnectorMetadata:
    """One step's plan: loads start in ``start_load_kv``, stores after the forward pass, cascades any time."""

    step: int
    plan: StepPlan = field(default_factory=StepPlan)


def non_negative_int(name: str, value: object) -> int:
    """``value`` as an int >= 0, or a TypeError / ValueError naming ``name`` and the value."""
    if type(value) is int and value >= 0:  # the common case, checked cheaply (called per request per step)
        return value
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {out}")
    return out


@dataclass
class RequestProgress:
    """The leader's view of one request's tokens and KV (see the module docstring).

    ``valid_tokens`` starts at the tokens whose KV is in the cache before the request's first computed step (the
    engine's own prefix match plus the blocks loaded into ``loaded``) and grows with each scheduled step.
    """

    state: TrackedRequest
    block_size: int
    valid_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    loaded: tuple[int, ...] = ()  #: engine blocks a load was planned into, checked against the first report

    @property
    def full_blocks(self) -> int:
        """Leading full blocks whose KV is valid."""
        return self.valid_tokens // self.block_size

    def report(self, new_tokens: Sequence[int], new_block_ids: Sequence[int], computed_position: int,
               num_scheduled_tokens: int) -> None:
        """Take one step's ``RequestData``: append tokens and block ids, advance ``valid_tokens``.

        The executor's ``computed_position`` on a request's first report leaves out tokens a connector loaded in
        the same step, so the step starts at the larger of it and what is already known valid. Tokens scheduled
        past the known tokens (speculative drafts, whose KV may be rejected) never count as valid.
        """
        position = non_negative_int("computed_position", computed_position)
        scheduled = non_negative_int("num_scheduled_tokens", num_scheduled_tokens)
        first = not self.tokens
        self.tokens += map(operator.index, new_tokens)
        self.state.block_ids += [non_negative_int("new_block_ids entry", b) for b in new_block_ids]
        if first and self.loaded:
            start = self.valid_tokens // self.block_size - len(self.loaded)
            mine = tuple(self.state.block_ids[start:start + len(self.loaded)])
            if mine != self.loaded:  # the loaded KV would sit in the wrong blocks: fail loudly
                raise RuntimeError(f"request {self.state.request_id}: blocks were loaded into cache blocks "
                                   f"{list(self.loaded)} but the engine reports blocks {list(mine)} at those positions")
        self.valid_tokens = min(max(self.valid_tokens, position) + scheduled, len(self.tokens))
