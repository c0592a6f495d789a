"""What the TensorRT-LLM leader sends its worker each step (``ConnectorMetadata``: the step's `StepPlan`), and
its view of one request's progress through the executor's reports (``RequestProgress``). Plain data."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Sequence

from kvbm.connectors.leader import TrackedRequest
from kvbm.connectors.messages import StepPlan
from kvbm.tiers import TierSpec

__all__ = ["ConnectorMetadata", "RequestProgress", "non_negative_int"]


@dataclass(frozen=True)
class ConnectorMetadata:
    """One step's plan: loads start in ``start_load_kv``, stores after the forward pass, cascades any time. With
    more than one rank also: ``channel``, where ranks other than 0 send their registration and reports
    (`kvbm.trtllm_integration.rank_channel`); ``tiers``, once every rank registered (each rank allocates them, of
    its own block size, before running a plan); ``loads_done``, the loads every rank has reported since the last
    step, by request: why blocks failed (on any rank), empty when every block loaded everywhere."""

    step: int
    plan: StepPlan = field(default_factory=StepPlan)
    channel: bytes | None = None
    tiers: tuple[TierSpec, ...] = ()
    loads_done: dict[str, tuple[str, ...]] = field(default_factory=dict)


def non_negative_int(name: str, value: object) -> int:
    """``value`` as an int >= 0, or a TypeError / ValueError naming ``name`` and the value."""
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {out}")
    return out


@dataclass
class RequestProgress:
    """One request's tokens, engine block ids (in the shared `TrackedRequest`) and ``valid_tokens``: those whose KV
    is valid once the step being planned has run (from the engine's match plus the blocks loaded into ``loaded``)."""

    state: TrackedRequest
    block_size: int
    valid_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    loaded: tuple[int, ...] = ()  #: engine blocks a load was planned into, checked against the first report

    def report(self, new_tokens: Sequence[int], new_block_ids: Sequence[int], computed_position: int,
               num_scheduled_tokens: int) -> None:
        """Take one step's ``RequestData``. Its ``computed_position`` leaves out tokens loaded in the same step (the
        step starts at the larger of it and ``valid_tokens``); drafts scheduled past the known tokens never count."""
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
