"""A local copy of the shared G4 tier's hash directory, kept current by an etcd watch, so that a lookup reads memory.

A G4 lookup runs on the scheduler's thread for every request whose local run stops short. Asking etcd there costs a
round trip per 128 hashes (4.0 ms for 16 blocks, 73.7 ms for 1024 against a local etcd on a 2-core machine), all
of it on the engine's step. `DirectoryView` instead holds the whole ``kvbm/g4/`` prefix (`kvbm.connectors.directory`
names its keys) in memory and follows it on a background thread:

- it reads the prefix once (``/v3/kv/range``, in pages of `PAGE_KEYS` keys, all at the first page's revision),
- then watches it from the next revision (``POST /v3/watch`` on etcd's JSON gateway: a streamed response of one
  JSON message per line), applying each event (a put or delete, a lease's expiry deleting every key under it) to
  the copy under a lock held only for the apply, never for network I/O;
- when the watch breaks (connection refused or closed, e.g. etcd restarted; an error message; a malformed line) or
  etcd cancels it (its history was compacted past the revision to resume from), it reads the prefix again and
  watches from there, retrying after 0.1 s, doubling up to `MAX_RETRY_S`. The watch's connection sends TCP
  keep-alive probes after a third of the lease without traffic, so a peer that vanished is noticed on a quiet
  directory too.

The copy is in sync once a watch is established after a read; it is out of sync at start-up and from a break until
the next watch is established. While out of sync `lookup` reports no G4 hit (None) rather than wait for etcd:
``kvbm_g4_directory_in_sync`` is 0 and a WARNING is logged once per outage (INFO when in sync again).

An entry in the copy is a hint, as one in etcd is: the holder may have evicted or reused the slot since. The reader
checks each slot's seal at the holder before and after reading (`kvbm.worker.g4`), so a stale entry becomes a
failed block, recomputed, never wrong bytes.
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvbm.connectors.directory import HASH_MASK, PREFIX, check_endpoint, decode_record, parse_key, wait_until
from kvbm.leader.plans import RemoteSource
from kvbm.metrics import KvbmMetrics

__all__ = ["MAX_RETRY_S", "PAGE_KEYS", "DirectoryHit", "DirectoryView"]

log = logging.getLogger(__name__)

PAGE_KEYS = 10_000  #: keys per range read of the initial (and every renewed) copy
MAX_RETRY_S = 1.0  #: longest wait between attempts to reach etcd again (lookups miss meanwhile)
_FIRST_RETRY_S = 0.1


@dataclass(frozen=True)
class DirectoryHit:
    """A leading run of looked-up blocks another instance holds: ``hashes[i]`` in G2 slot ``slots[i]`` of every rank
    of ``source`` (whose ``request_id`` is left for the load to name)."""

    source: RemoteSource
    hashes: tuple[int, ...]
    slots: tuple[int, ...]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _range_end(prefix: str) -> str:
    """The key right after every key starting with ``prefix`` (its last byte plus one; the prefix is ASCII)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class _Compacted(Exception):
    """etcd cancelled the watch: the revision to resume from was compacted away."""


# A change to the copy: (hash or None for an instance record, instance, slot or record, or None for a delete).
_Change = tuple[int | None, str, Any]


