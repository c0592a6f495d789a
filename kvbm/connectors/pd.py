"""Disaggregated prefill -> decode between kvbm instances: what a prefill instance hands back for a finished request,
and how it keeps those blocks until the decode instance has read them. Plain data, no torch.

A prefill (producer) instance keeps a finished request's prompt blocks in its G2 and returns `RemotePrefill` as
the request's ``kv_transfer_params`` (``{"do_remote_prefill": True, "kvbm": {...}}``): its engine and request id,
the blocks' sequence hashes and G2 slot ids (the same slot ids on every rank, as the leader's index numbers them
for all), and per rank the endpoint a reader needs (`kvbm.worker.g4`: the NIXL agent's export and the seal table
that tells a reader when a slot's store is over and what its checksum is). Rank ``r`` of the decode instance reads
rank ``r`` of the prefill instance, so both need the same tensor / pipeline parallel layout.

`Pins` holds the G2 slots of such requests in the producer's index until every reading rank reported the read
over (a NIXL notification the producer's workers pass on), or until a timeout: a decode instance that never comes
must not hold G2 forever. A slot reused after the timeout is caught by the reader's seal and checksum check.
"""
from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvbm.leader import BlockIndex
from kvbm.leader.plans import RemoteSource

__all__ = ["Pins", "RemotePrefill", "wants_remote_decode"]

_VERSION = 1


def wants_remote_decode(params: Mapping[str, Any] | None) -> bool:
    """Whether a request's ``kv_transfer_params`` ask this (prefill) instance to keep its blocks for a decoder."""
    return bool(params) and bool(params.get("do_remote_decode"))


@dataclass(frozen=True)
class RemotePrefill:
    """A finished prefill's blocks as a decode instance finds them: ``hashes[i]`` is in G2 slot ``slots[i]`` of
    every rank of engine ``source.engine_id``."""

    source: RemoteSource
    block_size: int
    hashes: tuple[int, ...]
    slots: tuple[int, ...]

    def to_params(self) -> dict[str, Any]:
        """The request's ``kv_transfer_params`` (JSON-serializable: a proxy carries them to the decode instance)."""
        return {"do_remote_prefill": True, "do_remote_decode": False,
                "kvbm": {"version": _VERSION, "engine_id": self.source.engine_id,
                         "request_id": self.source.request_id, "block_size": self.block_size,
                         "hashes": [str(h) for h in self.hashes], "slots": list(self.slots),
                         "endpoints": [base64.b64encode(e).decode() for e in self.source.endpoints]}}

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> RemotePrefill | None:
        """The prefill named by a request's ``kv_transfer_params``; None when they ask for no remote prefill;
        ValueError naming what is wrong when they are malformed."""
        if not params or not params.get("do_remote_prefill"):
            return None
        kv = params.get("kvbm")
        if not isinstance(kv, Mapping):
            raise ValueError(f"kv_transfer_params ask for a remote prefill but carry no 'kvbm' section: "
                             f"{sorted(params)}")
        try:
            if kv["version"] != _VERSION:
                raise ValueError(f"kvbm P/D params version {kv['version']!r}, this kvbm reads {_VERSION}")
            hashes = tuple(int(h) for h in kv["hashes"])
            slots = tuple(int(s) for s in kv["slots"])
            endpoints = tuple(base64.b64decode(e, validate=True) for e in kv["endpoints"])
            block_size = int(kv["block_size"])
            source = RemoteSource(str(kv["engine_id"]), str(kv["request_id"]), endpoints)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed kvbm P/D kv_transfer_params: {e!r}") from None
        if len(hashes) != len(slots) or not endpoints or block_size <= 0 or min(slots, default=0) < 0:
            raise ValueError(f"malformed kvbm P/D kv_transfer_params: {len(hashes)} hashes, {len(slots)} slots, "
                             f"{len(endpoints)} endpoints, block_size {block_size}")
        return cls(source, block_size, hashes, slots)


@dataclass
class _Pin:
    deadline: float
    held: list[int] = field(default_factory=list)  # G2 slots held for the request
    waiting: set[int] = field(default_factory=set)  # hashes whose store is in flight (held once committed)
    acks: int = 0


class Pins:
    """G2 slots of finished requests kept for readers in other instances (see the module docstring)."""

    def __init__(self, index: BlockIndex, tier: str, *, readers: int, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``readers``: acknowledgements that end a pin (one per reading rank)."""
        if not timeout_s > 0:
            raise ValueError(f"pin timeout_s must be positive, got {timeout_s!r}")
        self.index, self.tier, self.pool = index, tier, index.pool(tier)
        self.readers = readers
        self.timeout_s = float(timeout_s)
        self.clock = clock
        self._pins: dict[str, _Pin] = {}
        self.expired = 0  #: pins released by the timeout (no reader came)

    def __len__(self) -> int:
        return len(self._pins)

    def pin(self, request_id: str, hashes: Sequence[int]) -> tuple[list[int], list[int]]:
        """Pin the longest leading run of ``hashes`` that is in the tier (stored or being stored); returns its
        ``(hashes, slots)``."""
        self.release(request_id)
        pin = _Pin(self.clock() + self.timeout_s)
        run_hashes, slots = [], []
        for h in hashes:
            found = self.pool.find(h)
            if found is None:
                break
            slot, committed = found
            if committed:
                self.pool.hold(slot)
                pin.held.append(slot)
            else:
                pin.waiting.add(h)
            run_hashes.append(h)
            slots.append(slot)
        if run_hashes:
            self._pins[request_id] = pin
        return run_hashes, slots

    def stored(self, hashes: Sequence[int], failed: Mapping[int, str]) -> None:
        """A store move into the tier completed: its committed blocks that pins wait for are held now."""
        if not self._pins:
            return
        for i, h in enumerate(hashes):
            for pin in self._pins.values():
                if h in pin.waiting:
                    pin.waiting.discard(h)
                    if i not in failed:
                        found = self.pool.find(h)
                        if found is not None and found[1]:
                            self.pool.hold(found[0])
                            pin.held.append(found[0])

    def acknowledge(self, request_id: str, count: int) -> None:
        """``count`` reading ranks are done with the request's blocks; the last one ends the pin."""
        pin = self._pins.get(request_id)
        if pin is not None:
            pin.acks += count
            if pin.acks >= self.readers:
                self.release(request_id)

    def expire(self) -> list[str]:
        """End the pins past their timeout; returns their request ids."""
        now = self.clock()
        gone = [r for r, pin in self._pins.items() if pin.deadline <= now]
        for request_id in gone:
            self.release(request_id)
        self.expired += len(gone)
        return gone

    def release(self, request_id: str) -> None:
        """End a pin (idempotent)."""
        pin = self._pins.pop(request_id, None)
        if pin is not None:
            for slot in pin.held:
                self.index.release_slot(self.tier, slot)
