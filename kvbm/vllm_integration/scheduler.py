"""Scheduler side of the vLLM connector: vLLM's calls adapted to the shared `ConnectorLeader`.

- ``get_num_new_matched_tokens``: the leader's longest stored run of blocks right after vLLM's own
  (block-aligned) hit, in whole blocks, loaded asynchronously. One index lookup per admission attempt (its hits
  feed the disk admission filter); a retry of the same attempt reuses the answer.
- ``update_state_after_alloc``: plans the load (moves that hold their slots) into the blocks after the local hit;
  blocks gone since the lookup are reported as load errors, and vLLM recomputes them.
- ``build_connector_meta``: the step's plan: loads, stores of the newly completed full blocks of every scheduled
  request whose tokens are all known (with async scheduling the last sampled token may not be yet; its block is
  stored a step later), cascades, preempted requests, held requests.
- ``update_connector_output``: the workers' move results (commit, release, drop in the index).
- ``request_finished``: stores the full blocks not stored yet; holds the blocks (True) while any store move of the
  request is unreported. A request aborted while its load is in flight is released by vLLM on
  ``finished_recving``, so it is never held.

Multimodal and prompt-embedding requests are neither matched nor stored: their token ids do not identify their KV.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbm.connectors.leader import ConnectorLeader, TrackedRequest
from kvbm.hashing import salt_hash
from kvbm.vllm_integration.metadata import DynamoConnectorMetadata, DynamoWorkerMetadata

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["SchedulerSide", "untracked_reason"]

log = logging.getLogger(__name__)


def untracked_reason(request: Request) -> str | None:
    """Why ``request``'s KV cannot be keyed by its token ids (multimodal inputs, prompt embeddings), or None."""
    if request.mm_features:
        return "multimodal inputs"
    if getattr(request, "prompt_embeds", None) is not None:
        return "prompt embeddings"
    return None


@dataclass
class _Match:
    """The answer of one admission attempt: (num_preemptions, vLLM's hit in blocks) it was for, blocks matched
    including vLLM's hit, of which in G2, and vLLM's hit in tokens when the load was planned."""

    key: tuple[int, int]
    matched_blocks: int
    host_blocks: int
    local_tokens: int = 0


