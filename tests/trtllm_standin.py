"""TEST HELPER: a stand-in for TensorRT-LLM's KV cache connector interface, for machines without TensorRT-LLM.

TensorRT-LLM cannot be installed here, so the connector tests put this stand-in into ``sys.modules`` under the
real module path ``tensorrt_llm._torch.pyexecutor.kv_cache_connector`` before importing
``kvbm.trtllm_integration.connector``. It reproduces only the published interface the connector is written
against: the abstract methods of ``KvCacheConnectorScheduler`` and ``KvCacheConnectorWorker`` with their names
and parameters, ``bind_connector_meta`` / ``get_connector_meta`` and the optional
``register_forward_pass_callable`` on the worker base, and the ``RequestData`` / ``SchedulerOutput`` dataclasses
with their field names; and ``tensorrt_llm._utils.mpi_rank`` (the process's rank: `set_rank`). Nothing here runs
TensorRT-LLM's executor; the tests drive the connector pair in the executor's call order themselves (for several
ranks, `trtllm_ranks` plays the MPI broadcast of the metadata and the all-gather of finished ids).
Written for this project from the interface's description, not copied.
"""
from __future__ import annotations

import sys
import types
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

#: The module path the connector imports its bases from.
MODULE = "tensorrt_llm._torch.pyexecutor.kv_cache_connector"
UTILS = "tensorrt_llm._utils"
_PARENTS = ("tensorrt_llm", "tensorrt_llm._torch", "tensorrt_llm._torch.pyexecutor")


@dataclass
class RequestData:
    """One scheduled request as the executor reports it to ``build_connector_meta``."""

    request_id: int
    new_tokens: list[int]  # tokens added since the request's last report (the whole prompt on its first)
    new_block_ids: list[int]  # cache block ids added since the last report (all of them on the first)
    computed_position: int  # tokens whose KV is already valid before this step
    num_scheduled_tokens: int  # tokens computed in this step


@dataclass
class SchedulerOutput:
    """Every request of one step: first-time ``new_requests`` and already-seen ``cached_requests``."""

    new_requests: list[RequestData] = field(default_factory=list)
    cached_requests: list[RequestData] = field(default_factory=list)


class KvCacheConnectorWorker(ABC):
    """Stand-in of the worker-side base: holds the step's metadata; subclasses implement the transfers."""

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args
        self._metadata: object = None

    def bind_connector_meta(self, metadata: object) -> None:
        """Keep the scheduler's metadata for this step."""
        self._metadata = metadata

    def get_connector_meta(self) -> object:
        """The metadata bound for this step."""
        return self._metadata

    def _clear_connector_meta(self) -> None:
        self._metadata = None

    def register_forward_pass_callable(self) -> Callable[[], None] | None:
        """Optional: a callable the executor runs at the end of each forward pass (on the forward stream)."""
        return None

    @abstractmethod
    def register_kv_caches(self, kv_cache_tensor: Any) -> None: ...

    @abstractmethod
    def start_load_kv(self, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def save_kv_layer(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_save(self, stream: Any) -> None: ...

    @abstractmethod
    def get_finished(self, finished_gen_req_ids: list[int],
                     started_loading_req_ids: list[int]) -> tuple[list[int], list[int]]: ...


class KvCacheConnectorScheduler(ABC):
    """Stand-in of the scheduler-side base."""

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args

    @abstractmethod
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> object: ...

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]: ...

    @abstractmethod
    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool: ...

    @abstractmethod
    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None: ...


_rank = [0]


def admit(engine: Any, req: Any, num_computed_tokens: int, block_size: int,
          poison: Callable[[list[int]], None]) -> tuple[int, bool]:
    """A request admitted as TensorRT-LLM's scheduler drives the connector: the leader's external match, blocks for
    the prompt (the fresh ones poisoned by ``poison``), the block ids told to the leader; the request then waits for
    its asynchronous load or runs. ``engine`` keeps ``leader``, ``free``, ``blocks``, ``position``, ``loading``,
    ``new_loading``, ``external`` and ``running``."""
    matched, is_async = engine.leader.get_num_new_matched_tokens(req, num_computed_tokens)
    assert not (matched == 0 and is_async), "(0, True) is an error in TensorRT-LLM"
    need = -(-len(req.prompt) // block_size)
    engine.blocks[req.request_id] = ids = [engine.free.pop() for _ in range(need)]
    poison(ids[num_computed_tokens // block_size:])
    engine.leader.update_state_after_alloc(req, list(ids))
    engine.position[req.request_id] = num_computed_tokens + matched
    if is_async:
        engine.loading[req.request_id] = req
        engine.new_loading.append(req.request_id)
    else:
        engine.external[req.request_id] = matched
        engine.running[req.request_id] = req
    return matched, is_async


def finish(engine: Any, req: Any) -> bool:
    """The request is done: the leader says whether its blocks must be kept (their saves still running, in
    ``engine.new_saving``); freed if not."""
    rid = req.request_id
    engine.running.pop(rid, None)
    keep = engine.leader.request_finished(req, list(engine.blocks[rid]))
    if keep:
        engine.new_saving.append(rid)
    else:
        free(engine, rid)
    return keep


def free(engine: Any, rid: Any) -> None:
    """Give a request's blocks back to ``engine.free`` and forget its progress."""
    engine.free += engine.blocks.pop(rid)
    engine.position.pop(rid)
    engine.reported.pop(rid, None)


def set_rank(rank: int) -> None:
    """The rank ``mpi_rank()`` returns in this process (TensorRT-LLM: the MPI world rank)."""
    _rank[0] = rank


def mpi_rank() -> int:
    """This process's rank."""
    return _rank[0]


def install() -> types.ModuleType:
    """Put the stand-in (and empty parent packages) into ``sys.modules``; returns the stand-in module."""
    for name in _PARENTS:
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = []  # a package, so submodule imports resolve through sys.modules
            sys.modules[name] = pkg
    mod = types.ModuleType(MODULE, __doc__)
    for obj in (RequestData, SchedulerOutput, KvCacheConnectorWorker, KvCacheConnectorScheduler):
        setattr(mod, obj.__name__, obj)
    sys.modules[MODULE] = mod
    utils = types.ModuleType(UTILS)
    utils.mpi_rank = mpi_rank
    sys.modules[UTILS] = utils
    return mod


def uninstall() -> None:
    """Remove the stand-in and its parent packages from ``sys.modules``."""
    for name in (MODULE, UTILS, *reversed(_PARENTS)):
        sys.modules.pop(name, None)