class DirectoryView:
    """Other instances' directory entries, in memory, followed by an etcd watch (see the module docstring)."""

    def __init__(self, url: str, *, block_size: int, instance: str, lease_s: float = 10.0, timeout_s: float = 2.0,
                 metrics: KvbmMetrics | None = None) -> None:
        """``url``: etcd's client URL; ``block_size``: tokens per block (instances with another are never matched);
        ``instance``: this instance's name in the directory (its own entries are not kept); ``lease_s``: the
        directory's lease, which paces the keep-alive probes; ``timeout_s``: per range read, and for a watch to be
        established."""
        check_endpoint(url, lease_s)
        self.url = url.rstrip("/")
        self.block_size = int(block_size)
        self.instance = instance
        self.lease_s = float(lease_s)
        self.timeout_s = float(timeout_s)
        self.metrics = metrics
        self.requests = 0  #: HTTP requests sent to etcd (range pages, watches); lookups send none
        self._slots: dict[str, dict[int, int]] = {}  # instance -> hash -> G2 slot
        self._records: dict[str, tuple[int, tuple[bytes, ...]]] = {}  # instance -> (block size, endpoints)
        self._entries = 0  # hash entries in the copy
        self._revision = 0  # every change up to this revision is in the copy
        self._in_sync = False
        self._lock = threading.Lock()  # the copy, between the watch thread and lookups
        self._stop = threading.Event()
        self._sock: socket.socket | None = None  # the watch's connection, shut down by close()
        self._thread: threading.Thread | None = None
        self._told_ranks: set[str] = set()  # instances whose rank count was logged as not matching
        self._publish()

    def __len__(self) -> int:
        """Hash entries of other instances in the copy."""
        return self._entries

    @property
    def in_sync(self) -> bool:
        """Whether the copy follows etcd (read, and a watch established since); lookups answer only then."""
        return self._in_sync

    def wait_in_sync(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for `in_sync`; whether it came."""
        return wait_until(lambda: self._in_sync, timeout_s)

    def start(self) -> None:
        """Start the watch thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvbm-g4-directory-watch", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the watch thread (its connection is shut down, so this waits for a range read at most)."""
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(self.timeout_s * 2 + 1)
        self._set_in_sync(False)

    # -- lookups (the caller's thread: memory only) -------------------------------------------------------------

    def lookup(self, hashes: Sequence[int], num_ranks: int) -> DirectoryHit | None:
        """The longest leading run of ``hashes`` that one other instance (of this block size and ``num_ranks``
        ranks) holds, per the copy (of several instances with that run, the first the copy knows); None when none
        does, and while the copy is out of sync (no G4 hits rather than waiting for etcd). Never touches the
        network: one dictionary read per block of the run, plus one per other instance holding the first."""
        if not hashes or not self._in_sync:
            return None
        keys = [h & HASH_MASK for h in hashes]
        best: list[int] = []
        holder = ""
        with self._lock:
            for instance, held in self._slots.items():
                n = len(best)
                if n == len(keys):
                    break
                if keys[n] not in held or keys[0] not in held or not self._usable(instance, num_ranks):
                    continue  # cannot hold a longer run than the best so far
                run = []
                for key in keys:
                    slot = held.get(key)
                    if slot is None:
                        break
                    run.append(slot)
                if len(run) > n:
                    best, holder = run, instance
            if not best:
                return None
            endpoints = self._records[holder][1]
        return DirectoryHit(RemoteSource(holder, "", endpoints), tuple(hashes[:len(best)]), tuple(best))

    def _usable(self, instance: str, num_ranks: int) -> bool:
        """Whether ``instance`` has a record of this block size and ``num_ranks`` ranks (rank r reads rank r)."""
        record = self._records.get(instance)
        if record is None or record[0] != self.block_size:
            return False
        if len(record[1]) != num_ranks:
            if instance not in self._told_ranks:
                self._told_ranks.add(instance)
                log.info("kvbm G4: instance %s has %d rank(s), this one %d: not read", instance, len(record[1]),
                         num_ranks)
            return False
        return True

    # -- the watch thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        """Read the prefix, watch it; after a break read it again (see the module docstring)."""
        failures = 0
        while not self._stop.is_set():
            try:
                self._read_all()
                self._follow()
                return  # stopped
            except _Compacted as e:
                log.info("kvbm G4: %s; reading the directory again", e)
                self._set_in_sync(False)
                failures = 0
                continue
            except (OSError, ValueError, KeyError, http.client.HTTPException) as e:  # urllib's errors are OSErrors
                if self._stop.is_set():
                    return
                if self._in_sync or not failures:
                    log.warning("kvbm G4: the directory's copy is out of sync with etcd at %s (%r); lookups report "
                                "no G4 hits until it is read again", self.url, e)
                    failures = 0
                self._set_in_sync(False)
                failures += 1
            self._stop.wait(min(_FIRST_RETRY_S * 2 ** (failures - 1), MAX_RETRY_S))

    def _read_all(self) -> None:
        """Replace the copy by a read of the whole prefix at one revision, in pages."""
        slots: dict[str, dict[int, int]] = {}
        records: dict[str, tuple[int, tuple[bytes, ...]]] = {}
        entries, revision, key = 0, None, PREFIX
        while True:
            body: dict[str, Any] = {"key": _b64(key), "range_end": _b64(_range_end(PREFIX)), "limit": PAGE_KEYS}
            if revision is not None:
                body["revision"] = str(revision)
            reply = self._post("/v3/kv/range", body)
            if revision is None:
                revision = int(reply["header"]["revision"])
            kvs = reply.get("kvs", [])
            for change in self._changes((kv, False) for kv in kvs):
                entries += _apply(slots, records, change)
            if not reply.get("more") or not kvs:
                break
            key = _unb64(kvs[-1]["key"]) + "\0"
        with self._lock:
            self._slots, self._records, self._entries = slots, records, entries
        self._revision = revision

    def _follow(self) -> None:
        """Watch the prefix from the revision after the copy's, applying events, until the watch breaks (raises)
        or `close` (returns)."""
        parts = urllib.parse.urlsplit(self.url)
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(parts.hostname, parts.port, timeout=self.timeout_s)
        try:
            connection.connect()
            sock = self._sock = connection.sock
            _keep_alive(sock, max(1, int(self.lease_s / 3)))
            if self._stop.is_set():
                return
            body = {"create_request": {"key": _b64(PREFIX), "range_end": _b64(_range_end(PREFIX)),
                                       "start_revision": str(self._revision + 1)}}
            self.requests += 1
            connection.request("POST", "/v3/watch", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise OSError(f"etcd answered the watch with HTTP {response.status}: {response.read(300)!r}")
            created = self._message(response)
            if not created.get("created"):
                raise ValueError(f"etcd's first watch message is not its creation: {created!r}")
            if int(created["header"]["revision"]) < self._revision:
                raise ValueError(f"etcd is at revision {created['header']['revision']}, the copy at "
                                 f"{self._revision}: another etcd answers now")
            sock.settimeout(None)  # quiet periods are normal; the keep-alive probes notice a vanished peer
            self._set_in_sync(True)
            while True:
                result = self._message(response)
                if result.get("canceled"):
                    if int(result.get("compact_revision", 0)):
                        raise _Compacted(f"etcd compacted its history up to revision {result['compact_revision']}")
                    raise ValueError(f"etcd cancelled the watch: {result.get('cancel_reason', result)!r}")
                events = result.get("events", [])
                if events:
                    changes = list(self._changes((e["kv"], e.get("type") == "DELETE") for e in events))
                    with self._lock:
                        for change in changes:
                            self._entries += _apply(self._slots, self._records, change)
                    self._revision = max(int(e["kv"]["mod_revision"]) for e in events)
                    self._publish()
        except OSError:
            if self._stop.is_set():
                return
            raise
        finally:
            self._sock = None
            connection.close()

    def _message(self, response: http.client.HTTPResponse) -> dict[str, Any]:
        """The next watch message's ``result`` (raises when the stream ended or carries an error)."""
        line = response.readline()
        if not line:
            raise ConnectionError("etcd closed the watch")
        message = json.loads(line)
        if "result" not in message:
            raise ValueError(f"etcd's watch failed: {message.get('error', message)!r}")
        return message["result"]

    def _changes(self, kvs: Iterable[tuple[dict[str, Any], bool]]) -> Iterator[_Change]:
        """Changes to the copy from ``(kv, deleted)`` pairs of etcd's answers (other instances' keys only)."""
        for kv, deleted in kvs:
            parsed = parse_key(_unb64(kv["key"]))
            if parsed is None or parsed[1] == self.instance:
                continue
            seq_hash, instance = parsed
            if deleted:
                yield seq_hash, instance, None
                continue
            try:
                value: Any = int(_unb64(kv["value"])) if seq_hash is not None else decode_record(_unb64(kv["value"]))
            except (ValueError, KeyError, TypeError) as e:
                log.warning("kvbm G4: directory entry %s is malformed (%r): ignored", _unb64(kv["key"]), e)
                continue
            if seq_hash is None and value[0] != self.block_size:
                log.info("kvbm G4: instance %s has blocks of %d tokens, this one %d: not read", instance, value[0],
                         self.block_size)
            yield seq_hash, instance, value

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.requests += 1
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read() or b"{}")

    def _set_in_sync(self, in_sync: bool) -> None:
        if in_sync and not self._in_sync:
            log.info("kvbm G4: the directory's copy follows etcd at %s from revision %d (%d entries of other "
                     "instances)", self.url, self._revision, self._entries)
        self._in_sync = in_sync
        self._publish()

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.set_g4_directory(self._in_sync, self._entries)


def _apply(slots: dict[str, dict[int, int]], records: dict[str, tuple[int, tuple[bytes, ...]]],
           change: _Change) -> int:
    """Apply one change to a copy; the change in its number of hash entries (-1, 0 or 1)."""
    seq_hash, instance, value = change
    if seq_hash is None:
        if value is None:
            records.pop(instance, None)
        else:
            records[instance] = value
        return 0
    held = slots.get(instance)
    if value is not None:
        if held is None:
            held = slots[instance] = {}
        before = len(held)
        held[seq_hash] = value
        return len(held) - before
    if held is None or held.pop(seq_hash, None) is None:
        return 0
    if not held:
        del slots[instance]
    return -1


def _keep_alive(sock: socket.socket, idle_s: int) -> None:
    """TCP keep-alive probes after ``idle_s`` quiet seconds, then every second, 3 unanswered ones ending it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux; elsewhere the system's keep-alive timing applies
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
