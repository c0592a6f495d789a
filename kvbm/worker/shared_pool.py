"""One host pool for ranks that hold identical KV: MLA's latent cache is the same on every tensor-parallel rank.

The group's writer rank creates the pool as a memfd: anonymous memory with no name in any directory, freed by the
kernel when the last process mapping it exits, however it exits, so nothing is ever left in /dev/shm or
elsewhere. Its size is sealed (no process can shrink it under another's mapping). The writer maps it, then hands
the descriptor to the group's other ranks over a unix socket in the abstract namespace (no file either; the name
goes away with the socket), checking with ``SO_PEERCRED`` that each peer runs as the same user before sending.
A reader checks the writer's user, the pool's size and its seals before mapping it. Each rank registers its own
mapping for DMA (`PinnedHostBuffer` with ``shared_fd``).

Who writes what is the caller's rule (`kvbm.connectors.worker`): the writer stores into the pool, every rank loads
from it. A reader that cannot attach (the writer is on another host, the name is taken, the writer failed) keeps
its own pool and stores its own copy, which is always correct, only larger.
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

__all__ = ["ReplicaGroup", "SharedHostPool", "SharedPoolError"]

log = logging.getLogger(__name__)

_MAGIC = b"kvbm-shared-pool"
_HEADER = struct.Struct("<16sQ")  # magic, pool bytes
_UCRED = struct.Struct("3i")  # pid, uid, gid
_SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_RETRY_S = 0.05


def _file_bytes(nbytes: int) -> int:
    """The memfd's size for a pool of ``nbytes``: whole pages, as the pool is mapped."""
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


class SharedPoolError(RuntimeError):
    """The shared pool cannot be created or attached (the message says why)."""


@dataclass(frozen=True)
class ReplicaGroup:
    """Ranks on one host holding identical KV, sharing one host pool: ``name`` is unique to the engine and the
    group (the socket's abstract name), ``writer`` says whether this rank creates and fills the pool, and
    ``num_readers`` how many other ranks attach within ``timeout_s`` seconds."""

    name: str
    writer: bool
    num_readers: int
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.name or "\0" in self.name or len(self.name.encode()) > 100:
            raise ValueError(f"ReplicaGroup.name must be 1-100 bytes without NUL, got {self.name!r}")
        if isinstance(self.num_readers, bool) or not isinstance(self.num_readers, int) or self.num_readers < 0:
            raise ValueError(f"ReplicaGroup.num_readers must be a non-negative int, got {self.num_readers!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"ReplicaGroup.timeout_s must be positive, got {self.timeout_s!r}")

    @property
    def address(self) -> bytes:
        """The socket's address in the abstract namespace."""
        return b"\0kvbm-pool-" + self.name.encode()


def _peer_uid(sock: socket.socket) -> int:
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]


