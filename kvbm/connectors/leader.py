"""The engine-independent scheduler side of a connector: per-request tracking over the leader's block index.

Both engine connectors (vLLM, TensorRT-LLM) keep the same per-request state here: the KVBM sequence hashes of the
request's full blocks (extended as tokens become known), its engine block ids, how many leading full blocks were
handed out for storing, and which of its store moves the workers have not reported yet. The connector adapts
its engine's calls to `lookup`, `plan_load`, `plan_stores`, `take_step` and `apply`; plans leave as a
`StepPlan` and results come back as `WorkerReport`s. A move completes once every worker reported it
(``num_workers``), a block failing on any rank failing for all. With ``worker_init_timeout_s`` nothing is planned
before every rank registered (`kvbm.connectors.registration`). The steps' timings the workers report feed the cost
rule's prefill rate (`kvbm.connectors.prefill`). A hybrid model's KV cache groups (`KVGroup`) are tracked side by
side in one index: each group has its own hashes (at its own block size) and block ids (`TrackedRequest.groups`), a
hit is one that every group can restore and ends on a multiple of every group's block size (``unit``: vLLM's
scheduler block size), and a group's moves name its engine tier.

Disaggregated serving (`kvbm.connectors.pd`): a prefill instance pins a finished request's G2 blocks for a reader
(`keep_for_remote`, with ``endpoints`` from its workers); a decode instance matches a request's `RemotePrefill`
(`match_remote`) and loads it from the other instance's G2 (a move from ``REMOTE_TIER``, outside the index).

Shared G4 tier (``DYN_KVBM_G4_ETCD_ENDPOINT``, `kvbm.connectors.directory`): the G2 pool's commits and evictions are
mirrored into the etcd hash directory (sent once per step, in `take_step`), and a lookup whose stored run stops
short looks up the blocks that follow in the local copy of the directory (`kvbm.connectors.directory_view`, kept
by an etcd watch: no network on the scheduler's thread; no G4 hits while the copy is out of sync). The cost rule
judges the local run and the G4 run after it together, G4 as the last tier with its own estimates (fed by the
completed G4 loads), so a G4 run is reported only where loading it is expected to beat recomputing it. Another
instance's run is loaded from its G2 like a P/D load (the holder's seal table turns a stale entry into a failed
block, recomputed). One G4 load per request: a request whose G4 load failed is recomputed, not looked up there
again. Only an instance whose workers export (``endpoints`` set: their G4 endpoints also load) looks up in G4;
hybrid models do not, and take no part in disaggregated serving (their prompts are computed on each instance).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from kvbm.config import KvbmConfig
from kvbm.connectors.directory import HashDirectory
from kvbm.connectors.directory_view import DirectoryHit, DirectoryView
from kvbm.connectors.groups import FULL, KVGroup, single_group
from kvbm.connectors.messages import RequestLoad, RequestStore, StepPlan, WorkerReport
from kvbm.connectors.pd import Pins, RemotePrefill
from kvbm.connectors.prefill import StepTimes, timed_tokens
from kvbm.connectors.registration import WorkerRegistry
from kvbm.hashing import sequence_hashes
from kvbm.kernels.medium import Medium
from kvbm.leader import ENGINE_TIER, BlockIndex, Match, Move, MoveKind, MoveResult
from kvbm.leader.plans import REMOTE_TIER, RemoteSource
from kvbm.metrics import KvbmMetrics
from kvbm.policies.admission import DiskAdmissionFilter
from kvbm.policies.cost import LoadCostPolicy
from kvbm.policies.store_backlog import StoreBacklog
from kvbm.tiers import HOST_TIER, TierSpec

__all__ = ["ConnectorLeader", "RankLayout", "TrackedRequest"]

log = logging.getLogger(__name__)


@dataclass
class TrackedRequest:
    """What the scheduler side keeps of one live request (``skip``: why its KV is not keyed by its tokens)."""

    request_id: str
    salt: int
    skip: str | None = None
    hashes: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    saved: int = 0  #: leading full blocks handed out for storing
    stores: set[int] = field(default_factory=set)  #: store move ids not yet reported by every worker
    groups: list[TrackedRequest] = field(default_factory=list)  #: a hybrid model's KV cache groups after the first
    store_first: dict[int, int] = field(default_factory=dict)  #: store move id -> the lowest block index it reads
    loading: bool = False
    match_key: object = None  #: the admission attempt the last lookup answered
    matched_blocks: int = 0  #: the engine's hit plus the stored run after it, in blocks
    host_blocks: int = 0  #: the engine's hit plus the stored run's G2 part, in blocks
    local_tokens: int = 0  #: the engine's own hit when the load was planned
    layerwise: bool = False  #: the matched run is loaded layer by layer beside the forward that reads it
    remote: RemotePrefill | None = None  #: the other instance's prefill the match comes from (decode side)
    g4: tuple[int, DirectoryHit] | None = None  #: (first block, run) of the match another instance holds (G4 tier)
    g4_tried: bool = False  #: a G4 load was planned for the request (a failed one is not retried)
    g4_from: int | None = None  #: the first matched block another instance holds (the last match's G4 part)

    def hashes_upto(self, num_blocks: int, block_size: int, tokens: Sequence[int]) -> list[int]:
        """Sequence hashes of the first ``num_blocks`` full blocks of ``tokens`` (hashing only new blocks)."""
        have = len(self.hashes)
        if num_blocks > have:
            parent = self.hashes[-1] if self.hashes else None
            self.hashes.extend(sequence_hashes(tokens[have * block_size:num_blocks * block_size], block_size,
                                               self.salt, parent_hash=parent))
        return self.hashes


@dataclass(frozen=True)
class RankLayout:
    """How an engine's KV splits over its worker ranks: ``tensor_parallel`` ranks share each pipeline stage's layers
    by heads; ``page_bytes`` is one layer of one block on one rank, ``stage_layers`` the layers of each stage (ranks
    are numbered stage-major). As in Dynamo KVBM, tier sizes in GB count a block's bytes summed over all ranks and
    every rank holds the same number of blocks, of its own size. ``replicas`` consecutive tensor-parallel ranks
    hold identical KV (MLA's latent cache: all of them); when all do, each stage's ranks share one host pool and
    one disk file (`shares_tiers`), sized by one copy."""

    tensor_parallel: int
    page_bytes: int
    stage_layers: tuple[int, ...]
    replicas: int = 1

    @property
    def shares_tiers(self) -> bool:
        """Whether each pipeline stage's ranks hold identical KV, stored once in tiers they share."""
        return self.tensor_parallel > 1 and self.replicas == self.tensor_parallel

    @property
    def stored_block_bytes(self) -> int:
        """One block's bytes as the tiers store it: one copy per stage when shared, else `total_block_bytes`."""
        return self.page_bytes * sum(self.stage_layers) if self.shares_tiers else self.total_block_bytes

    @property
    def world_size(self) -> int:
        """Worker ranks: the reports a move waits for (``ConnectorLeader(num_workers=...)``)."""
        return self.tensor_parallel * len(self.stage_layers)

    @property
    def total_block_bytes(self) -> int:
        """One block's bytes summed over all ranks (what the tier sizes in GB are divided by)."""
        return self.page_bytes * sum(self.stage_layers) * self.tensor_parallel

    def rank_block_bytes(self, rank: int) -> int:
        """One block's bytes on ``rank``."""
        return self.page_bytes * self.stage_layers[(rank // self.tensor_parallel) % len(self.stage_layers)]

    def check_rank(self, rank: int, block_bytes: int) -> None:
        """Raise if ``rank``'s engine blocks are not the size the tiers were sized for, naming both."""
        if block_bytes != self.rank_block_bytes(rank):
            raise ValueError(f"rank {rank} holds KV blocks of {block_bytes} bytes; the leader sized the tiers for "
                             f"{self.rank_block_bytes(rank)} bytes on this rank ({self.total_block_bytes} bytes over "
                             f"{self.world_size} ranks)")


class ConnectorLeader:
    """The block index, the requests it serves and the step's plan (see the module docstring)."""

    def __init__(self, tiers: Sequence[TierSpec], config: KvbmConfig, block_size: int, *, num_workers: int = 1,
                 metrics: KvbmMetrics | None = None, disk_filter: DiskAdmissionFilter | None = None,
                 cost: LoadCostPolicy | None = None, block_bytes: int | None = None, layerwise: bool = False,
                 worker_init_timeout_s: float | None = None) -> None:
        """``cost``: the cost-aware hit rule applied to every lookup and fed the loads' timings, over the tiers'
        names and, with the shared G4 tier configured, ``"G4"`` last; by default the ``DYN_KVBM_*`` rule for blocks
        of ``block_bytes`` (summed over ranks) when that is given, else none (every hit reported).
        ``layerwise``: the engine's workers can wait per layer, so a match held entirely in G2 is loaded layer by
        layer beside the forward that reads it (unless ``DYN_KVBM_DISABLE_LAYERWISE_ONBOARD``).
        ``worker_init_timeout_s``: no hit is reported and nothing stored until every one of the ``num_workers`` ranks
        registered (`register_workers`, or its first report), and a rank missing this many seconds after construction
        raises `kvbm.connectors.registration.WorkersMissingError` from the next call that plans; None: the workers
        are up already."""
        if not tiers:
            raise ValueError("no offload tier configured: set DYN_KVBM_CPU_CACHE_GB and/or DYN_KVBM_DISK_CACHE_GB "
                             "(or their *_OVERRIDE_NUM_BLOCKS)")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        admission = disk_filter if disk_filter is not None else DiskAdmissionFilter(
            enabled=not config.disable_disk_offload_filter)
        self.index = BlockIndex([t.index_config(admission if k else None) for k, t in enumerate(tiers)],
                                batch_size=config.max_transfer_batch_size,
                                min_priority=config.host_offload_prefix_min_priority)
        self.block_size = block_size
        #: tokens a hit is a multiple of: ``block_size``, or for a hybrid model every group's block size's lcm
        self.unit = block_size
        self.num_workers = num_workers
        self.layerwise = layerwise and not config.disable_layerwise_onboard
        self.cost_layer_groups = not config.disable_cost_layer_groups
        self.metrics = metrics
        self.requests: dict[str, TrackedRequest] = {}
        self._owner: dict[int, str] = {}  # store move id -> request id
        self._partial: dict[int, MoveResult] = {}  # results some workers reported
        self._loads: list[RequestLoad] = []
        self._stores: list[RequestStore] = []
        self._remote_moves: set[int] = set()  # open loads from other instances (not in the index)
        self._releases: list[Move] = []  # no-block moves telling other instances a prefill will not be read
        self.workers = WorkerRegistry(num_workers, worker_init_timeout_s) if worker_init_timeout_s is not None else None
        self._publish_workers()
        self._step = 0  # plans handed out
        self._step_times = StepTimes(num_workers)
        self.engine_id = ""  #: this instance's name in the P/D params it hands out
        self.endpoints: tuple[bytes, ...] | None = None  #: per rank, where other instances read this one's G2
        self.pins = Pins(self.index, tiers[0].name, readers=num_workers, timeout_s=config.pd_pin_timeout_secs)
        self.groups: tuple[KVGroup, ...] = single_group(block_size)
        self.hybrid = False
        self.directory: HashDirectory | None = None  #: what this instance publishes in the shared G4 tier (etcd)
        self.directory_view: DirectoryView | None = None  #: the local copy of the others' entries it looks up in
        cost_tiers = [t.name for t in tiers]
        if config.g4_etcd_endpoint:
            if tiers[0].name != HOST_TIER:
                raise ValueError("DYN_KVBM_G4_ETCD_ENDPOINT needs a G2 host tier (DYN_KVBM_CPU_CACHE_GB or "
                                 "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS): other instances read G2")
            cost_tiers.append(REMOTE_TIER)
        if cost is None and block_bytes is not None:
            cost = LoadCostPolicy.from_config(config, cost_tiers, block_bytes=block_bytes, block_tokens=block_size,
                                              metrics=metrics)
        if cost is not None and list(cost.tiers) != cost_tiers:
            raise ValueError(f"the cost rule covers tiers {list(cost.tiers)}; this leader looks up {cost_tiers}")
        self.cost = cost
        #: stores into a first tier on disk (disk-only mode) hold engine blocks while the disk writes: bounded to
        #: DYN_KVBM_MAX_STORE_BACKLOG_MS of its writes (host memory takes a store in milliseconds: no bound)
        self._store_tier = tiers[0].name  # where the engine's blocks are stored
        on_disk = tiers[0].medium is Medium.DISK
        self.backlog = StoreBacklog(config.max_store_backlog_ms / 1e3 if on_disk else 0.0,
                                    config.max_transfer_batch_size,
                                    keep_alive_seconds=cost.probe_seconds if cost is not None else 0.0)
        self._g4_loads: dict[int, int] = {}  # open loads of G4 hits: move id -> blocks (timed for the cost rule)
        if config.g4_etcd_endpoint:
            self.directory = HashDirectory(config.g4_etcd_endpoint, block_size=block_size,
                                           lease_s=config.g4_lease_secs)
            self.index.pool(HOST_TIER).watcher = self.directory
            self.directory_view = DirectoryView(config.g4_etcd_endpoint, block_size=block_size,
                                                instance=self.directory.instance, lease_s=config.g4_lease_secs,
                                                metrics=metrics)
            self.directory_view.start()

    def close(self) -> None:
        """Leave the shared G4 tier (when configured): this instance's directory entries are revoked and the watch
        of the other instances' entries stops."""
        if self.directory is not None:
            self.directory.close()
        if self.directory_view is not None:
            self.directory_view.close()

    def use_groups(self, groups: Sequence[KVGroup]) -> None:
        """Track a hybrid model's KV cache groups instead of one full-attention group; before any request is
        tracked. Groups may have blocks of different sizes; the first full-attention group's must be
        ``block_size`` (the lookup and the cost rule go by its blocks)."""
        if self.requests:
            raise RuntimeError("use_groups must come before any request is tracked")
        if not groups:
            raise ValueError("use_groups needs at least one group")
        for k, group in enumerate(groups):
            if group.index != k:
                raise ValueError(f"group {k}: expected index {k}, got {group}")
        lookup = next((g for g in groups if g.kind == FULL), None)
        if lookup is not None and lookup.block_size != self.block_size:
            raise ValueError(f"the first full-attention group has blocks of {lookup.block_size} tokens; this leader "
                             f"looks up blocks of {self.block_size}")
        self.groups, self.hybrid = tuple(groups), len(groups) > 1
        self.unit = math.lcm(*(g.block_size for g in groups))

    # -- requests ----------------------------------------------------------------------------------------------

    def track(self, request_id: str, salt: int, skip: str | None = None) -> TrackedRequest:
        """The state of ``request_id``, created on first sight."""
        state = self.requests.get(request_id)
        if state is None:
            state = self.requests[request_id] = TrackedRequest(request_id, self.groups[0].salt(salt, self.hybrid), skip)
            state.groups = [TrackedRequest(request_id, g.salt(salt, True), skip) for g in self.groups[1:]]
        return state

    @staticmethod
    def group_state(state: TrackedRequest, group: int) -> TrackedRequest:
        """The hashes, block ids and stored count of one KV cache group of a request (group 0 is ``state``)."""
        return state if group == 0 else state.groups[group - 1]

    def forget(self, request_id: str) -> TrackedRequest | None:
        """Stop tracking a request; its store moves still complete normally."""
        return self.requests.pop(request_id, None)

    def busy(self, request_id: str) -> bool:
        """Whether the request has store moves not yet reported by every worker."""
        state = self.requests.get(request_id)
        return state is not None and bool(state.stores)

    # -- workers -----------------------------------------------------------------------------------------------

    def register_workers(self, ranks: Iterable[int]) -> None:
        """Ranks whose tiers are allocated and that run plans (from the engine's start-up handshake, or their first
        report)."""
        if self.workers is not None:
            ranks = tuple(ranks)
            if ranks:
                self.workers.register(ranks)
                self._publish_workers()

    def _publish_workers(self) -> None:
        """The ranks expected and registered, to the metrics (all registered without a registry)."""
        if self.metrics is not None:
            missing = len(self.workers.missing) if self.workers is not None else 0
            self.metrics.set_workers(self.num_workers, self.num_workers - missing)

    def ready(self) -> bool:
        """Whether every worker rank registered (always, without a registry); raises
        `kvbm.connectors.registration.WorkersMissingError` once ranks are missing past the timeout."""
        return self.workers is None or self.workers.ready()

    # -- lookups and plans -------------------------------------------------------------------------------------

    def match(self, state: TrackedRequest, tokens: Sequence[int], num_computed_tokens: int, attempt: object = 0
              ) -> int:
        """Tokens stored right after the engine's (block-aligned) hit of ``num_computed_tokens``, in whole blocks.

        The lookup starts at the first block the engine lacks (sequence hashes name whole prefixes, so blocks hot
        in the engine, which may have left G2, do not cut the match short) and runs once per admission
        ``attempt`` and engine hit; a retry reuses the answer. Nothing matches before every worker registered.
        """
        if state.skip is not None or not self.ready() or (self.hybrid and num_computed_tokens % self.unit):
            return 0  # (a hybrid model's loads start on a unit: vLLM's hits are multiples of its scheduler block)
        full_blocks = len(tokens) // self.unit  # (in units for a hybrid model, else blocks)
        local_blocks = num_computed_tokens // self.unit
        if full_blocks <= local_blocks:
            return 0
        key = (attempt, local_blocks)
        if state.match_key != key:
            whole_prompt = len(tokens) == full_blocks * self.unit
            state.g4 = state.g4_from = None
            if self.hybrid:
                found, host = self._common_hit(state, tokens, local_blocks, full_blocks, whole_prompt)
            else:
                hashes = state.hashes_upto(full_blocks, self.block_size, tokens)[local_blocks:]
                g4 = self.directory_view is not None and self.endpoints is not None and not state.g4_tried
                found, host, hit = self._lookup(hashes, whole_prompt=whole_prompt, g4=g4)
                if hit is not None:
                    state.g4_from = local_blocks + found - len(hit.hashes)
                    state.g4 = (state.g4_from, hit)
            state.match_key, state.matched_blocks, state.host_blocks = key, local_blocks + found, local_blocks + host
            state.layerwise = self.layerwise and not self.hybrid and found > 0 and host == found
        state.local_tokens = num_computed_tokens
        return max(state.matched_blocks * self.unit - num_computed_tokens, 0)

    def _g4_lookup(self, hashes: Sequence[int]) -> DirectoryHit | None:
        """The leading run of ``hashes`` (the blocks right after the local tiers' run) that another instance holds,
        per the local copy of the directory, or None; nothing when the first of them is in a local tier (held, but
        out of the tiers' order, or still arriving)."""
        if not hashes or any(self.index.pool(t).find(hashes[0]) is not None for t in self.index.tier_names):
            return None
        t0 = time.perf_counter()
        hit = self.directory_view.lookup(hashes, self.num_workers)
        if self.metrics is not None:
            self.metrics.record_g4_lookup(len(hit.hashes) if hit is not None else 0, time.perf_counter() - t0)
        return hit

    def match_remote(self, state: TrackedRequest, tokens: Sequence[int], num_computed_tokens: int,
                     remote: RemotePrefill) -> int:
        """Tokens of another instance's prefill ``remote`` right after the engine's hit: the leading blocks whose
        hashes equal this instance's hashes of ``tokens`` (another prompt, salt or block size matches nothing; an
        instance with another number of ranks is not read: rank r reads rank r; nothing before every worker
        registered)."""
        if state.skip is not None or not self.ready():
            return 0
        if self.hybrid:
            log.warning("kvbm: request %s: loading another instance's prefill is not implemented for a hybrid model "
                        "(%d KV cache groups): computing the prompt here", state.request_id, len(self.groups))
            return 0
        if remote.block_size != self.block_size or len(remote.source.endpoints) != self.num_workers:
            log.warning("kvbm: request %s: the prefill instance %s has blocks of %d tokens over %d rank(s), this one "
                        "%d tokens over %d: computing the prompt here", state.request_id, remote.source.engine_id,
                        remote.block_size, len(remote.source.endpoints), self.block_size, self.num_workers)
            return 0
        full_blocks = min(len(tokens) // self.block_size, len(remote.hashes))
        local_blocks = num_computed_tokens // self.block_size
        hashes = state.hashes_upto(full_blocks, self.block_size, tokens)
        same = next((i for i in range(full_blocks) if hashes[i] != remote.hashes[i]), full_blocks)
        if same <= local_blocks:
            return 0
        state.remote, state.matched_blocks, state.host_blocks = remote, same, local_blocks
        state.match_key, state.local_tokens = None, num_computed_tokens
        if self.metrics is not None:
            self.metrics.record_matched_tokens((same - local_blocks) * self.block_size)
        return same * self.block_size - num_computed_tokens

    def plan_matched_load(self, state: TrackedRequest, block_ids: Sequence[int], num_blocks: int) -> RequestLoad:
        """Load the first ``num_blocks`` matched blocks after the engine's hit into the request's blocks at those
        positions (``block_ids``: all the request's engine blocks, in token order)."""
        first = state.local_tokens // self.block_size
        if first + num_blocks > min(len(block_ids), state.matched_blocks):
            raise ValueError(f"request {state.request_id}: {num_blocks} blocks to load after {first} local ones; "
                             f"{len(block_ids)} allocated, {state.matched_blocks} matched")
        state.loading = not state.layerwise
        remote, state.remote = state.remote, None
        g4, state.g4 = state.g4, None
        if g4 is not None and first + num_blocks > g4[0]:
            return self._plan_g4_load(state, block_ids, first, first + num_blocks, *g4)
        if remote is not None:  # (another instance's blocks load asynchronously)
            state.loading = True
            return self.plan_remote_load(state.request_id, remote.source, state.hashes[first:first + num_blocks],
                                         remote.slots[first:first + num_blocks], block_ids[first:first + num_blocks])
        return self.plan_load(state.request_id, state.hashes[first:first + num_blocks],
                              block_ids[first:first + num_blocks], layerwise=state.layerwise)

    def _plan_g4_load(self, state: TrackedRequest, block_ids: Sequence[int], first: int, end: int, g4_first: int,
                      hit: DirectoryHit) -> RequestLoad:
        """Load blocks ``[first, end)``: those before ``g4_first`` from the local tiers, the rest from the other
        instance's G2 that ``hit`` names (one asynchronous load)."""
        state.loading, state.g4_tried = True, True
        plan = self.index.plan_load(state.hashes[first:g4_first], block_ids[first:g4_first])
        source = replace(hit.source, request_id=f"g4:{state.request_id}")
        n = end - g4_first
        move = Move(self.index.reserve_move_id(), MoveKind.LOAD, REMOTE_TIER, ENGINE_TIER, hit.slots[:n],
                    tuple(block_ids[g4_first:end]), hit.hashes[:n], source)
        self._remote_moves.add(move.move_id)
        self._g4_loads[move.move_id] = n
        load = RequestLoad(state.request_id, (*plan.moves, move), tuple(block_ids[first + i] for i in
                                                                         sorted(plan.missing)))
        self._loads.append(load)
        return load

    def plan_remote_load(self, request_id: str, source: RemoteSource, hashes: Sequence[int], slots: Sequence[int],
                         engine_ids: Sequence[int]) -> RequestLoad:
        """Load blocks ``hashes`` from slots ``slots`` of another instance's G2 into ``engine_ids``: one move (the
        holder unpins once per reading rank)."""
        move = Move(self.index.reserve_move_id(), MoveKind.LOAD, REMOTE_TIER, ENGINE_TIER, tuple(slots),
                    tuple(engine_ids), tuple(hashes), source)
        self._remote_moves.add(move.move_id)
        load = RequestLoad(request_id, (move,))
        self._loads.append(load)
        return load

    def release_remote(self, source: RemoteSource) -> None:
        """Tell the holder of a prefill that nothing will be read from it (this engine had the blocks, or the request
        ended first), so it unpins them now: a move of no blocks, run with the step's cascades."""
        move = Move(self.index.reserve_move_id(), MoveKind.LOAD, REMOTE_TIER, ENGINE_TIER, (), (), (), source)
        self._remote_moves.add(move.move_id)
        self._releases.append(move)

    def keep_for_remote(self, state: TrackedRequest, prompt: Sequence[int]) -> RemotePrefill | None:
        """Pin the request's prompt blocks that are in G2 (or on their way) for another instance to read, and say
        where they are; None without endpoints (no exporting workers) or blocks, and for a hybrid model (no instance
        loads its prefills: `match_remote`)."""
        if self.endpoints is None or state.skip is not None or self.hybrid:
            return None
        hashes = state.hashes_upto(len(prompt) // self.block_size, self.block_size, prompt)
        run, slots = self.pins.pin(state.request_id, hashes[:len(prompt) // self.block_size])
        if not run:
            return None
        source = RemoteSource(self.engine_id, state.request_id, self.endpoints)
        return RemotePrefill(source, self.block_size, tuple(run), tuple(slots))

    def _common_hit(self, state: TrackedRequest, tokens: Sequence[int], local_units: int, full_units: int,
                    whole_prompt: bool) -> tuple[int, int]:
        """``(units, of which in G2)`` after the engine's hit (``unit`` tokens each) that every group can restore:
        the stored run of the first full-attention group (through the cost rule), cut where another
        full-attention group's run ends and to a whole unit, then shortened by units until every sliding-window
        group holds the blocks its window reads at the hit point and every state group the state block ending there.
        Each group's blocks are its own size."""
        unit, start = self.unit, local_units * self.unit
        hashes = [self.group_state(state, g.index).hashes_upto(full_units * unit // g.block_size, g.block_size, tokens)
                  for g in self.groups]
        full = [g for g in self.groups if g.kind == FULL]
        found = (full_units - (1 if whole_prompt else 0)) * unit  # tokens up to which the hit may reach
        host = 0
        if full:
            b = full[0].block_size
            n, in_host = self.lookup(hashes[full[0].index][start // b:], whole_prompt=whole_prompt)
            found, host = min(found, start + n * b), start + in_host * b
        for g in full[1:]:
            b, run = g.block_size, hashes[g.index][start // g.block_size:found // g.block_size]
            found = min(found, start + b * next((i for i, h in enumerate(run) if not self.index.holds(h)), len(run)))
        found -= (found - start) % unit
        windows = [g for g in self.groups if g.kind != FULL]
        while found > start and not all(
                self.index.holds(h) for g in windows
                for h in hashes[g.index][max(start // g.block_size, g.first_kept_block(found)):found // g.block_size]):
            found -= unit
        return (found - start) // unit, (max(min(host, found), start) - start) // unit

    def plan_matched_group_loads(self, state: TrackedRequest, block_ids: Sequence[Sequence[int]], num_units: int,
                                 null_block: int | None = None) -> list[RequestLoad]:
        """A hybrid model's `plan_matched_load`: load the first ``num_units`` matched units (``unit`` tokens each)
        after the engine's hit into each group's blocks (``block_ids``: per group, all the request's engine blocks
        in token order, of the group's own size): all of them for full attention, those the window reads at the hit
        point for a sliding window, the one holding the state at the hit point for a state group (engine blocks
        ``null_block`` are placeholders the engine keeps nothing in, never loaded)."""
        first = state.local_tokens // self.unit
        total = first + num_units
        end = total * self.unit  # the hit point, in tokens
        if len(block_ids) != len(self.groups):
            raise ValueError(f"request {state.request_id}: block ids of {len(block_ids)} groups, the model has "
                             f"{len(self.groups)}")
        if total > state.matched_blocks or any(end > len(ids) * g.block_size for g, ids in zip(self.groups, block_ids)):
            raise ValueError(f"request {state.request_id}: {num_units} units of {self.unit} tokens to load after "
                             f"{first} local ones; {[len(ids) for ids in block_ids]} blocks allocated per group, "
                             f"{state.matched_blocks} units matched")
        state.loading = True
        loads = []
        for group, ids in zip(self.groups, block_ids):
            track, b = self.group_state(state, group.index), group.block_size
            start = max(first * self.unit // b, group.first_kept_block(end))
            wanted = [j for j in range(start, end // b) if ids[j] != null_block]
            plan = self.index.plan_load([track.hashes[j] for j in wanted], [ids[j] for j in wanted])
            loads.append(RequestLoad(state.request_id, tuple(_retarget(m, group.engine_tier) for m in plan.moves),
                                     tuple(ids[wanted[i]] for i in sorted(plan.missing))))
        self._loads.extend(loads)
        return loads

    def hit_split(self, state: TrackedRequest, num_tokens: int) -> tuple[int, int]:
        """``(G2 tokens, tokens from lower tiers)`` of ``num_tokens`` planned for loading."""
        host = min(max(state.host_blocks * self.unit - state.local_tokens, 0), num_tokens)
        return host, num_tokens - host

    def g4_tokens(self, state: TrackedRequest, num_tokens: int) -> int:
        """Of ``num_tokens`` planned for loading after the engine's hit, those from another instance's G2 (G4)."""
        if state.g4_from is None:
            return 0
        return min(max(state.local_tokens + num_tokens - state.g4_from * self.block_size, 0), num_tokens)

    def lookup(self, hashes: Sequence[int], *, whole_prompt: bool) -> tuple[int, int]:
        """``(blocks matched, of which in G2)`` for the longest run of ``hashes`` stored in this instance's tiers
        whose load is expected to be faster than recomputing it (every hit without a cost rule); recorded in the
        metrics."""
        found, host, _ = self._lookup(hashes, whole_prompt=whole_prompt, g4=False)
        return found, host

    def _lookup(self, hashes: Sequence[int], *, whole_prompt: bool, g4: bool
                ) -> tuple[int, int, DirectoryHit | None]:
        """`lookup`, and with ``g4`` the run another instance holds right after the local run: ``(blocks matched,
        of which in G2, the G4 part)``. The cost rule judges both runs as one match (G4 its last tier), so it
        reports a G4 part only after every local block and only where loading it beats recomputing it (a probe
        may report the first batch of it)."""
        match: Match = self.index.lookup(hashes, whole_prompt=whole_prompt)
        hit = self._g4_lookup(hashes[match.num_blocks:len(hashes) - (1 if whole_prompt else 0)]) if g4 else None
        counts = dict(zip(self.index.tier_names, match.hits))
        if self.directory is not None:
            counts[REMOTE_TIER] = len(hit.hashes) if hit is not None else 0
        if self.cost is not None:
            counts = dict(zip(self.cost.tiers, self.cost.decide([counts[t] for t in self.cost.tiers]).hits))
        local = sum(counts[t] for t in self.index.tier_names)
        remote = counts.get(REMOTE_TIER, 0)
        if hit is not None:
            hit = DirectoryHit(hit.source, hit.hashes[:remote], hit.slots[:remote]) if remote else None
        host = counts.get(HOST_TIER, 0)
        if self.metrics is not None:
            self.metrics.record_request_lookup(len(hashes), host, local - host)
            self.metrics.record_matched_tokens((local + remote) * self.block_size)
        return local + remote, host, hit

    def plan_load(self, request_id: str, hashes: Sequence[int], engine_ids: Sequence[int], *,
                  layerwise: bool = False) -> RequestLoad:
        """Load ``hashes`` into ``engine_ids`` in this step's plan (blocks gone since the lookup are ``missing``),
        layer by layer beside this step's forward when ``layerwise`` (then in one move per tier)."""
        plan = self.index.plan_load(hashes, engine_ids, whole=layerwise)
        load = RequestLoad(request_id, tuple(plan.moves), tuple(engine_ids[i] for i in sorted(plan.missing)),
                           layerwise)
        self._loads.append(load)
        return load

    def plan_stores(self, state: TrackedRequest, tokens: Sequence[int], num_full_blocks: int, *, group: int = 0,
                    keep_from: int = 0, null_block: int | None = None) -> None:
        """Store the request's full blocks ``[saved, num_full_blocks)`` of KV cache ``group`` (by its block ids, of
        its block size) in this step's plan, leaving out those below block ``keep_from`` (the engine may have freed
        them) and engine blocks ``null_block`` (placeholders); nothing (left for a later call) before every worker
        registered."""
        track = self.group_state(state, group)
        num_full_blocks = min(num_full_blocks, len(track.block_ids))
        if state.skip is not None or num_full_blocks <= track.saved or not self.ready():
            return
        hashes = track.hashes_upto(num_full_blocks, self.groups[group].block_size, tokens)
        first = max(track.saved, keep_from)
        if null_block is None:  # every block of the range (slices: a long prompt's are thousands)
            blocks: Sequence[int] = range(first, num_full_blocks)
            block_hashes, block_ids = hashes[first:num_full_blocks], track.block_ids[first:num_full_blocks]
        else:
            blocks = [j for j in range(first, num_full_blocks) if track.block_ids[j] != null_block]
            block_hashes, block_ids = [hashes[j] for j in blocks], [track.block_ids[j] for j in blocks]
        tier = self._store_tier
        room, worth = None, True
        if self.backlog.bounds:  # (stores into a disk are bounded; more tightly where the rule would not load them)
            worth = self.cost is None or tier not in self.cost.tiers or self.cost.pays_off(tier, num_full_blocks)
            room = self.backlog.room(tier, worth_loading=worth)
        plan = self.index.plan_store(block_hashes, block_ids, max_blocks=room)
        track.saved = num_full_blocks
        if plan.over_limit:
            self.backlog.dropped(tier, len(plan.over_limit))
            if self.metrics is not None:
                self.metrics.record_store_dropped(tier, len(plan.over_limit))
        for move in plan.moves:
            self.backlog.started(move.move_id, tier, move.num_blocks, worth_loading=worth)
        if plan.moves:
            plan.moves = [_retarget(move, self.groups[group].engine_tier) for move in plan.moves]
            for move in plan.moves:
                if self.hybrid:
                    track.store_first[move.move_id] = min(blocks[i] for i in plan.positions[move.move_id])
                self._owner[move.move_id] = state.request_id
                state.stores.add(move.move_id)
            self._stores.append(RequestStore(state.request_id, tuple(plan.moves)))

    def stores_below(self, state: TrackedRequest, group: int, first_block: int) -> bool:
        """Whether a store of a hybrid model's ``group`` still unreported reads a block below ``first_block``."""
        track = self.group_state(state, group)
        track.store_first = {m: b for m, b in track.store_first.items() if m in state.stores}
        return any(b < first_block for b in track.store_first.values())

    def take_step(self, preempted: frozenset[str] = frozenset(), held: Sequence[str] = (), *, prompt_tokens: int = 0,
                  step_tokens: int = 0) -> StepPlan:
        """This step's plan: the loads and stores planned since the last step, and the cascades now due. The step's
        forward computes ``step_tokens`` tokens, ``prompt_tokens`` of them prompt positions: a prefill-dominated
        step is timed for the cost rule (`kvbm.connectors.prefill.timed_tokens`)."""
        ready = self.ready()
        self._step += 1
        loads, self._loads = self._loads, []
        stores, self._stores = self._stores, []
        if len(self.pins):
            expired = self.pins.expire()
            for request_id in expired:
                log.warning("kvbm: blocks of request %s kept for another instance were not read within %.0f s; "
                            "released", request_id, self.pins.timeout_s)
            if self.metrics is not None and expired:
                self.metrics.record_remote_pin_timeouts(len(expired))
        if self.metrics is not None and self.endpoints is not None:
            self.metrics.set_remote_pins(len(self.pins))
        if self.directory is not None:
            self.directory.endpoints = self.endpoints
            self.directory.flush()
        cascades = self.index.plan_cascades() if self.index.has_cascades() else []
        cascades, self._releases = cascades + self._releases, []
        timed = timed_tokens(prompt_tokens, step_tokens, loads) if self.cost is not None and ready else 0
        return StepPlan(loads, stores, cascades, preempted, list(held), self._step, timed,
                        self._layer_ratio(loads, step_tokens))

    def _layer_ratio(self, loads: Sequence[RequestLoad], step_tokens: int) -> float:
        """The forward's expected seconds for ``step_tokens`` tokens over the expected seconds of the layer-wise
        loads among ``loads``, by the cost rule's estimates; 0 without a rule, tokens or layer-wise loads, or with
        ``DYN_KVBM_DISABLE_COST_LAYER_GROUPS``."""
        if self.cost is None or step_tokens <= 0 or not self.cost_layer_groups:
            return 0.0
        blocks: dict[str, int] = {}
        for load in loads:
            if load.layerwise:
                for move in load.moves:
                    blocks[move.src_tier] = blocks.get(move.src_tier, 0) + move.num_blocks
        transfer = self.cost.load_seconds([blocks.get(t, 0) for t in self.cost.tiers]) if blocks else 0.0
        return self.cost.step_seconds(step_tokens) / transfer if transfer > 0 else 0.0

    def apply(self, report: WorkerReport) -> None:
        """Take workers' results: a move completes once ``num_workers`` reported it; a completed load's timing
        (``MoveResult.seconds``, where workers report it) and a step's timing, once every rank timed it, feed the
        cost rule; ranks that name themselves register; the blocks each rank failed are counted per rank."""
        self.register_workers(report.registered)
        if self.metrics is not None:
            for rank, count in report.failed_blocks.items():
                self.metrics.record_worker_failed_blocks(rank, count)
        for timing in report.timings:
            step = self._step_times.add(timing)
            if step is not None and self.cost is not None:
                self.cost.observe_prefill(*step)
        for move_id, result in report.results.items():
            if move_id in self._partial:
                result = self._partial.pop(move_id).merged(result)
            if result.reports < self.num_workers:
                self._partial[move_id] = result
                continue
            if move_id in self._remote_moves:  # not the index's: nothing held here
                self._remote_moves.discard(move_id)
                blocks = self._g4_loads.pop(move_id, None)  # a G4 hit's load (P/D loads include waiting for stores)
                if blocks is not None and self.cost is not None and result.seconds is not None:
                    self.cost.observe_load(REMOTE_TIER, num_bytes=(blocks - len(result.failed)) * self.cost.block_bytes,
                                           seconds=result.seconds)
                continue
            move = self.index.complete(move_id, result.failed, result.lost)
            if move.kind is MoveKind.STORE:
                self.pins.stored(move.hashes, result.failed)
            seconds = result.seconds
            if self.cost is not None and move.kind is MoveKind.LOAD and seconds is not None:
                self.cost.observe_load(move.src_tier, num_bytes=(move.num_blocks - len(result.failed))
                                       * self.cost.block_bytes, seconds=seconds)
            if move.kind is MoveKind.STORE:
                self.backlog.finished(move_id, seconds)
                owner = self.requests.get(self._owner.pop(move_id, ""))
                if owner is not None:
                    owner.stores.discard(move_id)
        for request_id, count in report.released.items():
            self.pins.acknowledge(request_id, count)


def _retarget(move: Move, engine_tier: str) -> Move:
    """``move`` with its engine side named ``engine_tier`` (a KV cache group's engine cache)."""
    if engine_tier == ENGINE_TIER:
        return move
    if move.src_tier == ENGINE_TIER:
        return replace(move, src_tier=engine_tier)
    return replace(move, dst_tier=engine_tier)
