"""Scheduler side of the vLLM connector: prefix matching, load and save planning, holding finished requests.

Per request it keeps the KVBM sequence hashes of the full blocks (extended as tokens become known, salted by the
cache salt and the LoRA name), the GPU block table (from the scheduler outputs), how many leading full blocks
were already handed to the worker for saving, and how many save jobs the worker has not confirmed yet.

- ``get_num_new_matched_tokens``: the manager's longest stored run of blocks right after vLLM's own
  (block-aligned) hit, in whole blocks, loaded asynchronously. One manager lookup per admission attempt (its
  hit counts feed the disk admission filter); a retry of the same attempt reuses the answer, and a stale answer
  fails the load, which vLLM recomputes.
- ``update_state_after_alloc``: the load job, into the blocks right after the local hit.
- ``build_connector_meta``: the step's loads, the newly completed full blocks of every scheduled request whose
  tokens are all known (with async scheduling the last sampled token may not be yet; its block is saved a step
  later), preempted requests, and finished requests held.
- ``request_finished``: saves the full blocks not saved yet; holds the blocks (True) while any save job of the
  request is unconfirmed. A request aborted while its load is in flight is released by vLLM on
  ``finished_recving``, so it is never held.

Multimodal and prompt-embedding requests are neither matched nor saved: their token ids do not identify their KV.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kvbm.hashing import salt_hash, sequence_hashes
from kvbm.vllm_integration import registry
from kvbm.vllm_integration.metadata import BlockJob, DynamoConnectorMetadata, DynamoWorkerMetadata

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


class _RequestState:
    """What the scheduler side tracks for one live request."""

    __slots__ = ("request", "salt", "hashes", "block_ids", "saved", "in_flight", "loading", "skip",
                 "local_tokens", "match_key", "matched_blocks", "host_blocks")

    def __init__(self, request: Request, skip: bool) -> None:
        self.request = request
        self.skip = skip
        lora = request.lora_request.lora_name if request.lora_request is not None else None
        self.salt = 0 if skip else salt_hash(request.cache_salt, lora)
        self.hashes: list[int] = []
        self.block_ids: list[int] = []
        self.saved = 0  # leading full blocks handed to the worker for saving
        self.in_flight = 0  # save jobs not yet confirmed by the worker
        self.loading = False
        self.local_tokens = 0  # vLLM's own hit when the load was planned
        self.match_key: tuple[int, int] | None = None  # (num_preemptions, vLLM's hit in blocks) of the lookup
        self.matched_blocks = 0  # vLLM's hit plus the manager's match, in blocks
        self.host_blocks = 0  # vLLM's hit plus the match's G2 part (the rest of the match is in G3)

    def hashes_upto(self, num_blocks: int, block_size: int) -> list[int]:
        """Sequence hashes of the first ``num_blocks`` full blocks (hashing only the new ones)."""
        have = len(self.hashes)
        if num_blocks > have:
            tokens = self.request.all_token_ids[have * block_size:num_blocks * block_size]
            parent = self.hashes[-1] if self.hashes else None
            self.hashes.extend(sequence_hashes(tokens, block_size, self.salt, parent_hash=parent))
        return self.hashes


class SchedulerSide:
    """The connector's scheduler role for one engine (see the module docstring)."""

    def __init__(self, engine_id: str, block_size: int) -> None:
        """``engine_id`` finds the worker side's manager in :mod:`kvbm.vllm_integration.registry`."""
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.engine_id = engine_id
        self.block_size = block_size
        self._states: dict[str, _RequestState] = {}
        self._loads: list[BlockJob] = []
        self._final_saves: list[BlockJob] = []
        self._held: list[str] = []
        self._warned_no_manager = False

    # -- requests ----------------------------------------------------------------------------------------------

    def _state(self, request: Request) -> _RequestState:
        state = self._states.get(request.request_id)
        if state is None:
            reason = untracked_reason(request)
            if reason is not None:
                log.info("kvbm: request %s has %s: its KV is neither offloaded nor matched", request.request_id,
                         reason)
            state = _RequestState(request, skip=reason is not None)
            self._states[request.request_id] = state
        return state

    def on_new_request(self, request: Request) -> None:
        """Start tracking a request as vLLM adds it."""
        self._state(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens the manager can load beyond vLLM's ``num_computed_tokens``: ``(n, True)`` or ``(0, False)``.

        The lookup starts at the first block vLLM does not hold (sequence hashes name whole prefixes), so blocks
        that stay hot on the GPU, and may have left G2, do not cut the match short.
        """
        state = self._state(request)
        if state.skip:
            return 0, False
        num_tokens = request.num_tokens
        full_blocks = num_tokens // self.block_size
        local_blocks = num_computed_tokens // self.block_size
        if full_blocks <= local_blocks:
            return 0, False
        key = (request.num_preemptions, local_blocks)
        if state.match_key != key:
            entry = registry.lookup(self.engine_id)
            if entry is None:
                if not self._warned_no_manager:
                    log.warning("kvbm: no block manager registered for engine %s (the worker side registers it "
                                "in register_kv_caches; a worker in another process is not supported): no "
                                "external prefix hits", self.engine_id)
                    self._warned_no_manager = True
                return 0, False
            hashes = state.hashes_upto(full_blocks, self.block_size)[local_blocks:]
            with entry.lock:
                match = entry.manager.lookup(hashes, num_tokens=num_tokens - local_blocks * self.block_size)
            state.match_key = key
            state.matched_blocks = local_blocks + match.num_blocks
            state.host_blocks = local_blocks + match.host_hits
        matched = state.matched_blocks * self.block_size
        if matched <= num_computed_tokens:
            return 0, False
        state.local_tokens = num_computed_tokens
        return matched - num_computed_tokens, True

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Plan the load of ``num_external_tokens`` into the blocks after the local hit (``blocks`` holds all the
        request's blocks)."""
        if num_external_tokens <= 0:
            return
        state = self._state(request)
        first = state.local_tokens // self.block_size
        count = -(-num_external_tokens // self.block_size)
        block_ids = blocks.get_block_ids()[0]
        if first + count > min(len(block_ids), state.matched_blocks):
            raise ValueError(f"request {request.request_id}: {num_external_tokens} external tokens after "
                             f"{state.local_tokens} local ones need {first + count} blocks; {len(block_ids)} "
                             f"allocated, {state.matched_blocks} matched")
        hashes = state.hashes[first:first + count]
        self._loads.append(BlockJob(request.request_id, hashes, block_ids[first:first + count]))
        state.loading = True

    def hit_tiers(self, request: Request, num_external_tokens: int) -> tuple[int, int]:
        """``(G2 tokens, G3 tokens)`` of the ``num_external_tokens`` planned for loading (after
        ``update_state_after_alloc``)."""
        state = self._states.get(request.request_id)
        if state is None:
            raise ValueError(f"request {request.request_id} is not tracked")
        host = min(max(state.host_blocks * self.block_size - state.local_tokens, 0), num_external_tokens)
        return host, num_external_tokens - host

    # -- per step ----------------------------------------------------------------------------------------------

    def _save_new_blocks(self, state: _RequestState, computed_tokens: int, saves: list[BlockJob]) -> None:
        """Queue the request's full blocks that are computed and whose tokens are all known, not saved yet."""
        if state.skip:
            return
        num_blocks = min(computed_tokens, state.request.num_tokens, len(state.block_ids) * self.block_size)
        num_blocks //= self.block_size
        if num_blocks <= state.saved:
            return
        hashes = state.hashes_upto(num_blocks, self.block_size)
        saves.append(BlockJob(state.request.request_id, hashes[state.saved:num_blocks],
                              state.block_ids[state.saved:num_blocks]))
        state.saved = num_blocks
        state.in_flight += 1

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> DynamoConnectorMetadata:
        """This step's loads, saves, preemptions and held requests (and reset the per-step queues)."""
        so = scheduler_output
        preempted = frozenset(so.preempted_req_ids or ())
        for request_id in preempted:
            state = self._states.get(request_id)
            if state is not None:
                state.block_ids = []
                state.saved = 0
        saves, self._final_saves = self._final_saves, []
        scheduled = so.num_scheduled_tokens
        for new in so.scheduled_new_reqs:
            state = self._states.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            state.saved = 0
            self._save_new_blocks(state, new.num_computed_tokens + scheduled[new.req_id], saves)
        cached = so.scheduled_cached_reqs
        resumed = cached.resumed_req_ids
        for i, request_id in enumerate(cached.req_ids):
            state = self._states.get(request_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if request_id in resumed:
                state.block_ids = list(new_blocks[0]) if new_blocks is not None else []
                state.saved = 0
            elif new_blocks is not None:
                state.block_ids.extend(new_blocks[0])
            self._save_new_blocks(state, cached.num_computed_tokens[i] + scheduled[request_id], saves)
        loads, self._loads = self._loads, []
        held, self._held = self._held, []
        return DynamoConnectorMetadata(loads=loads, saves=saves, preempted=preempted, held=held)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Take the worker's finished loads and confirmed save jobs."""
        for request_id in connector_output.finished_recving or ():
            state = self._states.get(request_id)
            if state is not None:
                state.loading = False
                state.match_key = None  # a request whose load failed looks up afresh when re-admitted
        report = connector_output.kv_connector_worker_meta
        if isinstance(report, DynamoWorkerMetadata):
            for request_id, count in report.saves_done.items():
                state = self._states.get(request_id)
                if state is not None:
                    state.in_flight -= count

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Save the request's remaining full blocks; True (blocks held until ``finished_sending``) while any of
        its save jobs is unconfirmed."""
        state = self._states.pop(request.request_id, None)
        if state is None or state.loading:
            return False, None
        if not state.skip:
            num_blocks = min(request.num_computed_tokens, request.num_tokens, len(block_ids) * self.block_size)
            num_blocks //= self.block_size
            if num_blocks > state.saved:
                hashes = state.hashes_upto(num_blocks, self.block_size)
                self._final_saves.append(BlockJob(request.request_id, hashes[state.saved:num_blocks],
                                                  list(block_ids[state.saved:num_blocks])))
                state.in_flight += 1
        if state.in_flight > 0:
            self._held.append(request.request_id)
            return True, None
        return False, None

    def num_tracked_requests(self) -> int:
        """Live requests tracked (tests check that finished ones are forgotten)."""
        return len(self._states)
