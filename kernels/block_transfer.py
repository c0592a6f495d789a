"""The handle of one transfer of blocks between two caches: it completes per block, OK or FAILED with a reason.

A path describes its work as a generator of steps: it yields what it is waiting for (a CUDA event, a
`TransferHandle`, a `concurrent.futures.Future`, or None for "a resource is busy, ask again later") and returns
the failed blocks as ``{index: reason}`` (indices into the transfer's block lists), or ``(failed, lost)`` where
``lost`` are the failed blocks whose source bytes are known bad (a failed disk read, a checksum mismatch): the
index drops those, while a block that failed for another reason (a copy that raised) keeps its stored copy.
`done()` advances the steps without blocking; `wait()` blocks on what the current step waits for. A path that
finishes at once returns `BlockTransfer.completed(...)`.

A path whose source is read before the transfer ends (a disk write that copies its blocks into a bounce buffer, then
writes them) yields `SOURCE_READ` once it no longer reads the source; `source_read` is then True, so the source's
blocks may be reused while the write goes on (the engine frees a stored request's blocks sooner).
"""
from __future__ import annotations

import enum
import time
from collections.abc import Generator, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

from . import stream_events

__all__ = ["BlockStatus", "BlockTransfer", "SOURCE_READ", "Steps"]

#: What a path's steps yield while they wait, and return once finished: failed block index -> reason, optionally
#: with the set of failed blocks whose source is known bad.
Steps = Generator[Any, None, "dict[int, str] | tuple[dict[int, str], set[int]]"]
_IDLE_WAIT_S = 0.0002


class _SourceRead:
    """The type of `SOURCE_READ`."""

    def __repr__(self) -> str:
        return "SOURCE_READ"


#: Yielded by a path's steps once the transfer no longer reads its source (see the module docstring).
SOURCE_READ = _SourceRead()


class BlockStatus(enum.Enum):
    """Outcome of one block of a transfer."""

    PENDING = "pending"
    OK = "ok"
    FAILED = "failed"


def _ready(waitable: Any) -> bool:
    """Whether a yielded waitable has finished; never blocks."""
    if waitable is None:
        return False
    if isinstance(waitable, Future):
        return waitable.done()
    if hasattr(waitable, "query"):  # a CUDA event
        return bool(waitable.query())
    return bool(waitable.done())  # a TransferHandle or a BlockTransfer


def _block_on(waitable: Any) -> None:
    """Block until a yielded waitable has finished (errors are the steps' business, not raised here)."""
    if waitable is None:
        time.sleep(_IDLE_WAIT_S)
    elif isinstance(waitable, Future):
        wait_futures([waitable])
    elif hasattr(waitable, "synchronize"):  # a CUDA event
        waitable.synchronize()
    elif isinstance(waitable, BlockTransfer):
        waitable.wait()
    else:  # a TransferHandle: its event, unless enqueueing failed
        event = getattr(waitable, "event", None)
        if event is not None and getattr(waitable, "error", None) is None:
            event.synchronize()


def _all_of(parts: Sequence[BlockTransfer]) -> Steps:
    for part in parts:
        while not part.over:  # (not `done()`: the caller's poll of the part it waits on advances it)
            yield part
    errors: dict[int, str] = {}
    lost: set[int] = set()
    for part in parts:
        for i, reason in part.reasons.items():
            errors.setdefault(i, reason)
        lost |= part.lost
    return errors, lost


