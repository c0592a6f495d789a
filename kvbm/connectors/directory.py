"""The shared G4 tier's hash directory: which kvbm instance holds which sequence hash in which G2 slot, in etcd.

etcd (as Dynamo uses it for discovery), not NIXL's metadata exchange: block residency changes every step and must
vanish with a dead instance, and etcd's leases do exactly that; NIXL's metadata exchange carries agent metadata only.
The client speaks etcd's v3 JSON gateway over HTTP (``/v3/kv/txn``, ``/v3/lease/*``: base64 keys and values), so no
etcd Python package is needed.

Keys, all under this instance's lease (``<p>`` is ``kvbm/g4/``):

- ``<p>i/<instance>``: JSON ``{"block_size", "endpoints"}``, the per-rank `G4Endpoint.endpoint` bytes (base64);
- ``<p>h/<hash as 16 hex digits>/<instance>``: the G2 slot (decimal) holding that block on every rank.

An instance mirrors its G2 pool (`committed` / `dropped`, called by the pool as blocks are committed and evicted or
discarded); a sender thread, woken by `flush` once per scheduler step, sends the changes (puts and deletes batched
in transactions of at most `MAX_TXN_OPS` operations) and keeps the lease alive, so a step never waits for etcd.
When the lease was lost (etcd unreachable for longer than the lease), the sender registers anew and publishes the
whole mirror. After a failed call etcd is left alone for a third of the lease.

Readers keep a local copy of the whole directory, followed by an etcd watch (`kvbm.connectors.directory_view`);
`parse_key` and `decode_record` are the key and record formats they read.

A directory entry is a hint, never trusted for bytes: the reader checks each slot's seal (state, hash, checksum)
at the holder before and after reading (`kvbm.worker.g4`), so a stale entry becomes a failed block, recomputed.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.request
import uuid
from typing import Any

__all__ = ["MAX_TXN_OPS", "PREFIX", "HASH_MASK", "HashDirectory", "check_endpoint", "decode_record", "parse_key",
           "wait_until"]

log = logging.getLogger(__name__)

MAX_TXN_OPS = 128  #: etcd's default ``--max-txn-ops``
PREFIX = "kvbm/g4/"  #: every key of the directory starts with it
HASH_MASK = 2**64 - 1  #: hashes are keyed as unsigned 64-bit numbers


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class HashDirectory:
    """What one instance publishes in the shared hash directory: its record and its G2 pool's hashes (see the
    module docstring)."""

    def __init__(self, url: str, *, block_size: int, lease_s: float = 10.0, instance: str | None = None,
                 timeout_s: float = 2.0) -> None:
        """``url``: etcd's client URL (``http://host:2379``); ``block_size``: tokens per block (instances with
        another block size are never matched); ``lease_s``: how long entries outlive their instance."""
        check_endpoint(url, lease_s)
        self.url = url.rstrip("/")
        self.block_size = int(block_size)
        self.lease_s = float(lease_s)
        self.instance = instance or uuid.uuid4().hex
        self.timeout_s = float(timeout_s)
        self.endpoints: tuple[bytes, ...] | None = None  #: this instance's per-rank endpoints (None: not exporting)
        self.calls = 0  #: HTTP requests sent to etcd (grants, puts; keep-alives are not counted)
        self._held: dict[int, int] = {}  # G2 mirror: hash -> slot
        self._changed: dict[int, int | None] = {}  # not yet handed to etcd: hash -> new slot, or None (withdrawn)
        self._sending = False  # the sender holds changes it has not sent yet
        self._lease: int | None = None
        self._lock = threading.Lock()  # the mirror, the changes and the lease, between the step and the sender
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None
        self._off_until = 0.0  # monotonic time before which etcd is not tried again (after a failure)

    def __len__(self) -> int:
        """Blocks this instance's G2 holds (the mirror)."""
        return len(self._held)

    @property
    def synced(self) -> bool:
        """Whether etcd holds the whole mirror: registered under a live lease and no change left to send."""
        with self._lock:
            return self._lease is not None and not self._changed and not self._sending

    def wait_synced(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for `synced`; whether it came."""
        return wait_until(lambda: self.synced, timeout_s)

    # -- etcd's JSON gateway -----------------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read() or b"{}")

    def _txn(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run ``ops`` (etcd RequestOp objects) in transactions of at most `MAX_TXN_OPS`; their responses."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(ops), MAX_TXN_OPS):
            self.calls += 1
            reply = self._post("/v3/kv/txn", {"success": ops[start:start + MAX_TXN_OPS]})
            out.extend(reply.get("responses", []))
        return out

    # -- the holder's side -------------------------------------------------------------------------------------

    def committed(self, seq_hash: int, slot: int) -> None:
        """The G2 pool committed ``seq_hash`` into ``slot``: published after the next `flush`."""
        with self._lock:
            self._held[seq_hash] = slot
            self._changed[seq_hash] = slot

    def dropped(self, seq_hash: int, slot: int) -> None:
        """The G2 pool evicted or discarded ``seq_hash`` (from ``slot``): withdrawn after the next `flush`."""
        with self._lock:
            if self._held.pop(seq_hash, None) is not None:
                self._changed[seq_hash] = None

    def flush(self) -> None:
        """Have the sender thread (started on first use) send the changes so far; it also keeps the lease alive.
        Nothing is sent before `endpoints` is set. The scheduler's step never waits for etcd."""
        if self.endpoints is None:
            return
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, name="kvbm-g4-directory", daemon=True)
            self._sender.start()
        self._wake.set()

    def _send_loop(self) -> None:
        """The sender thread: changes when woken, a keep-alive every third of the lease, registration (with the
        whole mirror) whenever no lease is held; etcd errors are logged and the whole mirror is sent again later."""
        renew_at = 0.0
        while True:
            self._wake.wait(self.lease_s / 3)
            self._wake.clear()
            if self._stop.is_set():
                return
            if time.monotonic() < self._off_until:
                continue
            try:
                if self._lease is not None and time.monotonic() >= renew_at:
                    renew_at = time.monotonic() + self.lease_s / 3
                    if not self._renew():
                        log.warning("kvbm G4: the etcd lease expired; this instance's blocks are published again")
                        with self._lock:
                            self._lease = None
                self._send()
            except (OSError, ValueError, KeyError) as e:  # urllib's errors are OSErrors
                log.warning("kvbm G4: etcd at %s failed (%r); the directory is published again later", self.url, e)
                self._failed()
                with self._lock:
                    self._lease, self._sending = None, False  # register anew and send the whole mirror

    def _failed(self) -> None:
        """etcd failed a call: leave it alone for a third of the lease."""
        self._off_until = time.monotonic() + self.lease_s / 3

    def _renew(self) -> bool:
        """Keep the lease alive; False when etcd says it ended."""
        reply = self._post("/v3/lease/keepalive", {"ID": str(self._lease)})
        return int(reply.get("result", {}).get("TTL", 0)) > 0

    def _send(self) -> None:
        """Send the changes (everything under a new lease when none is held)."""
        with self._lock:
            lease = self._lease
            changes: dict[int, int | None] = dict(self._held) if lease is None else self._changed
            self._changed, self._sending = {}, True
        if lease is None:
            lease = self._register()
        ops = []
        for seq_hash, slot in changes.items():
            key = _b64(self._hash_key(seq_hash))
            if slot is None:
                ops.append({"request_delete_range": {"key": key}})
            else:
                ops.append({"request_put": {"key": key, "value": _b64(str(slot)), "lease": str(lease)}})
        self._txn(ops)
        with self._lock:
            self._lease, self._sending = lease, False

    def _register(self) -> int:
        """Grant a lease and put this instance's record under it; the lease id."""
        self.calls += 1
        lease = int(self._post("/v3/lease/grant", {"TTL": max(1, round(self.lease_s))})["ID"])
        record = {"block_size": self.block_size,
                  "endpoints": [base64.b64encode(e).decode() for e in self.endpoints or ()]}
        self._txn([{"request_put": {"key": _b64(self._instance_key(self.instance)), "value": _b64(json.dumps(record)),
                                    "lease": str(lease)}}])
        return lease

    def close(self) -> None:
        """Stop the sender and revoke the lease: this instance's entries vanish now."""
        self._stop.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join(self.timeout_s * 4)
        with self._lock:
            lease, self._lease = self._lease, None
        if lease is not None:
            try:
                self._post("/v3/lease/revoke", {"ID": str(lease)})
            except (OSError, ValueError) as e:
                log.warning("kvbm G4: revoking the etcd lease failed (%r); its entries expire with it", e)

    # -- keys --------------------------------------------------------------------------------------------------

    def _hash_key(self, seq_hash: int) -> str:
        return f"{PREFIX}h/{seq_hash & HASH_MASK:016x}/{self.instance}"

    @staticmethod
    def _instance_key(instance: str) -> str:
        return f"{PREFIX}i/{instance}"