class SchedulerSide:
    """The connector's scheduler role for one engine (see the module docstring)."""

    def __init__(self, leader: ConnectorLeader) -> None:
        self.leader = leader
        self.block_size = leader.block_size
        self._matches: dict[str, _Match] = {}
        self._requests: dict[str, Request] = {}
        self._held: list[str] = []

    def _state(self, request: Request) -> TrackedRequest:
        state = self.leader.requests.get(request.request_id)
        if state is None:
            self._requests[request.request_id] = request
            reason = untracked_reason(request)
            if reason is not None:
                log.info("kvbm: request %s has %s: its KV is neither offloaded nor matched", request.request_id,
                         reason)
                salt = 0
            else:
                lora = request.lora_request.lora_name if request.lora_request is not None else None
                salt = salt_hash(request.cache_salt, lora)
            state = self.leader.track(request.request_id, salt, reason)
        return state

    def on_new_request(self, request: Request) -> None:
        """Start tracking a request as vLLM adds it."""
        self._state(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens stored beyond vLLM's ``num_computed_tokens``: ``(n, True)`` or ``(0, False)``.

        The lookup starts at the first block vLLM does not hold (sequence hashes name whole prefixes), so blocks
        that stay hot on the GPU, and may have left G2, do not cut the match short.
        """
        state = self._state(request)
        if state.skip is not None:
            return 0, False
        num_tokens = request.num_tokens
        full_blocks = num_tokens // self.block_size
        local_blocks = num_computed_tokens // self.block_size
        if full_blocks <= local_blocks:
            return 0, False
        key = (request.num_preemptions, local_blocks)
        match = self._matches.get(request.request_id)
        if match is None or match.key != key:
            hashes = state.hashes_upto(full_blocks, self.block_size, request.all_token_ids)[local_blocks:]
            whole = num_tokens <= full_blocks * self.block_size
            found, host = self.leader.lookup(hashes, whole_prompt=whole)
            match = self._matches[request.request_id] = _Match(key, local_blocks + found, local_blocks + host)
        matched = match.matched_blocks * self.block_size
        if matched <= num_computed_tokens:
            return 0, False
        match.local_tokens = num_computed_tokens
        return matched - num_computed_tokens, True

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Plan the load of ``num_external_tokens`` into the blocks after the local hit (``blocks`` holds all the
        request's blocks)."""
        if num_external_tokens <= 0:
            return
        state = self._state(request)
        match = self._matches[request.request_id]
        first = match.local_tokens // self.block_size
        count = -(-num_external_tokens // self.block_size)
        block_ids = blocks.get_block_ids()[0]
        if first + count > min(len(block_ids), match.matched_blocks):
            raise ValueError(f"request {request.request_id}: {num_external_tokens} external tokens after "
                             f"{match.local_tokens} local ones need {first + count} blocks; {len(block_ids)} "
                             f"allocated, {match.matched_blocks} matched")
        self.leader.plan_load(request.request_id, state.hashes[first:first + count], block_ids[first:first + count])
        state.loading = True

    def hit_tiers(self, request: Request, num_external_tokens: int) -> tuple[int, int]:
        """``(G2 tokens, G3 tokens)`` of the ``num_external_tokens`` planned for loading."""
        match = self._matches.get(request.request_id)
        if match is None:
            raise ValueError(f"request {request.request_id} has no planned load")
        host = min(max(match.host_blocks * self.block_size - match.local_tokens, 0), num_external_tokens)
        return host, num_external_tokens - host

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> DynamoConnectorMetadata:
        """This step's plan (and reset the per-step queues)."""
        so = scheduler_output
        preempted = frozenset(so.preempted_req_ids or ())
        for request_id in preempted:
            state = self.leader.requests.get(request_id)
            if state is not None:
                state.block_ids, state.saved = [], 0
        scheduled = so.num_scheduled_tokens
        for new in so.scheduled_new_reqs:
            state = self.leader.requests.get(new.req_id)
            if state is not None:
                state.block_ids, state.saved = list(new.block_ids[0]), 0
                self._store_new_blocks(state, new.num_computed_tokens + scheduled[new.req_id])
        cached = so.scheduled_cached_reqs
        for i, request_id in enumerate(cached.req_ids):
            state = self.leader.requests.get(request_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if request_id in cached.resumed_req_ids:
                state.block_ids, state.saved = list(new_blocks[0]) if new_blocks is not None else [], 0
            elif new_blocks is not None:
                state.block_ids.extend(new_blocks[0])
            self._store_new_blocks(state, cached.num_computed_tokens[i] + scheduled[request_id])
        held, self._held = self._held, []
        return DynamoConnectorMetadata(self.leader.take_step(preempted, held))

    def _store_new_blocks(self, state: TrackedRequest, computed_tokens: int) -> None:
        """Plan stores of the request's full blocks that are computed and whose tokens are all known."""
        request = self._requests.get(state.request_id)
        if request is not None:
            num_blocks = min(computed_tokens, request.num_tokens) // self.block_size
            self.leader.plan_stores(state, request.all_token_ids, num_blocks)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Take the workers' move results and finished loads."""
        report = connector_output.kv_connector_worker_meta
        if isinstance(report, DynamoWorkerMetadata):
            self.leader.apply(report.report)
        for request_id in connector_output.finished_recving or ():
            state = self.leader.requests.get(request_id)
            if state is not None:
                state.loading = False
            self._matches.pop(request_id, None)  # a request whose load failed looks up afresh when re-admitted

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Store the request's remaining full blocks; True (blocks held until ``finished_sending``) while any
        store move of the request is unreported."""
        self._matches.pop(request.request_id, None)
        self._requests.pop(request.request_id, None)
        state = self.leader.requests.get(request.request_id)
        if state is None or state.loading:
            self.leader.forget(request.request_id)
            return False, None
        state.block_ids = list(block_ids)
        num_blocks = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        self.leader.plan_stores(state, request.all_token_ids, num_blocks)
        busy = self.leader.busy(request.request_id)
        self.leader.forget(request.request_id)
        if busy:
            self._held.append(request.request_id)
        return busy, None

    def num_tracked_requests(self) -> int:
        """Live requests tracked (tests check that finished ones are forgotten)."""
        return len(self.leader.requests)