class BlockTransfer:
    """Completion of one ``submit(src, dst, src_ids, dst_ids)``: ``done()`` polls, ``wait()`` blocks, then
    ``results`` / ``reasons`` say per block whether it was moved byte-exact."""

    def __init__(self, num_blocks: int, path: str, steps: Steps | None = None,
                 errors: dict[int, str] | None = None, lost: set[int] | None = None, *,
                 device_done: Any = None) -> None:
        """A transfer of ``num_blocks`` blocks by ``path``, finished when ``steps`` returns (at once when None,
        with ``errors`` and ``lost``). ``device_done``: a CUDA event after which the transfer has no work left but
        reporting (a path whose copies are all enqueued on the device), so a stream can wait for it on the device."""
        self.num_blocks = num_blocks
        self.path = path
        self.device_done = device_done
        self.synchronous = steps is None  #: finished before it was returned (a copy done on the caller's thread)
        self._steps = steps
        self._waiting: Any = None
        self._source_read = False
        self._errors: dict[int, str] | None = None
        self._lost: set[int] = set()
        if steps is None:
            self._finish((dict(errors or {}), set(lost or ())))
        if steps is not None:
            self._advance(poll=False)  # (to the first wait: a transfer just enqueued is seldom done, done() polls)

    @classmethod
    def completed(cls, num_blocks: int, path: str, errors: dict[int, str] | None = None,
                  lost: set[int] | None = None) -> BlockTransfer:
        """A transfer that is already over (a synchronous copy), with its failed (and lost) blocks."""
        return cls(num_blocks, path, None, errors, lost)

    @classmethod
    def all_of(cls, parts: Sequence[BlockTransfer], path: str) -> BlockTransfer:
        """One transfer made of ``parts`` over the same blocks (e.g. one per group of layers): done when every
        part is, a block failed (or lost) where any part failed (or lost) it."""
        sizes = {p.num_blocks for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"parts of one transfer must move the same blocks, got block counts {sorted(sizes)}")
        return cls(sizes.pop(), path, _all_of(parts))

    def order_stream(self, stream: Any) -> None:
        """Make ``stream``'s later work wait for this transfer: on the device (the host goes on) when all that is
        left is its ``device_done`` event, else (or with no stream: a CPU engine) by blocking until it is done."""
        if self.done():
            return
        if self.device_done is not None and stream is not None:
            stream.wait_event(self.device_done)
        else:
            self.wait()

    def order_raw_stream(self, stream: int) -> None:
        """`order_stream` for a raw CUDA stream handle, for callers on a per-layer path: with a recorded
        ``device_done`` event the stream waits for it through the driver, without polling the transfer (a wait on an
        event that has completed costs the device nothing); without one the call blocks until the transfer is
        done."""
        event = int(self.device_done.cuda_event) if self.device_done is not None else 0  # (0: never recorded)
        if event:
            stream_events.wait(stream, event)
        else:
            self.wait()

    @classmethod
    def failed(cls, num_blocks: int, path: str, reason: str) -> BlockTransfer:
        """A transfer whose every block failed for one reason."""
        return cls(num_blocks, path, None, {i: reason for i in range(num_blocks)})

    def _advance(self, poll: bool = True) -> None:
        """Run the steps until they wait on something unfinished (``poll`` False: on anything), or return."""
        try:
            while True:
                self._waiting = self._steps.send(None)
                if self._waiting is SOURCE_READ:
                    self._source_read = True
                    continue
                if not poll or not _ready(self._waiting):
                    return
        except StopIteration as end:
            self._finish(end.value or {})
        except Exception as e:  # noqa: BLE001 - a step failed: the blocks not yet known good fail with it
            self._finish({i: f"{self.path} transfer failed: {e!r}" for i in range(self.num_blocks)})

    def _finish(self, outcome: dict[int, str] | tuple[dict[int, str], set[int]]) -> None:
        errors, lost = outcome if isinstance(outcome, tuple) else (outcome, set())
        bad = [i for i in errors if not 0 <= i < self.num_blocks] + [i for i in lost if i not in errors]
        if bad:
            errors = {i: f"{self.path}: steps reported block index {bad[0]} wrongly" for i in range(self.num_blocks)}
            lost = set()
        self._errors = dict(errors)
        self._lost = set(lost)
        self._steps = None
        self._waiting = None

    @property
    def over(self) -> bool:
        """Whether every block has its result, as last seen: unlike `done`, it does not poll or advance the steps
        (so that making a transfer of parts costs no poll of them)."""
        return self._errors is not None

    @property
    def source_read(self) -> bool:
        """Whether the transfer no longer reads its source, as last seen (its steps said so, or it is over); like
        `over`, it does not poll."""
        return self._source_read or self._errors is not None

    def done(self) -> bool:
        """True once every block has its result; advances the transfer's steps, never blocks."""
        if self._errors is None and (self._waiting is None or _ready(self._waiting)):
            self._advance()  # (None: the steps wait for a resource and ask again at each poll)
        return self._errors is not None

    def wait_source_read(self) -> None:
        """Block until the transfer no longer reads its source (`source_read`)."""
        while not (self.done() or self.source_read):  # (done() advances the steps, which may mark the source read)
            _block_on(self._waiting)

    def wait(self) -> None:
        """Block until the transfer is over (it never raises for failed blocks: read ``results``)."""
        while not self.done():
            _block_on(self._waiting)

    @property
    def reasons(self) -> dict[int, str]:
        """Failed block index -> why (empty while pending)."""
        return dict(self._errors or {})

    @property
    def lost(self) -> set[int]:
        """Failed block indices whose source bytes are known bad (the source copy must be dropped)."""
        return set(self._lost)

    @property
    def results(self) -> list[BlockStatus]:
        """Per block: PENDING until done, then OK or FAILED."""
        if self._errors is None:
            return [BlockStatus.PENDING] * self.num_blocks
        return [BlockStatus.FAILED if i in self._errors else BlockStatus.OK for i in range(self.num_blocks)]

    @property
    def ok(self) -> bool:
        """True once done with every block moved."""
        return self._errors is not None and not self._errors

    def __repr__(self) -> str:
        state = "pending" if self._errors is None else f"{len(self._errors)} failed"
        return f"BlockTransfer({self.num_blocks} blocks by {self.path}, {state})"