def check_endpoint(url: str, lease_s: float) -> None:
    """Raise ValueError unless ``url`` is an http(s) URL and ``lease_s`` at least 1 second."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"etcd endpoint must be an http(s) URL such as http://127.0.0.1:2379, got {url!r}")
    if not lease_s >= 1:
        raise ValueError(f"lease_s must be at least 1 second, got {lease_s!r}")


def wait_until(condition: Any, timeout_s: float) -> bool:
    """Poll ``condition()`` every 5 ms for up to ``timeout_s``; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def parse_key(key: str) -> tuple[int | None, str] | None:
    """``(hash, instance)`` of a hash entry's key, ``(None, instance)`` of an instance record's, None otherwise."""
    kind, _, rest = key[len(PREFIX):].partition("/") if key.startswith(PREFIX) else ("", "", "")
    if kind == "i" and rest:
        return None, rest
    digits, _, instance = rest.partition("/")
    if kind == "h" and len(digits) == 16 and instance:
        try:
            return int(digits, 16), instance
        except ValueError:
            return None
    return None


def decode_record(value: str) -> tuple[int, tuple[bytes, ...]]:
    """``(block_size, per-rank endpoints)`` of an instance record's value (ValueError or KeyError when malformed)."""
    record = json.loads(value)
    return int(record["block_size"]), tuple(base64.b64decode(e) for e in record["endpoints"])