class SharedHostPool:
    """The descriptor of a group's pool of ``nbytes``: `create` (writer) or `attach` (reader); `close` it once
    mapped (the writer's stops handing it out)."""

    def __init__(self, fd: int, nbytes: int, group: ReplicaGroup) -> None:
        self.fd, self.nbytes, self.group = fd, nbytes, group
        self._listener: socket.socket | None = None
        self._server: threading.Thread | None = None
        self._stop = threading.Event()
        self.served = 0  #: readers the pool was handed to

    @classmethod
    def create(cls, group: ReplicaGroup, nbytes: int) -> SharedHostPool:
        """A new sealed memfd of ``nbytes`` in whole pages (not yet handed out: see `serve`)."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
        try:
            fd = os.memfd_create(f"kvbm-{group.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError) as e:
            raise SharedPoolError(f"memfd_create failed: {e}") from None
        try:
            os.ftruncate(fd, _file_bytes(nbytes))
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SIZE_SEALS | fcntl.F_SEAL_SEAL)
        except OSError as e:
            os.close(fd)
            raise SharedPoolError(f"sizing the memfd to {nbytes} bytes failed: {e}") from None
        return cls(fd, nbytes, group)

    def serve(self) -> None:
        """Hand the pool to the group's readers from a background thread, until all attached or ``timeout_s``
        passed. Raises `SharedPoolError` if the name is taken (the readers then keep their own pools)."""
        if self.group.num_readers == 0:
            return
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.group.address)
            listener.listen(self.group.num_readers)
        except OSError as e:
            listener.close()
            raise SharedPoolError(f"cannot listen on {self.group.address[1:]!r}: {e}") from None
        listener.settimeout(_RETRY_S)
        self._listener = listener
        self._server = threading.Thread(target=self._serve, args=(listener, os.dup(self.fd)), daemon=True,
                                        name=f"kvbm-pool-{self.group.name}")
        self._server.start()

    def _serve(self, listener: socket.socket, fd: int) -> None:
        deadline = time.monotonic() + self.group.timeout_s
        try:
            while self.served < self.group.num_readers and time.monotonic() < deadline and not self._stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    uid = _peer_uid(conn)
                    if uid != os.getuid():
                        log.warning("kvbm: shared pool %s: refused a peer running as uid %d", self.group.name, uid)
                        continue
                    try:
                        socket.send_fds(conn, [_HEADER.pack(_MAGIC, self.nbytes)], [fd])
                    except OSError as e:
                        log.warning("kvbm: shared pool %s: handing it to a reader failed: %s", self.group.name, e)
                        continue
                    self.served += 1
            if self.served < self.group.num_readers and not self._stop.is_set():
                log.warning("kvbm: shared pool %s: %d of %d readers attached within %.0f s; the others store their "
                            "own copy", self.group.name, self.served, self.group.num_readers, self.group.timeout_s)
        finally:
            listener.close()
            os.close(fd)

    @classmethod
    def attach(cls, group: ReplicaGroup, nbytes: int) -> SharedHostPool:
        """Receive the writer's pool of ``nbytes``, checked; raises `SharedPoolError` saying why not."""
        deadline = time.monotonic() + group.timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(group.address)
                break
            except (ConnectionRefusedError, FileNotFoundError) as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise SharedPoolError(f"no writer rank answered on {group.address[1:]!r} within "
                                          f"{group.timeout_s:.0f} s ({e.strerror}): is it on another host?") from None
                time.sleep(_RETRY_S)
        with sock:
            if (uid := _peer_uid(sock)) != os.getuid():
                raise SharedPoolError(f"the process serving {group.address[1:]!r} runs as uid {uid}, not ours")
            sock.settimeout(max(deadline - time.monotonic(), _RETRY_S))
            try:
                message, fds, _, _ = socket.recv_fds(sock, _HEADER.size, 1)
            except OSError as e:
                raise SharedPoolError(f"receiving the pool failed: {e}") from None
        if len(fds) != 1 or len(message) != _HEADER.size:
            for fd in fds:
                os.close(fd)
            raise SharedPoolError("the writer rank closed the connection without handing over its pool")
        fd = fds[0]
        magic, size = _HEADER.unpack(message)
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            actual = os.fstat(fd).st_size
        except OSError as e:
            os.close(fd)
            raise SharedPoolError(f"the received descriptor is not a sealed memfd: {e}") from None
        why = ("bad greeting" if magic != _MAGIC else f"pool of {size} bytes, this rank needs {nbytes}"
               if size != nbytes else f"file of {actual} bytes" if actual != _file_bytes(nbytes) else
               "size not sealed" if seals & _SIZE_SEALS != _SIZE_SEALS else None)
        if why is not None:
            os.close(fd)
            raise SharedPoolError(f"the writer rank's pool does not fit: {why}")
        return cls(fd, nbytes, group)

    def close(self) -> None:
        """Stop handing the pool out and close this process's descriptor (mappings stay valid); idempotent."""
        self._stop.set()
        if self._server is not None:
            self._server.join()
            self._server = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
