"""Descriptors handed from a replica group's writer rank to its readers: ranks on one host holding identical KV
(MLA's latent cache on every tensor-parallel rank) share the tiers the writer creates.

The writer listens on a unix socket in the abstract namespace, one per shared tier (`ReplicaGroup.address`: no
file; the name goes away with the socket), and hands each reader the tier's descriptors over ``SCM_RIGHTS``,
checking with ``SO_PEERCRED`` that the peer runs as the same user before sending; a reader checks the writer's
user the same way before taking anything. Memory handed out this way is a memfd whose size is sealed
(`sealed_memfd`, `sealed_size_error`), so that no process can shrink it under another's mapping: anonymous memory
with no name in any directory, freed by the kernel with the last process holding it, however it exits.
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
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DescriptorServer", "ReplicaGroup", "ShareError", "page_bytes", "peer_uid", "receive_descriptors",
           "sealed_memfd", "sealed_size_error"]

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # pid, uid, gid
_SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_RETRY_S = 0.05


class ShareError(RuntimeError):
    """A tier cannot be shared with the replica group (the message says why)."""


@dataclass(frozen=True)
class ReplicaGroup:
    """Ranks on one host holding identical KV, sharing their tiers: ``name`` is unique to the engine and the group
    (part of the sockets' abstract names), ``writer`` says whether this rank creates and fills the shared tiers,
    and ``num_readers`` how many other ranks attach within ``timeout_s`` seconds."""

    name: str
    writer: bool
    num_readers: int
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.name or "\0" in self.name or len(self.name.encode()) > 90:
            raise ValueError(f"ReplicaGroup.name must be 1-90 bytes without NUL, got {self.name!r}")
        if isinstance(self.num_readers, bool) or not isinstance(self.num_readers, int) or self.num_readers < 0:
            raise ValueError(f"ReplicaGroup.num_readers must be a non-negative int, got {self.num_readers!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"ReplicaGroup.timeout_s must be positive, got {self.timeout_s!r}")

    def address(self, tier: str) -> bytes:
        """The abstract socket address on which the writer hands out its shared ``tier`` (e.g. "pool", "g3")."""
        return b"\0kvbm-" + tier.encode() + b"-" + self.name.encode()


def page_bytes(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages: the size of a memfd that is mapped."""
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


def sealed_memfd(label: str, nbytes: int) -> int:
    """A new memfd of ``nbytes`` in whole pages whose size is sealed; raises `ShareError` saying why not."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
    try:
        fd = os.memfd_create(f"kvbm-{label}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except (AttributeError, OSError) as e:
        raise ShareError(f"memfd_create failed: {e}") from None
    try:
        os.ftruncate(fd, page_bytes(nbytes))
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SIZE_SEALS | fcntl.F_SEAL_SEAL)
    except OSError as e:
        os.close(fd)
        raise ShareError(f"sizing the memfd to {nbytes} bytes failed: {e}") from None
    return fd


def sealed_size_error(fd: int, nbytes: int) -> str | None:
    """Why ``fd`` is not a memfd of ``nbytes`` in whole pages with its size sealed; None when it is."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        actual = os.fstat(fd).st_size
    except OSError as e:
        return f"not a sealed memfd ({e})"
    if actual != page_bytes(nbytes):
        return f"file of {actual} bytes"
    return "size not sealed" if seals & _SIZE_SEALS != _SIZE_SEALS else None


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a connected unix socket (``SO_PEERCRED``)."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]


class DescriptorServer:
    """Hands ``message`` and copies of ``fds`` (taken now: the caller may close its own) to the group's readers of
    the same user, from a background thread, until all of them took them or ``timeout_s`` passed (`start`);
    ``served`` counts the readers served."""

    def __init__(self, group: ReplicaGroup, tier: str, message: bytes, fds: Sequence[int]) -> None:
        self.group, self.tier, self.message = group, tier, message
        self._fds: list[int] = []
        try:
            for fd in fds:
                self._fds.append(os.dup(fd))
        except OSError:
            self._close_fds()
            raise
        self.served = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def label(self) -> str:
        """The served tier and its group, as log lines name them."""
        return f"{self.tier} of replica group {self.group.name}"

    def start(self) -> None:
        """Listen and serve; raises `ShareError` if the address is taken (the readers then keep their own tier)."""
        if self.group.num_readers == 0:
            return
        address = self.group.address(self.tier)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(address)
            listener.listen(self.group.num_readers)
        except OSError as e:
            listener.close()
            raise ShareError(f"cannot listen on {address[1:]!r}: {e}") from None
        listener.settimeout(_RETRY_S)
        fds, self._fds = self._fds, []  # the thread's from now on
        self._thread = threading.Thread(target=self._serve, args=(listener, fds), daemon=True,
                                        name=f"kvbm-{self.tier}-{self.group.name}")
        self._thread.start()

    def _serve(self, listener: socket.socket, fds: list[int]) -> None:
        deadline = time.monotonic() + self.group.timeout_s
        try:
            while self.served < self.group.num_readers and time.monotonic() < deadline and not self._stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    uid = peer_uid(conn)
                    if uid != os.getuid():
                        log.warning("kvbm: %s: refused a peer running as uid %d", self.label, uid)
                        continue
                    try:
                        socket.send_fds(conn, [self.message], fds)
                    except OSError as e:
                        log.warning("kvbm: %s: handing it to a reader failed: %s", self.label, e)
                        continue
                    self.served += 1
            if self.served < self.group.num_readers and not self._stop.is_set():
                log.warning("kvbm: %s: %d of %d readers attached within %.0f s; the others store their own copy",
                            self.label, self.served, self.group.num_readers, self.group.timeout_s)
        finally:
            listener.close()
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        """Stop serving and close the copies (idempotent); descriptors already handed out stay valid."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._close_fds()

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


def receive_descriptors(group: ReplicaGroup, tier: str, message_bytes: int, num_fds: int) -> tuple[bytes, list[int]]:
    """The writer's message of ``message_bytes`` and ``num_fds`` descriptors for ``tier`` (owned by the caller from
    now on), waiting up to ``group.timeout_s`` for the writer; raises `ShareError` saying why not."""
    address = group.address(tier)
    deadline = time.monotonic() + group.timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
            break
        except (ConnectionRefusedError, FileNotFoundError) as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise ShareError(f"no writer rank answered on {address[1:]!r} within {group.timeout_s:.0f} s "
                                 f"({e.strerror}): is it on another host?") from None
            time.sleep(_RETRY_S)
    with sock:
        if (uid := peer_uid(sock)) != os.getuid():
            raise ShareError(f"the process serving {address[1:]!r} runs as uid {uid}, not ours")
        sock.settimeout(max(deadline - time.monotonic(), _RETRY_S))
        try:
            message, fds, _, _ = socket.recv_fds(sock, message_bytes, num_fds)
        except OSError as e:
            raise ShareError(f"receiving the {tier} failed: {e}") from None
    if len(fds) != num_fds or len(message) != message_bytes:
        for fd in fds:
            os.close(fd)
        raise ShareError(f"the writer rank closed the connection without handing over its {tier}")
    return message, fds
