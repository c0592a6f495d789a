"""The channel from the TensorRT-LLM worker ranks other than rank 0 to the leader's process: registrations and
move results, small control messages only (KV bytes never cross it).

TensorRT-LLM runs the connector's scheduler side on rank 0 only and broadcasts its metadata to every rank, but
carries nothing from a worker back to it except finished request ids. Rank 0's worker shares the leader's process
(`kvbm.trtllm_integration.reports`); every other rank sends its block geometry once (``register``) and then its
`WorkerReport`s (``report``) here. The leader listens on a unix socket in the abstract namespace (no file; the
name goes away with the socket) whose address it hands out in its metadata; it takes connections only from
processes of its own user (``SO_PEERCRED``), and a rank checks the listener's user the same way before sending.
Messages are length-prefixed pickles of ``(rank, kind, payload)``. Every rank must run on the leader's host.
"""
from __future__ import annotations

import logging
import os
import pickle
import secrets
import socket
import struct
import threading
from dataclasses import dataclass, field

from kvbm.connectors.messages import WorkerReport
from kvbm.worker.replica_group import peer_uid

__all__ = ["RankInbox", "RankSender"]

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!Q")
_MAX_MESSAGE = 64 << 20  # a report of every move of a step is far smaller
_ACCEPT_S = 0.05


@dataclass
class _Received:
    geometries: dict[int, tuple[int, int]] = field(default_factory=dict)  # rank -> (tokens, bytes) per block
    reports: list[tuple[int, WorkerReport]] = field(default_factory=list)


class RankInbox:
    """The leader's end: listens from construction on `address`, collects what ranks send from background
    threads; `geometries` and `drain` never block."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.address = f"\0kvbm-trtllm-{os.getpid()}-{secrets.token_hex(8)}".encode()
        self._lock = threading.Lock()
        self._received = _Received()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind(self.address)
            self._listener.listen(world_size)
        except OSError:
            self._listener.close()
            raise
        self._listener.settimeout(_ACCEPT_S)
        self._threads = [threading.Thread(target=self._accept, daemon=True, name="kvbm-trtllm-inbox")]
        self._threads[0].start()

    def geometries(self) -> dict[int, tuple[int, int]]:
        """``(tokens, bytes)`` per block of each rank that registered here."""
        with self._lock:
            return dict(self._received.geometries)

    def drain(self) -> list[tuple[int, WorkerReport]]:
        """``(rank, report)`` received since the last drain, in arrival order (each rank's in its sending order)."""
        with self._lock:
            out, self._received.reports = self._received.reports, []
        return out

    def close(self) -> None:
        """Stop listening and reading (idempotent)."""
        self._stop.set()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if (uid := peer_uid(conn)) != os.getuid():
                log.warning("kvbm: TensorRT-LLM rank channel: refused a peer running as uid %d", uid)
                conn.close()
                continue
            conn.settimeout(None)
            thread = threading.Thread(target=self._read, args=(conn,), daemon=True, name="kvbm-trtllm-rank")
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            while (frame := _recv_frame(conn)) is not None:
                try:
                    rank, kind, payload = pickle.loads(frame)
                    self._take(rank, kind, payload)
                except Exception as e:  # a peer of our own user sending what no kvbm rank sends
                    log.error("kvbm: TensorRT-LLM rank channel: dropping a connection that sent a bad message: %s", e)
                    return

    def _take(self, rank: object, kind: object, payload: object) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank < self.world_size:
            raise ValueError(f"rank {rank!r} is not one of ranks 1..{self.world_size - 1}")
        with self._lock:
            if kind == "register" and isinstance(payload, tuple) and all(type(v) is int for v in payload):
                self._received.geometries[rank] = payload
            elif kind == "report" and isinstance(payload, WorkerReport):
                self._received.reports.append((rank, payload))
            else:
                raise ValueError(f"rank {rank} sent a {kind!r} message of {type(payload).__name__}")


class RankSender:
    """A worker rank's end: connected to the leader's `RankInbox` at ``address`` (raises naming it when that fails:
    every rank must run on the leader's host)."""

    def __init__(self, address: bytes, rank: int) -> None:
        self.rank = rank
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.connect(address)
            if (uid := peer_uid(self._sock)) != os.getuid():
                raise RuntimeError(f"the process listening on {address[1:]!r} runs as uid {uid}, not ours")
        except OSError as e:
            self._sock.close()
            raise RuntimeError(f"kvbm: TensorRT-LLM rank {rank} cannot reach the leader's channel "
                               f"{address[1:]!r} ({e}): every rank must run on rank 0's host") from None
        except BaseException:
            self._sock.close()
            raise

    def register(self, tokens_per_block: int, block_bytes: int) -> None:
        """Announce this rank's block geometry."""
        self._send("register", (int(tokens_per_block), int(block_bytes)))

    def report(self, report: WorkerReport) -> None:
        """Send one report of move results."""
        self._send("report", report)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._sock.close()

    def _send(self, kind: str, payload: object) -> None:
        frame = pickle.dumps((self.rank, kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        self._sock.sendall(_LENGTH.pack(len(frame)) + frame)


def _recv_frame(conn: socket.socket) -> bytes | None:
    """One message, or None at the end of the stream (or one too large to be a rank's)."""
    head = _recv_exact(conn, _LENGTH.size)
    if head is None:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > _MAX_MESSAGE:
        log.error("kvbm: TensorRT-LLM rank channel: dropping a connection announcing a %d-byte message", size)
        return None
    return _recv_exact(conn, size)


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < size:
        try:
            chunk = conn.recv(size - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
