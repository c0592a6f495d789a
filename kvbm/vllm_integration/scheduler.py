"""Scheduler side of the vLLM connector: vLLM's scheduler calls adapted to the shared `ConnectorLeader`. Matches
load asynchronously (WAITING_FOR_REMOTE_KVS until ``finished_recving``); each step stores the newly completed full
blocks whose tokens are all known (with async scheduling the last sampled token may not be yet: its block is
stored a step later); a finished request's blocks are held while a store of it is unreported. Multimodal and
prompt-embedding requests are neither matched nor stored: their token ids do not identify their KV. A hybrid model
(several KV cache groups) keeps every group's block ids and stores each group's full blocks at its own block size;
its hits are whole units of every group's blocks (`ConnectorLeader.unit`); the blocks the engine frees below a
sliding window, or below the state block of a request's last computed token in a state group, are neither stored
nor loaded (its null block stands there, as it does between a state group's chunk ends), and a store still reading
one when the engine frees it (during the request, or as it finishes) is finished first, as for a preemption. A
model whose KV the connector refuses (``refusal``) has no request matched or stored. Each step's plan says
how many of its tokens are prompt tokens, so that a prefill-dominated step is timed by the workers for the cost
rule's prefill rate (`kvbm.connectors.prefill`).

Disaggregated serving (`kvbm.connectors.pd`): on a producer, a request finished with ``do_remote_decode`` in its
``kv_transfer_params`` gets its prompt blocks pinned in G2 and their whereabouts as its returned params; on a
consumer, a request whose params carry ``do_remote_prefill`` loads those blocks from the producer's G2 over NIXL
(an asynchronous external hit; blocks that fail are recomputed)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm.v1.request import RequestStatus

from kvbm.connectors.groups import FULL, KVGroup
from kvbm.connectors.leader import ConnectorLeader, TrackedRequest
from kvbm.connectors.pd import RemotePrefill, wants_remote_decode
from kvbm.hashing import salt_hash
from kvbm.vllm_integration.metadata import DynamoConnectorMetadata, DynamoWorkerMetadata

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["SchedulerSide"]

log = logging.getLogger(__name__)

#: The block id of vLLM's null block (the block pool's first), which a block table holds where it keeps nothing.
NULL_BLOCK_ID = 0


class SchedulerSide:
    """The connector's scheduler role for one engine (see the module docstring)."""

    def __init__(self, leader: ConnectorLeader, *, producer: bool = False, consumer: bool = False) -> None:
        """``producer``: keep finished requests' blocks for decode instances; ``consumer``: load remote prefills."""
        self.leader = leader
        self.producer, self.consumer = producer, consumer
        self.refusal: str | None = None
        self._requests: dict[str, Request] = {}
        self._held: list[str] = []
        self._remote_hits: dict[str, int] = {}  # request id -> tokens planned from another instance
        self._flush: set[str] = set()  # finished requests whose stores read window blocks vLLM freed

    def configure(self, groups: Sequence[KVGroup], refusal: str | None) -> None:
        """A hybrid model's KV cache groups (more than one), and why this model's KV is not offloaded (every request
        then left alone), or None."""
        if len(groups) > 1:
            self.leader.use_groups(groups)
        self.refusal = refusal

    def _state(self, request: Request) -> TrackedRequest:
        state = self.leader.requests.get(request.request_id)
        if state is None:
            self._requests[request.request_id] = request
            reason = ("multimodal inputs" if request.mm_features else "prompt embeddings"
                      if getattr(request, "prompt_embeds", None) is not None else None)  # tokens do not name the KV
            if reason is not None:
                log.info("kvbm: request %s has %s: its KV is neither offloaded nor matched", request.request_id, reason)
            reason = reason or self.refusal
            lora = request.lora_request.lora_name if request.lora_request is not None else None
            state = self.leader.track(request.request_id, salt_hash(request.cache_salt, lora), reason)
        return state

    def on_new_request(self, request: Request) -> None:
        """Start tracking a request as vLLM adds it."""
        self._state(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens stored beyond vLLM's hit: ``(n, True)`` (an asynchronous load), ``(n, False)`` (loaded layer by
        layer beside this step's forward) or ``(0, False)``."""
        state = self._state(request)
        remote = self._remote_prefill(request)
        if remote is not None:
            n = self.leader.match_remote(state, request.prompt_token_ids, num_computed_tokens, remote)
            if n:
                return n, True
            request.kv_transfer_params["do_remote_prefill"] = False  # nothing to load: computed or cached here
            self.leader.release_remote(remote.source)
        n = self.leader.match(state, request.all_token_ids, num_computed_tokens, request.num_preemptions)
        return (n, not state.layerwise) if n else (0, False)

    def _remote_prefill(self, request: Request) -> RemotePrefill | None:
        """The prefill another instance did for ``request`` (consumer only); malformed params are logged and the
        request is computed here."""
        params = getattr(request, "kv_transfer_params", None)
        if not self.consumer or not params or not params.get("do_remote_prefill"):
            return None
        try:
            return RemotePrefill.from_params(params)
        except ValueError as e:
            log.error("kvbm: request %s: %s; computing its prompt here", request.request_id, e)
            params["do_remote_prefill"] = False
            return None

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Plan the load of ``num_external_tokens`` into the blocks after vLLM's hit."""
        state = self._state(request)
        remote = state.remote
        if num_external_tokens > 0:
            num_blocks = -(-num_external_tokens // self.leader.unit)  # (units of every group's blocks if hybrid)
            if self.leader.hybrid:
                self.leader.plan_matched_group_loads(state, blocks.get_block_ids(), num_blocks, NULL_BLOCK_ID)
            else:
                self.leader.plan_matched_load(state, blocks.get_block_ids()[0], num_blocks)
            if remote is not None:
                self._remote_hits[request.request_id] = num_external_tokens
        elif remote is not None:  # matched but not loaded: the holder may unpin
            self.leader.release_remote(remote.source)
        state.remote = None
        params = getattr(request, "kv_transfer_params", None)
        if params and params.get("do_remote_prefill"):
            params["do_remote_prefill"] = False  # loaded once; recomputed if that fails

    def hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        """The ``num_external_tokens`` planned for loading, by source: G2 (HOST) and G3 (DISK), and another
        instance's G2 (P2P: a P/D prefill, or the shared G4 tier)."""
        remote = self._remote_hits.get(request.request_id)
        if remote is not None:
            return {CacheHitSource.P2P: remote} if remote else {}
        state, n = self._state(request), max(num_external_tokens, 0)
        p2p = self.leader.g4_tokens(state, n)
        host, disk = self.leader.hit_split(state, n - p2p)
        return {source: k for source, k in ((CacheHitSource.HOST, host), (CacheHitSource.DISK, disk),
                                            (CacheHitSource.P2P, p2p)) if k}

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> DynamoConnectorMetadata:
        """This step's plan (and reset the per-step queues); a step whose tokens are mostly prompt tokens is timed
        by the workers for the cost rule's prefill rate."""
        so, preempted = scheduler_output, frozenset(scheduler_output.preempted_req_ids or ())
        for request_id in preempted:
            state = self.leader.requests.get(request_id)
            if state is not None:
                self._set_blocks(state, None)
        scheduled, flush = so.num_scheduled_tokens, set()
        prompt_tokens = 0
        for new in so.scheduled_new_reqs:
            prompt_tokens += self._prompt_tokens(new.req_id, new.num_computed_tokens, scheduled[new.req_id])
            state = self.leader.requests.get(new.req_id)
            if state is not None:
                self._set_blocks(state, new.block_ids)
                if self._store_new_blocks(state, new.num_computed_tokens, scheduled[new.req_id]):
                    flush.add(new.req_id)
        cached = so.scheduled_cached_reqs
        for i, request_id in enumerate(cached.req_ids):
            prompt_tokens += self._prompt_tokens(request_id, cached.num_computed_tokens[i], scheduled[request_id])
            state = self.leader.requests.get(request_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if request_id in cached.resumed_req_ids:
                self._set_blocks(state, new_blocks)
            elif new_blocks is not None:
                for group in self.leader.groups:
                    self.leader.group_state(state, group.index).block_ids.extend(new_blocks[group.index])
            if self._store_new_blocks(state, cached.num_computed_tokens[i], scheduled[request_id]):
                flush.add(request_id)
        held, self._held = self._held, []  # requests finished since the last step, held until finished_sending
        flush, self._flush = flush | self._flush, set()
        return DynamoConnectorMetadata(self.leader.take_step(preempted | flush, held, prompt_tokens=prompt_tokens,
                                                             step_tokens=so.total_num_scheduled_tokens))

    def _prompt_tokens(self, request_id: str, computed_tokens: int, scheduled_tokens: int) -> int:
        """Of the ``scheduled_tokens`` a request computes after its first ``computed_tokens``, those at prompt
        positions (its prefill; 0 for a request not tracked)."""
        request = self._requests.get(request_id)
        if request is None:
            return 0
        return max(min(computed_tokens + scheduled_tokens, request.num_prompt_tokens) - computed_tokens, 0)

    def _set_blocks(self, state: TrackedRequest, block_ids: tuple[list[int], ...] | None) -> None:
        """A request's block table, per group, anew (empty for None); nothing of it stored yet."""
        for group in self.leader.groups:
            track = self.leader.group_state(state, group.index)
            track.block_ids, track.saved = list(block_ids[group.index]) if block_ids is not None else [], 0

    def _store_new_blocks(self, state: TrackedRequest, computed_tokens: int, scheduled_tokens: int) -> bool:
        """Plan stores of the request's full blocks that are computed after this step and whose tokens are all
        known; True when a store still unreported reads a sliding-window block the engine may have freed in this
        step (below the window, or the state block, of the ``computed_tokens`` computed before it): the worker
        finishes those first."""
        request = self._requests.get(state.request_id)
        if request is None:
            return False
        num_tokens = min(computed_tokens + scheduled_tokens, request.num_tokens)
        flush = False
        for group in self.leader.groups:
            keep_from = group.first_kept_block(computed_tokens)
            if group.kind != FULL:
                flush |= self.leader.stores_below(state, group.index, keep_from)
            self.leader.plan_stores(state, request.all_token_ids, num_tokens // group.block_size, group=group.index,
                                    keep_from=keep_from, null_block=NULL_BLOCK_ID if self.leader.hybrid else None)
        return flush

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Take the workers' move results and finished loads."""
        report = connector_output.kv_connector_worker_meta
        if isinstance(report, DynamoWorkerMetadata):
            self.leader.apply(report.report)
        for request_id in connector_output.finished_recving or ():
            state = self.leader.requests.get(request_id)
            if state is not None:  # a request whose load failed looks up afresh when re-admitted
                state.loading, state.match_key = False, None

    def request_finished(self, request: Request, block_ids: list[int] | tuple[list[int], ...]
                         ) -> tuple[bool, dict[str, Any] | None]:
        """Store the request's remaining full blocks (``block_ids``: of its one group, or a tuple of every group's);
        True (blocks held until ``finished_sending``) while any store move of the request is unreported."""
        self._requests.pop(request.request_id, None)
        self._remote_hits.pop(request.request_id, None)
        state = self.leader.requests.get(request.request_id)
        if state is not None and state.remote is not None:  # matched, never allocated: the holder may unpin
            self.leader.release_remote(state.remote.source)
            state.remote = None
        if state is None or state.loading:
            self.leader.forget(request.request_id)
            return False, None
        per_group = block_ids if isinstance(block_ids, tuple) else (block_ids,)
        num_tokens = min(request.num_computed_tokens, request.num_tokens)
        for group in self.leader.groups:
            ids = self.leader.group_state(state, group.index).block_ids = list(per_group[group.index])
            if group.kind != FULL:  # vLLM freed the window or state blocks below the first real one just now
                kept = next((i for i, b in enumerate(ids) if b != NULL_BLOCK_ID), len(ids))
                if self.leader.stores_below(state, group.index, kept):
                    self._flush.add(request.request_id)
            self.leader.plan_stores(state, request.all_token_ids, num_tokens // group.block_size, group=group.index,
                                    null_block=NULL_BLOCK_ID if self.leader.hybrid else None)
        params = None
        if (self.producer and wants_remote_decode(getattr(request, "kv_transfer_params", None))
                and request.status == RequestStatus.FINISHED_LENGTH_CAPPED):
            kept = self.leader.keep_for_remote(state, request.prompt_token_ids)
            params = kept.to_params() if kept is not None else None
        busy = self.leader.busy(request.request_id)
        self.leader.forget(request.request_id)
        if busy:
            self._held.append(request.request_id)
        return busy, params
